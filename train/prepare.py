"""Pretraining data creation: plain text → sentence-pair instances in shards of memory-mappable arrays.

The original BERT's `create_pretraining_data.py` minus the masking (done at load time by `train.dataset`, with
a fresh seeded draw every epoch), run piece by piece so that memory does not grow with the corpus:

    pieces      the inputs cut into document-aligned pieces of about --piece-mb (train/pieces.py: text with one
                sentence or paragraph per line and blank lines between documents, JSON Lines, or the embedded
                Wikipedia JSON); a piece is one task that reads and holds only its own text
    sentences   `split_sentences` (train/pieces.py), a small rule-based splitter
    tokens      WordPiece through the `tokenizers` package: a given vocab.txt (default: the MiniLM one, the
                uncased vocabulary of the original BERT), or a new one of --vocab-size trained on a sample of
                about --vocab-sample-mb spread over all pieces (the whole corpus when it is smaller)
    splits      a document is held out when a hash of its text keyed by the seed falls below
                --heldout-fraction: the same text is in the same split wherever it occurs, and no held-out text
                is trained on
    instances   [CLS] A [SEP] B [SEP] up to max_seq_len by the original's selection rules (train/instances.py),
                within one piece and one split: a random-next B comes from another document of the same piece
    shards      piece k gives the shards train-{k:05d} and heldout-{k:05d}; the layout is train/shards.py's

Parallel: the pieces run in a process pool (--workers, all cores by default) or on a Dask cluster
(--dask-scheduler ADDRESS; its workers must have fastbert installed and see the inputs and the output's parent
folder at the same paths). A piece's random draws depend on (seed, piece, split) only and the pieces on the
inputs and --piece-mb only, so the output is the same, byte for byte, whatever the workers.

Resumable: each finished piece is written atomically (its arrays by temp + rename, then a marker) into a work
folder beside the output, `.NAME.work-KEY`, KEY a hash of the input paths, the vocabulary and every option that
changes the output; a marker also records its input file's size and modification time. Run again after a kill
or an error, the same command reuses every piece whose marker still matches and gives the bytes an
uninterrupted run gives; another command never sees them (another KEY). When all pieces are done the output is
assembled under a temporary sibling (hard links, no copy), its manifest written last, and swapped in by rename
(fastbert/_atomic.py); then the work folder is removed. A failed or interrupted run leaves its work folder for
the next one (never the output); the next complete run of the same output removes the ones left behind.
An existing --out-dir is replaced only when it is empty or a previous fastbert-prepare output; anything else is
refused unless --overwrite, and the working directory or a folder holding an input never.

Progress (pieces, MB/s, time left) is a live bar on a terminal and a line every 30 s otherwise.

Caution: the held-out share is met in expectation (a hash), not exactly, and a piece's held-out documents draw
their random B among themselves — with a single one, from itself, as Google's code does. Memory: a task holds
about 10× its piece (the arrays of dupe_factor passes and the tokens). Throughput is bound by WordPiece
tokenization, 1.5 to 2 MB/s of text per core.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastbert._atomic import (
    _pid_alive,
    absolute,
    atomic_folder,
    fault_point,
    manifest_kind,
    recover,
    refuse_dangerous_target,
    sha256_file,
    verify_manifest,
    write_text_atomic,
)
from fastbert.tokenizer import SPECIAL_TOKENS, Tokenizer

from .cli import add_config_arguments
from .instances import TokenDocs, create_instances, instance_arrays, tokenize_documents
from .pieces import Piece, plan_pieces, read_piece, sample_documents
from .shards import (
    ARRAYS,
    FORMAT_VERSION,
    SHARD_DIR,
    SPLITS,
    shard_name,
    shard_path,
)

DATA_KIND = "prepared-data"  # the manifest kind of a fastbert-prepare output
# What a format-1 output (written before manifests) holds: recognised as fastbert's own, so it is replaced.
_OUTPUT_NAMES = frozenset({"meta.json", "vocab.txt"} | {f"{s}.{a}.npy" for s in SPLITS for a in ARRAYS})
# The options that change the output: they name the work folder and are recorded in meta.json.
OUTPUT_OPTIONS = ("lowercase", "max_seq_len", "dupe_factor", "short_seq_prob", "split_single_sentence",
                  "heldout_fraction", "seed", "piece_mb", "vocab_size", "vocab_sample_mb")
TOKENIZE_BATCH = 4096  # sentences per tokenizer call: bounds the tokenizer's per-token objects
PROGRESS_EVERY_S = 30.0  # a progress line this often when the output is not a terminal
_MB = 1 << 20


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PrepareConfig:
    out_dir: str = "runs/data/wiki-128"  # output directory (one per sequence length)
    inputs: tuple[str, ...] = ()  # text / .jsonl / .json files; empty = the embedded Wikipedia lead paragraphs
    vocab: str | None = None  # vocab.txt; None = the MiniLM (original BERT uncased) vocabulary
    vocab_size: int = 0  # > 0: train a new WordPiece vocabulary of this size on the corpus instead
    vocab_sample_mb: float = 64.0  # with vocab_size: train it on about this much text, spread over the corpus
    lowercase: bool = True  # the default vocabulary is uncased
    max_seq_len: int = 128  # 128 for phase 1, 512 for phase 2
    dupe_factor: int = 5  # passes over the corpus, each packed and paired differently (BERT used 10)
    short_seq_prob: float = 0.1  # fraction of documents packed to a random shorter length
    split_single_sentence: bool = False  # cut a one-sentence chunk inside the sentence instead of always
    #                                      pairing it with a random B (off = the original BERT's rule)
    heldout_fraction: float = 0.02  # of the documents, for evaluation (0 = no held-out split)
    seed: int = 12345
    piece_mb: float = 16.0  # input text per piece (one task, one shard per split): a task's memory is about
    #                         10× this, whatever the corpus
    workers: int = 0  # processes preparing pieces at once; 0 = all cores (the output does not depend on it)
    dask_scheduler: str | None = None  # run the pieces on this Dask cluster instead (e.g. tcp://host:8786)
    overwrite: bool = False  # replace an out_dir that is not a previous fastbert-prepare output (deleting it)

    def validate(self) -> None:
        if not 8 <= self.max_seq_len <= 4096:
            raise ValueError(f"max_seq_len must be in [8, 4096], got {self.max_seq_len}")
        if self.dupe_factor < 1:
            raise ValueError(f"dupe_factor must be >= 1, got {self.dupe_factor}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.vocab_size < 0 or 0 < self.vocab_size < len(SPECIAL_TOKENS) + 100:
            raise ValueError(f"vocab_size must be 0 or at least {len(SPECIAL_TOKENS) + 100}, got {self.vocab_size}")
        if self.vocab is not None and self.vocab_size:
            raise ValueError("give either vocab (an existing vocab.txt) or vocab_size (train one), not both")
        if self.piece_mb <= 0 or self.vocab_sample_mb <= 0:
            raise ValueError(f"piece_mb and vocab_sample_mb must be > 0, got {self.piece_mb}, {self.vocab_sample_mb}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = all cores), got {self.workers}")


# ---------------------------------------------------------------------------------------------- vocabulary
def default_vocab_path() -> Path:
    """The uncased BERT WordPiece vocabulary shipped with the MiniLM checkpoint."""
    from fastbert.resources import minilm_path

    return minilm_path() / "vocab.txt"


def train_vocab(documents: Iterable[Sequence[str]], vocab_size: int, lowercase: bool = True) -> list[str]:
    """A new WordPiece vocabulary of at most `vocab_size` tokens, trained on the documents' sentences: the
    special tokens first, then the rest sorted (the trainer orders tokens of equal frequency differently from
    one process to the next, so its own order would change the ids between identical runs)."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=lowercase)
    tok.train_from_iterator(
        (s for d in documents for s in d), vocab_size=vocab_size, min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
    )
    return [*SPECIAL_TOKENS, *sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)]


