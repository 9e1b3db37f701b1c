"""Speed-up and memory bars from the benchmark CSVs, one PNG per family and GPU.

    python benchmarks/plot.py                          # latest run per GPU in benchmarks/results
    python benchmarks/plot.py --merge /path/to/OUT/*.csv   # first append a GPU session's CSVs here
    python benchmarks/plot.py --run all --mode fwd+bwd --out-dir /tmp/plots

Left panel: speed-up of each candidate over the family's baseline (baseline time / candidate time; the
baseline is the row's `baseline` column: eager for kernels, SDPA-with-mask for attention on CUDA, HF SDPA
for the training step), per case. Right panel: peak memory (GB) where it was measured (CUDA runs).
Only figures from one run (`run_id`) are drawn side by side: ratios across runs or cards are not.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FAMILY_FILES = {"kernels": "kernels.csv", "attention": "attention.csv", "train": "train_step.csv"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def merge(sources: list[str], dest: Path) -> None:
    """Append the rows of CSVs from elsewhere (a GPU session's $OUT) to dest/<same name>, header once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastbert.bench import append_csv

    for src in sources:
        rows = read_rows(Path(src))
        if rows:
            print(f"{src}: {len(rows)} rows -> {append_csv(dest / Path(src).name, rows)}")


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def plot_family(rows: list[dict[str, str]], family: str, mode: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_run: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if _float(r.get("ms")) is not None and r["mode"] in (mode, "step"):
            by_run[(r["gpu"], r["run_id"])].append(r)
    for (gpu, run_id), rs in sorted(by_run.items()):
        cases = list(dict.fromkeys(f"{r['case']} {r['size']}" if family != "train" else r["case"] for r in rs))
        cands = list(dict.fromkeys(r["candidate"] for r in rs))
        speed = {(c, k): None for c in cases for k in cands}
        mem = dict(speed)
        for r in rs:
            key = (f"{r['case']} {r['size']}" if family != "train" else r["case"], r["candidate"])
            speed[key], mem[key] = _float(r.get("speedup")), _float(r.get("peak_GB"))
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases) + 4), 4.5))
        width = 0.8 / max(1, len(cands))
        for ax, data, title in ((axes[0], speed, "speed-up vs baseline (x)"), (axes[1], mem, "peak memory (GB)")):
            for j, k in enumerate(cands):
                xs = [i + j * width for i in range(len(cases))]
                ax.bar(xs, [data[(c, k)] or 0.0 for c in cases], width, label=k)
            ax.set_xticks([i + width * (len(cands) - 1) / 2 for i in range(len(cases))])
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
            ax.set_title(title, fontsize=9)
            if data is speed:
                ax.axhline(1.0, color="grey", lw=0.8)
            elif all(v is None for v in data.values()):
                ax.text(0.5, 0.5, "not measured (CUDA only)", transform=ax.transAxes, ha="center")
        axes[0].legend(fontsize=7)
        dtype = rs[0]["dtype"]
        fig.suptitle(f"{family} ({mode if family != 'train' else rs[0]['mode']}, {dtype}) — {gpu}, run {run_id}, "
                     f"commit {rs[0]['commit']}", fontsize=9)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        path = out_dir / f"{family}_{slug}_{run_id}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder with the CSVs")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the PNGs go (default: --results)")
    ap.add_argument("--run", default="latest", help="'latest' (per GPU), 'all', or a run_id")
    ap.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"], help="kernel/attention mode")
    ap.add_argument("--merge", nargs="+", default=None, help="CSV files to append to --results first")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.results)
    out_dir = args.out_dir or args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for family, fname in FAMILY_FILES.items():
        path = args.results / fname
        if not path.exists():
            continue
        rows = read_rows(path)
        if args.run == "latest":
            latest: dict[str, str] = {}
            for r in rows:
                latest[r["gpu"]] = max(latest.get(r["gpu"], ""), r["run_id"])
            rows = [r for r in rows if r["run_id"] == latest[r["gpu"]]]
        elif args.run != "all":
            rows = [r for r in rows if r["run_id"] == args.run]
        for p in plot_family(rows, family, args.mode, out_dir):
            print(f"wrote {p}")
            n += 1
    if n == 0:
        print(f"nothing to plot in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
