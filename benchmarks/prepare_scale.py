"""fastbert-prepare at scale on this machine: MB/s and the peak memory of its whole process tree, for text corpora of
growing size (train/corpus_text.py: the embedded Wikipedia paragraphs repeated) and worker counts.

    python benchmarks/prepare_scale.py --mb 30 120 --workers 2      # default options: T = 128, dupe_factor 5

Memory is sampled from /proc every 50 ms and summed over the command and all its descendants, two ways: RSS
(pages the forked workers share with the parent counted once per process, what most tools add up) and PSS
(shared pages divided among their users: what the tree really holds). CPU is user + sys of the whole tree; on
a busy machine it is the steadier figure, the wall time is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.corpus_text import write_wiki_text  # noqa: E402


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # it ended meanwhile
            pass
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over `pid` and its descendants."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        rss += int(fields.get("Rss", "0 kB").split()[0]) << 10
        pss += int(fields.get("Pss", "0 kB").split()[0]) << 10
    return rss, pss


def measure(corpus: Path, out: Path, workers: int, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "train.prepare", str(corpus), "--out-dir", str(out), "--workers", str(workers),
            *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"fastbert-prepare failed ({proc.returncode}):\n{log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    mb = corpus.stat().st_size / (1 << 20)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"mb": round(mb, 1), "workers": workers, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "mb_per_s": round(mb / wall, 2), "mb_per_cpu_s": round(mb / cpu, 2),
            "peak_rss_mb": round(peak_rss / (1 << 20)), "peak_pss_mb": round(peak_pss / (1 << 20)),
            "load_avg_1m": round(os.getloadavg()[0], 1), "last_line": log.strip().splitlines()[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, nargs="+", default=[30, 120], help="corpus sizes in MB")
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="worker counts (0 = all cores)")
    p.add_argument("--work-dir", default=None, help="where the corpora and outputs go (default: a temporary one)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more fastbert-prepare flags, after --")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for mb in args.mb:
            corpus = Path(tmp) / f"wiki-{mb:g}mb.txt"
            write_wiki_text(corpus, mb)
            for workers in args.workers:
                print(json.dumps(measure(corpus, Path(tmp) / "out", workers, extra)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
