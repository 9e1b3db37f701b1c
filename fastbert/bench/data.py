"""The `data` family: how fast pretraining data is loaded and prepared, on the CPU.

    loader    sequences per second per core of the training's loader path — `PretrainingDataset.__getitems__`,
              the batch dict with its `PackedBatch`, exactly what the DataLoader hands the training step — at
              T = 128 and 512, plain and whole-word masking, measured in CPU time (`time.process_time`) on one
              thread. The instances are the worst case: every one full length (T − 3 body tokens), cut from the
              embedded Wikipedia paragraphs tokenized with the BERT uncased vocabulary (real `##` statistics),
              split A | B at a random point, spread over uneven shards (one empty), read in a random order.
    prepare   `python -m train.prepare --max-seq-len 128 --workers N` in a subprocess on the embedded paragraphs
              repeated and reshuffled (`train.corpus_text.write_wiki_text`) to 10 / 30 / 120 MiB with all cores,
              and on 30 MiB with 1 worker (`--quick`: 2 / 6 MiB in pieces of 2.5 MiB, and 1 vs 2 workers at 6 MiB):
              wall MiB/s, CPU seconds and peak memory of the whole process tree. Memory is sampled from /proc
              every 50 ms and summed over the command and its descendants two ways: PSS (a page the forked
              workers share with their parent divided among them: what the tree holds) and RSS (such a page
              counted once per process, an overcount).

MiB = 2^20 bytes, the unit fastbert-prepare's "MB" (`--piece-mb`, its log) counts. Each case's row goes to
`data.csv` as soon as it is measured (`report_rows`), in the other families' columns: `ms` = milliseconds per
batch (loader) or wall seconds × 1000 (prepare), `seq_per_s` (loader), `gbps` = GB (10^9 bytes) of text per
wall second and `peak_GB` = peak PSS of the tree in GB (prepare), `shape` = the case's parameters; the note
holds the CPU, its cores and the load average when the case started, and for prepare the figures with no
column (CPU-s, MiB per CPU-s, peak PSS and RSS in MiB, the cores other processes kept busy meanwhile).

The family measures train/ from the benchmark layer through imports inside its functions, so `import fastbert`
(and `fastbert.bench`) does not import train/.

Caution: the prepare figures are wall-clock on a machine that may be shared: quote them with the load. The load
average is over a minute, so a case's starting load includes the tail of the case before it; the cores others
kept busy (from /proc/stat, less the tree's CPU time) is the figure that says whether the machine was quiet.
Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .results import Row, report_rows
from .timing import BenchEnv

LOADER_CASES = ((128, False), (128, True), (512, False), (512, True))  # (T, whole-word masking)
MASKING = {False: "plain", True: "whole-word"}
LOADER_BATCH = 256
PREPARE_SIZES_MIB = (10, 30, 120)  # the worker-count axis runs at the middle size
PREPARE_SIZES_MIB_QUICK = (2, 6)
PIECE_MIB_QUICK = 2.5  # 6 MiB (and a little: the corpus ends at a document's end) in 3 pieces, for 2 workers


# ---------------------------------------------------------------------------------------------- data folders
def write_sharded(folder: str | os.PathLike, shards: dict[str, Sequence[Sequence]], vocab: Sequence[str],
                  max_seq_len: int) -> Path:
    """A prepared folder (format 3, train/shards.py) from instances: shards[split] = a list of shards, each a
    list of (A ids, B ids, is_random_next); shard k of a split is named `{split}-{k:05d}`."""
    from fastbert.tokenizer import SPECIAL_TOKENS
    from train.shards import FORMAT_VERSION, SPLITS, shard_arrays, shard_name, shard_path

    folder = Path(folder)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    splits = {}
    for split in SPLITS:
        entries = []
        for k, instances in enumerate(shards.get(split, ())):
            arrays = shard_arrays(instances, len(vocab))
            for name, a in arrays.items():
                np.save(shard_path(folder, shard_name(split, k), name), a)
            entries.append({"name": shard_name(split, k), "instances": len(instances),
                            "tokens": len(arrays["tokens"])})
        splits[split] = {"shards": entries, "instances": sum(e["instances"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries)}
    index = {t: i for i, t in enumerate(vocab)}
    meta = {"format_version": FORMAT_VERSION, "vocab_size": len(vocab), "max_seq_len": max_seq_len,
            "special_ids": {t: index[t] for t in SPECIAL_TOKENS}, "config": {"max_seq_len": max_seq_len},
            "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


def wiki_token_stream() -> tuple[np.ndarray, list[str]]:
    """The embedded Wikipedia paragraphs as one stream of token ids (BERT uncased WordPiece), and the vocabulary."""
    from fastbert.resources import minilm_path, wiki_corpus_path
    from fastbert.tokenizer import Tokenizer

    tok = Tokenizer.from_file(minilm_path() / "vocab.txt").backend_tokenizer
    texts = [e["extract"] for e in json.loads(wiki_corpus_path().read_text(encoding="utf-8")).values()]
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64)
                          for e in tok.encode_batch(texts, add_special_tokens=False)])
    vocab = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return ids, vocab


def full_length_folder(folder: str | os.PathLike, stream: np.ndarray, vocab: Sequence[str], T: int,
                       n: int, shard_sizes: Sequence[int] = (5, 3, 0, 2), seed: int = 0) -> Path:
    """`n` train instances of exactly T − 3 body tokens cut from `stream` (A | B at a random point), in shards
    whose sizes are in the proportions `shard_sizes` (a 0 is an empty shard)."""
    rng = np.random.default_rng(seed)
    L = T - 3
    starts = rng.integers(0, len(stream) - L, size=n)
    cuts = rng.integers(1, L, size=n)
    instances = [(stream[s:s + c], stream[s + c:s + L], bool(r))
                 for s, c, r in zip(starts, cuts, rng.integers(0, 2, size=n), strict=True)]
    bounds = np.round(np.cumsum([0, *shard_sizes]) / sum(shard_sizes) * n).astype(int)
    return write_sharded(folder, {"train": [instances[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]},
                         vocab, T)


# ---------------------------------------------------------------------------------------------- loader
def loader_seq_per_s(data_dir: str | os.PathLike, whole_word: bool, batch: int = LOADER_BATCH,
                     sequences: int = 8192, seed: int = 0) -> float:
    """Sequences per CPU second (one thread) of the training's loader path: a DataLoader over the step sampler,
    `__getitems__` building each batch with its PackedBatch, `keep_batch` as the collate function."""
    import torch

    from train.dataset import PretrainingDataset, StepBatchSampler, keep_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = PretrainingDataset(data_dir, "train", seed=seed, whole_word_mask=whole_word)
        steps = sequences // batch
        sampler = StepBatchSampler(len(ds), batch, 1, 1, 0, seed, start_step=0, num_steps=steps + 1)
        batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=keep_batch))
        next(batches)  # warm: the page cache, the sampler's permutation, first-call costs
        t0 = time.process_time()
        for _ in range(steps):
            next(batches)
        return batch * steps / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)


def run_loader_cases(env: BenchEnv, quick: bool = False, rounds: int = 3, label: str = "",
                     log=print) -> list[Row]:
    """The loader rows (module docstring), each reported as soon as it is measured."""
    stream, vocab = wiki_token_stream()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-data-") as tmp:
        for T in sorted({T for T, _ in LOADER_CASES}):
            n = (4096 if quick else 16384) * 128 // T
            folder = full_length_folder(Path(tmp) / f"T{T}", stream, vocab, T, n)
            for _, wwm in [c for c in LOADER_CASES if c[0] == T]:
                mode = MASKING[wwm]
                log(f"  measuring the loader at T = {T}, {mode} masking ...")
                load = os.getloadavg()[0]
                rates = [loader_seq_per_s(folder, wwm, sequences=2048 if quick else 8192, seed=r)
                         for r in range(rounds)]
                rate = float(np.median(rates))
                rows += report_rows([Row(
                    "data", "loader", f"T={T}", "batch", mode, "-",
                    f"B={LOADER_BATCH} T={T} full-length instances={n} shards=4 (one empty)",
                    ms=1e3 * LOADER_BATCH / rate, seq_per_s=rate,
                    note=f"{label}, load {load:.2f} at start; CPU time, one thread; "
                         f"rounds {', '.join(f'{r:.0f}' for r in rates)} seq/s")], env, "-")
    return rows


# ---------------------------------------------------------------------------------------------- prepare
def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc (a process that ends meanwhile is skipped)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over process `pid` and its descendants, from /proc/PID/smaps_rollup; (0, 0)
    once it is gone. PSS divides a shared page among its processes; RSS counts it in each (an upper bound)."""
    pss = rss = 0
    for p in _descendants(pid):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                          if ":" in line)
            pss += int(fields["Pss"].split()[0]) << 10
            rss += int(fields["Rss"].split()[0]) << 10
        except (OSError, KeyError, ValueError):  # exited between two reads
            continue
    return pss, rss


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_prepare(corpus: Path, out_dir: Path, workers: int, piece_mib: float | None = None,
                interval_s: float = 0.25) -> dict:
    """`python -m train.prepare corpus --out-dir out_dir --max-seq-len 128 --workers N [--piece-mb M]` in a
    subprocess: wall and CPU seconds of its tree (user + sys of it and every descendant it waited for), the peaks
    of `tree_memory` sampled every `interval_s`, the cores other processes kept busy meanwhile, the exit code and
    the output's last lines."""
    # Not much faster than every 0.25 s: reading smaps_rollup walks each process's page tables, and at 0.05 s the
    # sampler alone kept ~0.3 of the 2 cores busy (prepare 120 MiB with 2 workers: 1.77 against 2.07 MiB/s wall).
    argv = [sys.executable, "-m", "train.prepare", str(corpus), "--out-dir", str(out_dir), "--max-seq-len", "128",
            "--workers", str(workers)] + ([] if piece_mib is None else ["--piece-mb", f"{piece_mib:g}"])
    cpu0, busy0, t0 = _children_cpu_s(), _busy_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not done.is_set():
            pss, rss = tree_memory(proc.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    done.set()
    sampler.join()
    return {"wall_s": wall, "cpu_s": cpu, "peak_pss": peak_pss, "peak_rss": peak_rss,
            "others_cores": max(0.0, (_busy_cpu_s() - busy0 - cpu) / wall), "returncode": proc.returncode,
            "tail": out.strip()[-500:]}


def prepare_plan(quick: bool = False) -> list[tuple[float, int]]:
    """(MiB of text, workers) of each prepare run, by size: every size with all cores (prepare's default), and
    the worker-count axis at the middle size (1 vs all cores; `quick`: 1 vs 2)."""
    from train.prepare import cores

    sizes = PREPARE_SIZES_MIB_QUICK if quick else PREPARE_SIZES_MIB
    axis = (1, 2) if quick else (1, cores())
    runs = [(mb, cores()) for mb in sizes] + [(sizes[1], w) for w in axis]
    return sorted(dict.fromkeys(runs), key=lambda r: (r[0], -r[1]))


def run_prepare_cases(env: BenchEnv, quick: bool = False, label: str = "", log=print) -> list[Row]:
    """The prepare rows (module docstring), each reported as soon as its run ends."""
    from train.corpus_text import write_wiki_text
    from train.pieces import plan_pieces
    from train.prepare import PrepareConfig

    piece_mib = PIECE_MIB_QUICK if quick else None
    piece_bytes = int((piece_mib or PrepareConfig().piece_mb) * 2**20)
    plan, rows = prepare_plan(quick), []
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-prepare-") as tmp:
        for mb in dict.fromkeys(mb for mb, _ in plan):
            corpus = Path(tmp) / f"corpus-{mb:g}MiB.txt"
            size = write_wiki_text(corpus, mb)
            shape = f"text={mb:g}MiB pieces={len(plan_pieces([corpus], piece_bytes))} T=128"
            for workers in [w for m, w in plan if m == mb]:
                log(f"  preparing {mb:g} MiB with {workers} worker(s) ...")
                load = os.getloadavg()[0]
                r = run_prepare(corpus, Path(tmp) / "out", workers, piece_mib)
                shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
                row = Row("data", "prepare", f"{mb:g}MiB", f"workers={workers}", "wall", "-", shape)
                if r["returncode"] != 0:
                    row.note = f"{label}; failed (exit {r['returncode']}): {r['tail'][-200:]}"
                else:
                    mib, pss, rss = size / 2**20, r["peak_pss"] / 2**20, r["peak_rss"] / 2**20
                    row.ms, row.gbps, row.peak_GB = 1e3 * r["wall_s"], size / r["wall_s"] / 1e9, r["peak_pss"] / 1e9
                    row.note = (f"{label}, load {load:.2f} at start, others kept {r['others_cores']:.1f} cores busy; "
                                f"{mib / r['wall_s']:.2f} MiB/s wall, {r['cpu_s']:.1f} CPU-s "
                                f"({mib / r['cpu_s']:.2f} MiB per CPU-s), peak of the process tree: "
                                f"PSS {pss:.0f} MiB, RSS {rss:.0f} MiB")
                rows += report_rows([row], env, "-")
            corpus.unlink()
    return rows


def cpu_label() -> str:
    """The CPU's model name and the cores this process may run on (all cores, to fastbert-prepare)."""
    name = "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def describe_data_family(quick: bool = False) -> list[str]:
    """The data family's cases, for `fastbert-bench --dry-run`."""
    loader = ", ".join(f"T={T} {MASKING[wwm]}" for T, wwm in LOADER_CASES)
    plan = prepare_plan(quick)
    runs = ", ".join(f"{mb:g} MiB ({', '.join(f'workers={w}' for m, w in plan if m == mb)})"
                     for mb in dict.fromkeys(mb for mb, _ in plan))
    return [f"  data: loader at {loader} (CPU, one thread)",
            f"  data: fastbert-prepare on {runs} of text"
            + (f" in pieces of {PIECE_MIB_QUICK:g} MiB" if quick else "")]


def run_data_family(env: BenchEnv, quick: bool = False, rounds: int = 3, log=print) -> list[Row]:
    """Every row of the `data` family, each already reported (`report_rows`) when its case was measured."""
    label = cpu_label()
    return run_loader_cases(env, quick, rounds, label, log) + run_prepare_cases(env, quick, label, log)