def resolve_vocab(cfg: PrepareConfig, given: Path | None, pieces: Sequence[Piece], work: WorkFolder,
                  log: Callable[[str], None]) -> Path:
    """The vocab.txt the pieces are tokenized with, in the work folder (where every worker, Dask's included,
    finds it): a copy of the given one, or one trained on a sample of the corpus (a resumed run uses the same)."""
    path = work.path / "vocab.txt"
    if given is not None:
        shutil.copyfile(given, path)  # copied again by every run of the command: a kill mid-copy does no harm
        return path
    if path.is_file():
        log(f"using the vocabulary trained by an interrupted run of this command ({path})")
        return path
    read: dict = {}
    tokens = train_vocab(sample_documents(pieces, int(cfg.vocab_sample_mb * _MB), read), cfg.vocab_size,
                         cfg.lowercase)
    write_text_atomic(path, "\n".join(tokens) + "\n")
    fault_point("prepare:vocab-written")
    log(f"trained a WordPiece vocabulary of {len(tokens)} tokens on {_megabytes(read['bytes'])} "
        f"({read['documents']} documents) of the corpus's {_megabytes(sum(p.nbytes for p in pieces))}")
    return path


def _megabytes(n: int) -> str:
    return f"{n / _MB:,.1f} MB" if n >= _MB else f"{n / _MB:.3f} MB"


