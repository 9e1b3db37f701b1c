"""The prepared-data layout (format 3): one folder, its instances in shards of numpy arrays.

`fastbert-prepare` writes it (train/prepare.py), the pretraining loader reads it (train/dataset.py); this module
is the one place that says what is on disk, so the writer and the reader cannot drift apart.

    fastbert-manifest.json            written last: kind "prepared-data", each file's size and sha256
    meta.json                         format_version 3, options, special-token ids, counts, the shard list:
                                      meta["splits"][split]["shards"] = [{"name", "instances", "tokens"}, ...]
                                      in global order (instance i of the split is found through the cumulative
                                      `instances` counts)
    vocab.txt                         the vocabulary the ids refer to
    shards/{name}.tokens.npy          A and B of every instance back to back (uint16, or int32 past 65,536 ids)
    shards/{name}.offsets.npy         int64 [n + 1], from 0: instance j is tokens[offsets[j]:offsets[j + 1]]
    shards/{name}.len_a.npy           int32 [n]: length of segment A (the rest is B)
    shards/{name}.is_random_next.npy  uint8 [n]: 1 when B is a random span (NSP label 1, as in BERT)

A shard's name is `{split}-{piece:05d}`: piece k of the input gives one train and one held-out shard (either may
hold no instance). Every array is a plain .npy file, read with `allow_pickle=False` (memory-mapped where large).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# 3: sharded (this module). 2: one file set per split, paired as Google's create_pretraining_data.py.
# Older data is refused by name; the embedded corpus's cache is prepared again.
FORMAT_VERSION = 3
SPLITS = ("train", "heldout")
ARRAYS = ("tokens", "offsets", "len_a", "is_random_next")
SHARD_DIR = "shards"

Instance = tuple[Sequence[int], Sequence[int], bool]  # (segment A ids, segment B ids, B is a random span)


def shard_name(split: str, piece: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}-{piece:05d}"


def shard_path(folder: str | os.PathLike, name: str, array: str) -> Path:
    if array not in ARRAYS:
        raise ValueError(f"array must be one of {ARRAYS}, got {array!r}")
    return Path(folder) / SHARD_DIR / f"{name}.{array}.npy"


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def shard_arrays(instances: Sequence[Instance], vocab_size: int) -> dict[str, np.ndarray]:
    """The four arrays of one shard, from its instances in order."""
    lengths = np.fromiter((len(a) + len(b) for a, b, _ in instances), dtype=np.int64, count=len(instances))
    offsets = np.zeros(len(instances) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for a, b, _ in instances for t in (*a, *b)), dtype=token_dtype(vocab_size),
                         count=int(offsets[-1]))
    return {
        "tokens": tokens,
        "offsets": offsets,
        "len_a": np.fromiter((len(a) for a, _, _ in instances), dtype=np.int32, count=len(instances)),
        "is_random_next": np.fromiter((bool(r) for _, _, r in instances), dtype=np.uint8, count=len(instances)),
    }


def load_array(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """np.load of one prepared array; a missing, truncated or corrupt file is an error that names it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; prepare the data again (fastbert-prepare)") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); prepare the data again (fastbert-prepare)") from None
