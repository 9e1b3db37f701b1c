"""The `data` family: how fast pretraining data is loaded and prepared, on the CPU.

    loader    sequences per second per core of the training's loader path — `PretrainingDataset.__getitems__`,
              the batch dict with its `PackedBatch`, exactly what the DataLoader hands the training step — at
              T = 128 and 512, plain and whole-word masking, measured in CPU time (`time.process_time`) on one
              thread. The instances are the worst case: every one full length (T − 3 body tokens), cut from the
              embedded Wikipedia paragraphs tokenized with the BERT uncased vocabulary (real `##` statistics),
              split A | B at a random point, spread over uneven shards (one empty), read in a random order.
    prepare   MB of text per second (wall) and peak memory of the whole process tree (the sum of the RSS of
              the process and its children, sampled from /proc) of `python -m train.prepare` run in a
              subprocess, against corpus size (the embedded paragraphs repeated and reshuffled to 10 / 30 / 120
              MB; `--quick`: 2 / 6 MB) and worker count.

Rows go to `data.csv` with the other families' columns: `ms` = milliseconds per batch (loader) or wall seconds
× 1000 (prepare), `seq_per_s` (loader), `gbps` = GB of text per second (prepare), `peak_GB` (prepare), `shape`
= the case's parameters, `gpu` = the CPU's name and core count.

Caution: the prepare figures are wall-clock on a machine that may be shared: say its load when quoting them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .results import Row

LOADER_CASES = ((128, False), (128, True), (512, False), (512, True))  # (T, whole-word masking)
MASKING = {False: "plain", True: "whole-word"}
LOADER_BATCH = 256
PREPARE_SIZES_MB = (10, 30, 120)
PREPARE_SIZES_MB_QUICK = (2, 6)


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


def run_loader_cases(quick: bool = False, rounds: int = 3, log=print) -> list[Row]:
    """The loader rows: T = 128 and 512, plain and whole-word masking (module docstring)."""
    stream, vocab = wiki_token_stream()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-data-") as tmp:
        for T in sorted({T for T, _ in LOADER_CASES}):
            n = (4096 if quick else 16384) * 128 // T
            folder = full_length_folder(Path(tmp) / f"T{T}", stream, vocab, T, n)
            for _, wwm in [c for c in LOADER_CASES if c[0] == T]:
                mode = MASKING[wwm]
                log(f"  measuring the loader at T = {T}, {mode} masking ...")
                rates = [loader_seq_per_s(folder, wwm, sequences=2048 if quick else 8192, seed=r)
                         for r in range(rounds)]
                rate = float(np.median(rates))
                rows.append(Row("data", "loader", f"T={T}", "batch", mode, "-",
                                f"B={LOADER_BATCH} T={T} full-length instances={n} shards=4 (one empty)",
                                ms=1e3 * LOADER_BATCH / rate, seq_per_s=rate,
                                note=f"CPU time, one thread; rounds {', '.join(f'{r:.0f}' for r in rates)} seq/s"))
    return rows


# ---------------------------------------------------------------------------------------------- prepare
def write_corpus(path: str | os.PathLike, megabytes: float, seed: int = 0) -> Path:
    """A text corpus of about `megabytes` MB: the embedded Wikipedia lead sections (one document each, a line per
    paragraph), repeated, each pass in a new random order, in fastbert-prepare's text format (a blank line between
    documents)."""
    from fastbert.resources import wiki_corpus_path

    entries = json.loads(wiki_corpus_path().read_text(encoding="utf-8")).values()
    docs = ["\n".join(line for line in e["extract"].splitlines() if line.strip()) for e in entries]  # no blank line
    docs = [d.encode("utf-8") + b"\n\n" for d in docs if d]
    rng, left, path = random.Random(seed), int(megabytes * 1e6), Path(path)
    with open(path, "wb") as f:
        while left > 0:
            rng.shuffle(docs)
            for d in docs:
                f.write(d)
                left -= len(d)
                if left <= 0:
                    break
    return path


def tree_rss(pid: int) -> int:
    """Bytes resident in process `pid` and all its descendants (the sum of their RSS; shared pages count once
    per process, so this is an upper bound), read from /proc; 0 once the process is gone."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):  # exited between two reads
            continue
    return total