def load_tokenizer(vocab: Path, lowercase: bool):
    return Tokenizer.from_file(vocab, lowercase=lowercase).backend_tokenizer


# ---------------------------------------------------------------------------------------------- work folder
class WorkFolder:
    """Where one command's finished pieces wait for the end of the run (see the module docstring):

        .NAME.work-KEY/owner.json                   the process id of the run using it
        .NAME.work-KEY/vocab.txt                    a vocabulary trained by this command
        .NAME.work-KEY/shards/{shard}.{array}.npy   as in the output
        .NAME.work-KEY/pieces/{piece:05d}.json      a piece's marker, written last: the piece as planned, its
                                                    counts and the sizes of its arrays
    """

    def __init__(self, out_dir: Path, key: str):
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.work-{key}"

    def open(self) -> None:
        """Take the folder (made if new); refused while another live process holds it (the same command, running
        twice at once: the first to finish would remove the folder under the other)."""
        owner = _owner(self.path)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            raise ValueError(f"another fastbert-prepare (process {owner}) is preparing {self.out_dir} with the same "
                             f"inputs and options right now (work folder {self.path.name}); wait for it to finish "
                             "or stop it, then run this command again to reuse what it finished")
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (self.path / "pieces").mkdir(exist_ok=True)
        write_text_atomic(self.path / "owner.json", json.dumps({"pid": os.getpid()}))

    def marker(self, index: int) -> Path:
        return self.path / "pieces" / f"{index:05d}.json"

    def finished(self, piece: Piece) -> dict | None:
        """The statistics of `piece` when a task finished it as it is planned now, its arrays all there."""
        try:
            stats = json.loads(self.marker(piece.index).read_text(encoding="utf-8"))
            sizes = {shard_path(self.path, shard_name(split, piece.index), a): stats["splits"][split]["files"][a]
                     for split in SPLITS for a in ARRAYS}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if stats.get("piece") != asdict(piece):  # planned differently: its input file changed
            return None
        if not all(path.is_file() and path.stat().st_size == size for path, size in sizes.items()):
            return None
        return stats

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def remove_abandoned(self) -> None:
        """Remove the work folders of this output left by runs whose process is gone (only folders fastbert
        made: the name's pattern and an owner.json naming the process)."""
        pattern = re.compile(rf"\.{re.escape(self.out_dir.name)}\.work-[0-9a-f]{{16}}")
        for folder in self.out_dir.parent.iterdir():
            if not pattern.fullmatch(folder.name) or folder == self.path or not folder.is_dir():
                continue
            pid = _owner(folder)
            if pid is not None and not _pid_alive(pid):
                shutil.rmtree(folder, ignore_errors=True)


