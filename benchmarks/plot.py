"""Ratio bars from the benchmark CSVs, one PNG per family and GPU: fastbert, the baseline and the best peer side
by side.

    python benchmarks/plot.py                          # latest run per GPU in benchmarks/results
    python benchmarks/plot.py --merge /path/to/OUT/*.csv   # first append a GPU session's CSVs here
    python benchmarks/plot.py --run all --mode fwd+bwd --out-dir /tmp/plots

Per case, three kinds of bar: the family's baseline (the row's `baseline` column: eager for kernels,
SDPA-with-mask for attention on CUDA, HF SDPA for the training step and inference), the best peer measured in
the same run (Liger, cuBLASLt, SDPA flash, flash-attn, transformers, sentence-transformers: `fastbert.bench.peers`)
and each fastbert candidate. Bar height = baseline time / candidate time (> 1: faster than the baseline); the
absolute time is written on each bar. Only figures from one run (`run_id`) are drawn side by side: ratios
across runs or cards are not. Modes: kernels and attention `--mode` (default fwd+bwd), the training step its
`step` (CPU: fwd+bwd), inference `fwd`.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FAMILY_FILES = {"kernels": "kernels.csv", "attention": "attention.csv", "train": "train_step.csv",
                "inference": "inference.csv"}


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


def _peer_names(family: str) -> tuple[str, ...]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastbert.bench.peers import PEERS

    return PEERS.get(family, ())


def _case_key(r: dict[str, str], family: str) -> str:
    return r["case"] if family in ("train", "inference") else f"{r['case']} {r['size']}"


def bars(rows: list[dict[str, str]], family: str) -> dict[str, list[tuple[str, str, float, float]]]:
    """case → [(kind, candidate, ratio to the baseline, ms)] for the baseline, the best peer and every fastbert
    candidate (kind: "baseline", "peer", "fastbert"); rows of one run and one mode."""
    peer_names = _peer_names(family)
    by_case: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if _float(r.get("ms")) is not None:
            by_case[_case_key(r, family)].append(r)
    out: dict[str, list[tuple[str, str, float, float]]] = {}
    for case, rs in by_case.items():
        base_name = next((r["baseline"] for r in rs if r.get("baseline")), "")
        base = next((r for r in rs if r["candidate"] == base_name), None)
        if base is None:
            continue
        base_ms = float(base["ms"])
        peers = [r for r in rs if r["candidate"] in peer_names and r["candidate"] != base_name]
        best = min(peers, key=lambda r: float(r["ms"])) if peers else None
        entry = [("baseline", base_name, 1.0, base_ms)]
        if best is not None:
            entry.append(("peer", best["candidate"], base_ms / float(best["ms"]), float(best["ms"])))
        for r in rs:
            if r["candidate"].startswith("fastbert") and r["candidate"] != base_name:
                entry.append(("fastbert", r["candidate"], base_ms / float(r["ms"]), float(r["ms"])))
        out[case] = entry
    return out


COLORS = {"baseline": "#9e9e9e", "peer": "#4c72b0", "fastbert": "#dd8452"}


def plot_family(rows: list[dict[str, str]], family: str, mode: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    want = {"train": ("step", "fwd+bwd"), "inference": ("fwd",)}.get(family, (mode,))
    written = []
    by_run: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if _float(r.get("ms")) is not None and r["mode"] in want:
            by_run[(r["gpu"], r["run_id"])].append(r)
    for (gpu, run_id), rs in sorted(by_run.items()):
        data = bars(rs, family)
        if not data:
            continue
        n_bars = sum(len(v) for v in data.values())
        fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * n_bars + 2.5), 4.8))
        x, ticks, labels = 0.0, [], []
        for case, entry in data.items():
            start = x
            for kind, name, ratio, ms in entry:
                ax.bar(x, ratio, 0.8, color=COLORS[kind], label=kind)
                ax.text(x, ratio, f"{ms:.3g} ms", ha="center", va="bottom", fontsize=6, rotation=90)
                ax.text(x, 0.02, name, ha="center", va="bottom", fontsize=6, rotation=90, color="white")
                x += 1.0
            ticks.append((start + x - 1.0) / 2)
            labels.append(case)
            x += 0.8
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("baseline time / candidate time (x)")
        ax.set_ylim(0, max(r for v in data.values() for _, _, r, _ in v) * 1.35)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left")
        shown = rs[0]["mode"]
        fig.suptitle(f"{family} ({shown}, {rs[0]['dtype']}) — {gpu}, run {run_id}, commit {rs[0]['commit']}",
                     fontsize=9)
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
