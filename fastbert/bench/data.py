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
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LOADER_CASES = ((128, False), (128, True), (512, False), (512, True))  # (T, whole-word masking)
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
    """Sequences per CPU second of `__getitems__` (batch dict + PackedBatch) over random batches, one thread."""
    import torch

    from train.dataset import PretrainingDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = PretrainingDataset(data_dir, "train", seed=seed, whole_word_mask=whole_word)
        perm = np.random.default_rng(seed).permutation(len(ds))
        keys = [[(1, int(i)) for i in perm[(k * batch) % len(ds):][:batch]] for k in range(sequences // batch)]
        ds.__getitems__(keys[0])  # warm (page cache, first-call costs)
        t0 = time.process_time()
        for k in keys:
            ds.__getitems__(k)
        return batch * len(keys) / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