def run_prepare(corpus: Path, out_dir: Path, workers: int | None, interval_s: float = 0.05) -> dict:
    """`python -m train.prepare corpus --out-dir out_dir --max-seq-len 128 [--workers N]` in a subprocess: wall
    seconds, the peak of `tree_rss` sampled every `interval_s`, the exit code and the output's last lines."""
    argv = [sys.executable, "-m", "train.prepare", str(corpus), "--out-dir", str(out_dir), "--max-seq-len", "128"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"wall_s": wall, "peak_bytes": peak, "returncode": proc.returncode, "tail": out.strip()[-500:]}


def prepare_has_workers() -> bool:
    """Whether this version of fastbert-prepare takes --workers."""
    from train.prepare import build_parser

    return "--workers" in build_parser().format_help()


def run_prepare_cases(quick: bool = False, log=print) -> list[Row]:
    """The prepare rows: MB/s and peak memory against corpus size (default worker count), and against the
    worker count at the middle size; a skipped row says why when prepare has no --workers."""
    sizes = PREPARE_SIZES_MB_QUICK if quick else PREPARE_SIZES_MB
    cores = os.cpu_count() or 1
    plan: list[tuple[float, int | None]] = [(mb, None) for mb in sizes]
    rows = []
    if prepare_has_workers():
        plan += [(sizes[1], w) for w in sorted({1, cores})]
    else:
        rows.append(Row("data", "prepare", f"{sizes[1]:g}MB", "workers=N", "wall", "-", "", note=(
            "skipped: this fastbert-prepare has no --workers option (it prepares in one process)")))
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-prepare-") as tmp:
        for mb in sizes:
            corpus = write_corpus(Path(tmp) / f"corpus-{mb:g}MB.txt", mb)
            for _, workers in [c for c in plan if c[0] == mb]:
                name = "default" if workers is None else f"workers={workers}"
                log(f"  preparing {mb:g} MB with {name} ...")
                r = run_prepare(corpus, Path(tmp) / "out", workers)
                shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
                shape = f"text={mb:g}MB T=128 cores={cores}"
                if r["returncode"] != 0:
                    rows.append(Row("data", "prepare", f"{mb:g}MB", name, "wall", "-", shape,
                                    note=f"failed (exit {r['returncode']}): {r['tail'][-200:]}"))
                    continue
                size = corpus.stat().st_size
                rows.append(Row("data", "prepare", f"{mb:g}MB", name, "wall", "-", shape, ms=1e3 * r["wall_s"],
                                gbps=size / r["wall_s"] / 1e9, peak_GB=r["peak_bytes"] / 1e9,
                                note=f"{size / r['wall_s'] / 1e6:.2f} MB/s wall, peak RSS of the process tree "
                                     f"{r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_bytes'] / size:.1f}x the text)"))
    return rows


def cpu_label() -> str:
    """The CPU's model name and core count, and the load average when the run started (wall figures depend on
    it)."""
    name = "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} cores{load}"


def describe_data_family(quick: bool = False) -> list[str]:
    """The data family's cases, for `fastbert-bench --dry-run`."""
    sizes = ", ".join(f"{mb:g}" for mb in (PREPARE_SIZES_MB_QUICK if quick else PREPARE_SIZES_MB))
    loader = ", ".join(f"T={T} {MASKING[wwm]}" for T, wwm in LOADER_CASES)
    lines = [f"  data: loader at {loader} (CPU, one thread); fastbert-prepare on {sizes} MB of text"]
    if not prepare_has_workers():
        lines.append("    skipped the worker-count axis: this fastbert-prepare has no --workers option")
    return lines


def run_data_family(quick: bool = False, rounds: int = 3, log=print) -> list[Row]:
    """Every row of the `data` family, each note prefixed with the CPU it ran on."""
    label = cpu_label()
    rows = run_loader_cases(quick, rounds, log) + run_prepare_cases(quick, log)
    for r in rows:
        r.note = f"{label}; {r.note}"
    return rows
