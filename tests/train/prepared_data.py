"""Shared by the fastbert-prepare tests: tiny corpora and vocabularies, and a prepared folder read back with numpy
alone (train/shards.py's layout), independently of the training loader."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from train.shards import ARRAYS, load_array, shard_path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = [f"w{i}" for i in range(40)]
MARKER_BASE = len(SPECIAL_TOKENS) + len(WORDS)  # id of the marker word d0 in write_vocab's vocabulary


def write_vocab(path: Path, n_docs: int) -> None:
    tokens = list(SPECIAL_TOKENS) + WORDS + [f"d{i}" for i in range(n_docs)] + [".", ","]
    path.write_text("\n".join(tokens) + "\n")


def write_corpus(path: Path, n_docs: int, seed: int = 0, sentences=(6, 14), words=(3, 9)) -> None:
    """Documents of short sentences, one per line, a blank line between documents; every sentence of document k
    carries the marker word `dk`."""
    rng = random.Random(seed)
    docs = []
    for k in range(n_docs):
        lines = []
        for _ in range(rng.randint(*sentences)):
            body = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
            body.insert(rng.randrange(len(body) + 1), f"d{k}")
            lines.append(" ".join(body) + " .")
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n")


def read_split(folder: Path, split: str) -> dict[str, np.ndarray]:
    """All shards of a split, concatenated in the order meta.json lists them (offsets made global)."""
    meta = json.loads((folder / "meta.json").read_text())
    parts: dict[str, list[np.ndarray]] = {a: [] for a in ARRAYS}
    base = 0
    for shard in meta["splits"][split]["shards"]:
        arrays = {a: load_array(shard_path(folder, shard["name"], a)) for a in ARRAYS}
        assert len(arrays["len_a"]) == len(arrays["is_random_next"]) == len(arrays["offsets"]) - 1
        assert arrays["offsets"][0] == 0 and arrays["offsets"][-1] == len(arrays["tokens"])
        assert (len(arrays["len_a"]), len(arrays["tokens"])) == (shard["instances"], shard["tokens"])
        for a in ("tokens", "len_a", "is_random_next"):
            parts[a].append(arrays[a])
        parts["offsets"].append(arrays["offsets"][:-1] + base)
        base += len(arrays["tokens"])
    parts["offsets"].append(np.array([base]))
    return {a: np.concatenate(p) for a, p in parts.items()}


def instances(folder: Path, split: str) -> list[tuple[list[int], list[int], bool]]:
    """(A, B, is_random_next) of every instance of a split, as token-id lists."""
    s = read_split(folder, split)
    toks, off = s["tokens"].tolist(), s["offsets"].tolist()
    return [(toks[off[i]:off[i] + la], toks[off[i] + la:off[i + 1]], bool(r))
            for i, (la, r) in enumerate(zip(s["len_a"].tolist(), s["is_random_next"].tolist(), strict=True))]


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