def _owner(work_folder: Path) -> int | None:
    """The process id in a work folder's owner.json; None when there is none readable."""
    try:
        return int(json.loads((work_folder / "owner.json").read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def work_key(cfg: PrepareConfig, inputs: Sequence[str], pieces: Sequence[Piece], vocab: Path | None) -> str:
    """What names the work folder: the format, the output options, the input paths and the vocabulary (its
    sha256; a trained one depends on the whole corpus as planned now, so on every piece)."""
    ident: dict = {"format": FORMAT_VERSION, "options": {k: getattr(cfg, k) for k in OUTPUT_OPTIONS},
                   "inputs": [str(absolute(p)) for p in inputs]}
    if vocab is None:
        ident["pieces"] = [asdict(p) for p in pieces]
    else:
        ident["vocab_sha256"] = sha256_file(vocab)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- one piece
def is_heldout(sentences: Sequence[str], seed: int, fraction: float) -> bool:
    """Whether a document is held out: a hash of its text keyed by the seed, below `fraction` of its range."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b("\n".join(sentences).encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


def _batches(documents: Iterable[tuple[list[str], int]], sentences: int) -> Iterator[list[tuple[list[str], int]]]:
    """Consecutive documents grouped into lists of at least `sentences` sentences (the last one fewer)."""
    batch, n = [], 0
    for doc in documents:
        batch.append(doc)
        n += len(doc[0])
        if n >= sentences:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def save_array(path: Path, values: np.ndarray) -> None:
    """np.save to a temporary name, fsync, rename: the file is complete or absent. (A temporary file left by a
    failure is replaced by the next attempt, or goes with the work folder.)"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, values, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_piece(cfg: PrepareConfig, piece: Piece, work: WorkFolder, vocab: str) -> dict:
    """One task, run here, in a pool worker or on a Dask worker: the two shards of `piece` written into the
    work folder, then its marker; returns the marker's statistics. Holds only this piece."""
    tok = load_tokenizer(Path(vocab), cfg.lowercase)
    docs = {split: TokenDocs() for split in SPLITS}
    stats: dict = {"piece": asdict(piece), "bytes": 0, "cut_documents": 0, "long_sentences": 0,
                   "long_sentence_pieces": 0, "splits": {}}
    for batch in _batches(read_piece(piece, stats), TOKENIZE_BATCH):
        ids = tokenize_documents(tok, [sentences for sentences, _ in batch], cfg.max_seq_len - 3, stats)
        for (sentences, nbytes), doc in zip(batch, ids, strict=True):
            stats["bytes"] += nbytes
            docs["heldout" if is_heldout(sentences, cfg.seed, cfg.heldout_fraction) else "train"].add(doc)
    for split in SPLITS:
        rng = random.Random(f"{cfg.seed}:{piece.index}:{split}")
        instances = create_instances(docs[split], cfg.max_seq_len, cfg.dupe_factor, cfg.short_seq_prob, rng,
                                     cfg.split_single_sentence)
        arrays = instance_arrays(docs[split], instances, tok.get_vocab_size())
        name = shard_name(split, piece.index)
        for array in ARRAYS:
            save_array(shard_path(work.path, name, array), arrays[array])
            fault_point(f"prepare:piece-{piece.index:05d}:{split}.{array}-written")
        stats["splits"][split] = {
            "documents": len(docs[split]), "instances": len(instances), "tokens": int(arrays["offsets"][-1]),
            "random_next": int(arrays["is_random_next"].sum()),
            "files": {a: shard_path(work.path, name, a).stat().st_size for a in ARRAYS},
        }
    write_text_atomic(work.marker(piece.index), json.dumps(stats, indent=1))
    fault_point(f"prepare:piece-{piece.index:05d}:done")
    return stats


# ---------------------------------------------------------------------------------------------- running
class Progress:
    """Pieces done, MB/s and time left: a live bar on a terminal (stderr), else a line through `log` every
    PROGRESS_EVERY_S seconds and at the end — no carriage-return bars in a log file."""

    def __init__(self, pieces: Sequence[Piece], finished: Iterable[int], log: Callable[[str], None]):
        from tqdm.auto import tqdm

        finished = set(finished)
        self.log, self.count, self.total = log, len(finished), len(pieces)
        self.total_bytes = sum(p.nbytes for p in pieces)
        self.done_bytes = sum(p.nbytes for p in pieces if p.index in finished)
        self.run_bytes = 0
        self.t0 = self.last = time.monotonic()
        self.bar = tqdm(total=self.total_bytes, initial=self.done_bytes, unit="B", unit_scale=True,
                        unit_divisor=1024, desc="prepare", disable=None, dynamic_ncols=True)  # None: off unless a tty
        self.format_interval = tqdm.format_interval

    def update(self, nbytes: int) -> None:
        self.count += 1
        self.done_bytes += nbytes
        self.run_bytes += nbytes
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{self.count}/{self.total} pieces", refresh=False)
            self.bar.update(nbytes)
        elif time.monotonic() - self.last >= PROGRESS_EVERY_S or self.count == self.total:
            self.last = time.monotonic()
            self.log(self.line())

    def line(self) -> str:
        rate = self.run_bytes / max(time.monotonic() - self.t0, 1e-9)
        left = self.format_interval((self.total_bytes - self.done_bytes) / rate) if rate else "?"
        digits = 0 if self.total_bytes >= 100 * _MB else 2
        return (f"prepare: {self.count}/{self.total} pieces, {self.done_bytes / _MB:.{digits}f} of "
                f"{self.total_bytes / _MB:.{digits}f} MB, {rate / _MB:.2f} MB/s, {left} left")

    def close(self) -> None:
        self.bar.close()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops handing out pieces
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism


def run_pieces(cfg: PrepareConfig, todo: Sequence[Piece], work: WorkFolder, vocab: Path,
               on_done: Callable[[dict], None]) -> None:
    """make_piece for every piece of `todo`: on the Dask cluster, in a pool of processes, or here (one worker or
    one piece); `on_done(stats)` in this process as each finishes, in any order."""
    task = functools.partial(make_piece, cfg, work=work, vocab=str(vocab))
    if cfg.dask_scheduler:
        _run_on_dask(cfg.dask_scheduler, task, todo, on_done)
        return
    n = min(cfg.workers or cores(), len(todo))
    if n <= 1:
        for piece in todo:
            on_done(task(piece))
        return
    # fork: the workers start at once and share the parent's pages (a fresh interpreter per worker would
    # import torch again, ~150 MB each).
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init)
    try:
        for future in as_completed([pool.submit(task, piece) for piece in todo]):
            on_done(future.result())
    except BrokenProcessPool:
        raise RuntimeError("a worker process died (out of memory? try fewer --workers or a smaller --piece-mb); "
                           "the pieces finished so far are kept: run the same command again to go on") from None
    except KeyboardInterrupt:
        print("fastbert-prepare: stopping once the pieces in progress are written ...", file=sys.stderr, flush=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_on_dask(address: str, task: Callable[[Piece], dict], todo: Sequence[Piece],
                 on_done: Callable[[dict], None]) -> None:
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError:
        raise ValueError("--dask-scheduler needs Dask: pip install 'dask[distributed]'") from None
    try:
        client = Client(address, timeout="30s")
    except OSError as e:  # TimeoutError included
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    with client:
        futures = client.map(task, todo, pure=False)
        try:
            for future in dask_completed(futures):
                on_done(future.result())
        finally:
            client.cancel(futures)


def prepare_pieces(cfg: PrepareConfig, pieces: Sequence[Piece], work: WorkFolder, vocab: Path,
                   log: Callable[[str], None]) -> list[dict]:
    """Every piece's statistics, in order: the ones an earlier run of this command finished, the rest made now."""
    results = {p.index: stats for p in pieces if (stats := work.finished(p)) is not None}
    todo = [p for p in pieces if p.index not in results]
    where = (f"on the Dask cluster at {cfg.dask_scheduler}" if cfg.dask_scheduler
             else f"with {max(1, min(cfg.workers or cores(), len(todo)))} process(es)")
    reused = f" ({len(results)} finished by an earlier run of this command)" if results else ""
    log(f"preparing {len(todo)} of {len(pieces)} piece(s) of ≤ {cfg.piece_mb:g} MB {where}{reused}")
    progress = Progress(pieces, results, log)

    def on_done(stats: dict) -> None:
        results[stats["piece"]["index"]] = stats
        progress.update(stats["piece"]["nbytes"])

    try:
        run_pieces(cfg, todo, work, vocab, on_done)
    finally:
        progress.close()
    return [results[p.index] for p in pieces]


# ---------------------------------------------------------------------------------------------- output
def split_totals(results: Sequence[dict]) -> dict:
    """meta.json's `splits`: per split the totals and its shards in global order."""
    splits = {}
    for split in SPLITS:
        per_piece = [(stats["piece"]["index"], stats["splits"][split]) for stats in results]
        splits[split] = {
            **{k: sum(s[k] for _, s in per_piece) for k in ("documents", "instances", "tokens", "random_next")},
            "shards": [{"name": shard_name(split, i), "instances": s["instances"], "tokens": s["tokens"]}
                       for i, s in per_piece],
        }
    return splits


def check_counts(inputs: Sequence[str], results: Sequence[dict], splits: dict) -> None:
    """ValueError for an input with no text, or a corpus too small to pair."""
    documents: dict[str, int] = {}
    for stats in results:
        path = stats["piece"]["path"]
        documents[path] = documents.get(path, 0) + sum(s["documents"] for s in stats["splits"].values())
    for given in inputs:
        if not documents.get(str(absolute(given))):
            raise ValueError(f"input file {given} is empty (no text)")
    if splits["train"]["documents"] < 2:
        raise ValueError("need at least 2 documents for training to draw random next segments from, got "
                         f"{splits['train']['documents']} (after {splits['heldout']['documents']} held out)")
    if splits["train"]["instances"] == 0:
        raise ValueError("the corpus produced no training instances")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the work folder keeps its copy until the output is in place
    except OSError:
        shutil.copyfile(src, dst)


def assemble(cfg: PrepareConfig, inputs: Sequence[str], vocab: Path, given_vocab: Path | None,
             results: Sequence[dict], work: WorkFolder, out_dir: Path) -> dict:
    """The output folder from the finished pieces (folder-atomic, manifest last); returns its meta."""
    tok = load_tokenizer(vocab, cfg.lowercase)
    splits = split_totals(results)
    check_counts(inputs, results, splits)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": {"inputs": list(inputs), "vocab": None if given_vocab is None else str(given_vocab),
                   **{k: getattr(cfg, k) for k in OUTPUT_OPTIONS}},
        "vocab_size": tok.get_vocab_size(),
        "special_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "max_seq_len": cfg.max_seq_len,
        "input_bytes": sum(s["bytes"] for s in results),
        "notes": {k: sum(s[k] for s in results) for k in ("long_sentences", "long_sentence_pieces", "cut_documents")},
        "splits": splits,
    }
    with atomic_folder(out_dir, DATA_KIND, format_version=FORMAT_VERSION) as tmp:
        (tmp / SHARD_DIR).mkdir()
        for split in SPLITS:
            for shard in splits[split]["shards"]:
                for array in ARRAYS:
                    _link_or_copy(shard_path(work.path, shard["name"], array), shard_path(tmp, shard["name"], array))
        shutil.copyfile(vocab, tmp / "vocab.txt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a complete dataset of this format. Its manifest (when there is one) is checked
    for sizes — cheap, and it catches truncated files — and ValueError names a file that does not match."""
    out_dir = Path(out_dir)
    recover(out_dir)
    meta = out_dir / "meta.json"
    if not meta.is_file():
        return False
    verify_manifest(out_dir, hashes=False)
    return data_format(out_dir) == FORMAT_VERSION


def data_format(out_dir: str | os.PathLike):
    """The `format_version` recorded in out_dir/meta.json; None without a readable one."""
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None


def _is_own_output(folder: Path) -> bool:
    """A previous fastbert-prepare output: its manifest says so, or (written before manifests) it holds only the
    files prepare wrote then, meta.json included."""
    if manifest_kind(folder) == DATA_KIND:
        return True
    names = {p.name for p in folder.iterdir()}
    return "meta.json" in names and names <= _OUTPUT_NAMES


def check_out_dir(out_dir: Path, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """The refusal rule of the module docstring (ValueError, one line)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    refuse_dangerous_target(out_dir, "--out-dir", protected=inputs)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite and not _is_own_output(out_dir):
        raise ValueError(f"--out-dir {out_dir} exists and is not a fastbert-prepare output; choose a new or empty "
                         "folder, or pass --overwrite to replace it (its files are deleted)")


# ---------------------------------------------------------------------------------------------- API
def prepare(cfg: PrepareConfig, log: Callable[[str], None] = print) -> dict:
    """Create the dataset directory described in the module docstring, resuming what an interrupted run of the
    same command finished; returns its metadata."""
    cfg.validate()
    t0 = time.time()
    if cfg.inputs:
        inputs = [str(p) for p in cfg.inputs]
    else:
        from fastbert.resources import wiki_corpus_path

        inputs = [str(wiki_corpus_path())]
    given_vocab = None if cfg.vocab_size else Path(cfg.vocab) if cfg.vocab else default_vocab_path()
    if given_vocab is not None:
        if not given_vocab.is_file():
            raise FileNotFoundError(f"vocab file not found: {given_vocab}")
        load_tokenizer(given_vocab, cfg.lowercase)  # a vocabulary it cannot use fails here, before any work
    out_dir = absolute(cfg.out_dir)
    recover(out_dir)
    check_out_dir(out_dir, cfg.overwrite, [*inputs, *([cfg.vocab] if cfg.vocab else [])])
    pieces = plan_pieces([absolute(p) for p in inputs], max(1, int(cfg.piece_mb * _MB)))
    work = WorkFolder(out_dir, work_key(cfg, inputs, pieces, given_vocab))
    work.open()
    vocab = resolve_vocab(cfg, given_vocab, pieces, work, log)
    results = prepare_pieces(cfg, pieces, work, vocab, log)
    fault_point("prepare:pieces-done")
    meta = assemble(cfg, inputs, vocab, given_vocab, results, work, out_dir)
    work.remove()
    work.remove_abandoned()
    notes, c, h = meta["notes"], meta["splits"]["train"], meta["splits"]["heldout"]
    if notes["long_sentences"]:
        log(f"note: {notes['long_sentences']} sentence(s) longer than {cfg.max_seq_len - 3} tokens (one giant "
            f"'sentence' each) were cut into {notes['long_sentence_pieces']} pieces")
    if notes["cut_documents"]:
        log(f"note: {notes['cut_documents']} document(s) longer than a piece were cut at a piece boundary")
    log(
        f"wrote {out_dir}: {c['instances']} train / {h['instances']} held-out instances of ≤ {cfg.max_seq_len} "
        f"tokens ({c['tokens'] / max(1, c['instances']):.1f} tokens each, "
        f"{c['random_next'] / max(1, c['instances']):.1%} random next) from {c['documents']} + {h['documents']} "
        f"documents, {meta['input_bytes'] / _MB:.1f} MB in {len(pieces)} piece(s), in {time.time() - t0:.1f} s"
    )
    return meta


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastbert-prepare",
        description="Make BERT pretraining instances (NSP pairs; masking happens at load time) from plain text.",
    )
    p.add_argument("inputs", nargs="*", help="text files (one sentence or paragraph per line, a blank line between "
                   "documents), .jsonl files (one {\"text\": ...} document per line) or .json title→{extract} "
                   "files; default: the embedded Wikipedia lead paragraphs")
    add_config_arguments(p, PrepareConfig, exclude=("inputs",))
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = vars(build_parser().parse_args(None if argv is None else list(argv)))
    cfg = PrepareConfig(inputs=tuple(args.pop("inputs")), **args)
    try:
        prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastbert-prepare: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"fastbert-prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastbert-prepare: interrupted; {cfg.out_dir} is unchanged, the pieces finished so far are kept: "
              "run the same command again to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
