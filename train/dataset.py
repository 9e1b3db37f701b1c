"""Loading pretraining instances (the sharded layout of train/shards.py) as masked batches, and the step-indexed
batch order.

`PretrainingDataset` reads one split of a prepared folder: every shard's arrays are memory-mapped (no shard is
read whole), and instance i of the split is found through a global index — `np.searchsorted` on the cumulative
instance counts of the shards, empty shards included. `batch(keys)` (also `__getitems__`, which PyTorch's
DataLoader calls with each list of keys of a batch sampler) builds a whole batch in numpy: the instances gathered
shard by shard, [CLS] A [SEP] B [SEP] laid out for all rows at once, padded to the batch's longest sequence
rounded up to a multiple of 8, masked by `train.masking.mask_batch`, with its `PackedBatch` — the batch `collate`
makes from the same items. `__getitem__` gives one item, padded to `max_seq_len`, equal to its row of any batch.

Masking happens here, at load time, with counter-based randomness keyed by (seed, epoch, index): every epoch masks
each instance afresh (RoBERTa-style dynamic masking), yet any item is reproducible on its own, whichever batch,
data-loader worker or DDP rank it lands in — which is what makes `--resume` exact. `fixed_masking` masks as epoch 0
whatever the epoch (evaluation). The rule is Google's (train/masking.py): round(15 %) of all the sequence's tokens,
[CLS] and [SEP] counted, at most `max_predictions`, never [CLS] / [SEP] / padding, 80/10/10; `whole_word_mask`
takes words (a token and the `##` pieces after it) whole. `max_predictions` defaults to ceil(15 % of the sequence
length) — 20 at 128 tokens, 77 at 512 (Google: 20 and 80), which round(15 %) of a sequence of the dataset's length
never exceeds — and a warning says when a given cap binds on more than 10 % of a split's sequences.

Caution: construction reads every shard's per-instance arrays (offsets, len_a: 12 bytes per instance) once, to
check them and to count how often the cap binds; token ids are checked against the vocabulary as batches are
read. A batch whose rows come from many shards costs a few numpy calls per shard. The memory maps are inherited
by forked data-loader workers; a spawned worker would receive a pickled copy of the arrays.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastbert.packing import PackedBatch

from .masking import IGNORE_INDEX, default_max_predictions, mask_batch, num_to_predict, row_keys
from .shards import ARRAYS, FORMAT_VERSION, SPLITS, load_array, shard_path

__all__ = ["IGNORE_INDEX", "PretrainingDataset", "StepBatchSampler", "collate", "default_max_predictions",
           "keep_batch"]

Key = int | tuple[int, int]  # an index (masked for the dataset's epoch) or (epoch, index)
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class _Shard:
    name: str
    tokens: np.ndarray  # memory-mapped, uint16 / int32 [tokens]
    offsets: np.ndarray  # int64 [n + 1]
    len_a: np.ndarray  # int32 [n]
    is_random_next: np.ndarray  # uint8 [n]


def _open_shard(data_dir: Path, entry: object, max_seq_len: int) -> _Shard:
    """One shard of meta.json's list, memory-mapped and checked against its entry (a clear ValueError)."""
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _SHARD_NAME.fullmatch(entry["name"])
            and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("instances", "tokens"))):
        raise ValueError(f"{data_dir / 'meta.json'}: bad shard entry {entry!r} (a name and non-negative "
                         "instance and token counts); prepare the data again")
    name, n = entry["name"], entry["instances"]
    if n == 0 == entry["tokens"]:  # an empty shard: nothing to read (its files, if any, hold nothing)
        return _Shard(name, np.zeros(0, np.uint16), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8))
    arrays = {a: np.asarray(load_array(shard_path(data_dir, name, a), mmap=True)) for a in ARRAYS}

    def bad(array: str, why: str) -> ValueError:
        return ValueError(f"{shard_path(data_dir, name, array)}: {why}; prepare the data again (fastbert-prepare)")

    for a, shape in (("tokens", (entry["tokens"],)), ("offsets", (n + 1,)), ("len_a", (n,)), ("is_random_next", (n,))):
        if arrays[a].shape != shape or arrays[a].dtype.kind not in "iu":
            raise bad(a, f"{arrays[a].dtype} {arrays[a].shape}, meta.json says {shape} integers")
    offsets = arrays["offsets"]
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != entry["tokens"] or (lengths < 0).any():
        raise bad("offsets", f"not increasing from 0 to its {entry['tokens']} tokens")
    if n and lengths.max() + 3 > max_seq_len:
        raise bad("offsets", f"an instance of {int(lengths.max())} tokens does not fit in {max_seq_len} with "
                             "[CLS] and two [SEP]")
    if ((arrays["len_a"] < 0) | (arrays["len_a"] > lengths)).any():
        raise bad("len_a", "a segment A longer than its instance")
    return _Shard(name, **arrays)


class PretrainingDataset(torch.utils.data.Dataset):
    """One split of a prepared directory (module docstring). Item i = dict of int64 tensors padded to
    `max_seq_len`: input_ids, attention_mask, token_type_ids, labels (-100 where nothing is predicted),
    next_sentence_label; a list of keys (`batch`, `__getitems__`) = the batch `collate` would make of those items.

    Keys: `i` (masked for the epoch set by `set_epoch`) or `(epoch, i)` (the form `StepBatchSampler` yields,
    since data-loader workers hold their own copy of the dataset). `fixed_masking=True` ignores the epoch.
    `max_predictions=None`: `default_max_predictions(max_seq_len, mask_prob)`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        *,
        seed: int = 0,
        mask_prob: float = 0.15,
        max_predictions: int | None = None,
        fixed_masking: bool = False,
        whole_word_mask: bool = False,
    ):
        data_dir = Path(data_dir)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{data_dir} is not a prepared pretraining dataset (no meta.json); "
                                    "run fastbert-prepare first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{data_dir}: format version {self.meta.get('format_version')} is not "
                             f"{FORMAT_VERSION}; prepare the data again")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if max_predictions is not None and max_predictions < 1:
            raise ValueError(f"max_predictions must be >= 1 (or None: from the length), got {max_predictions}")
        self.data_dir, self.split = data_dir, split
        self.max_seq_len = int(self.meta["max_seq_len"])
        self.vocab_size = int(self.meta["vocab_size"])
        entries = self.meta.get("splits", {}).get(split, {}).get("shards")
        if not isinstance(entries, list):
            raise ValueError(f"{meta_path}: no shard list for the {split} split; prepare the data again")
        self.shards = [_open_shard(data_dir, e, self.max_seq_len) for e in entries]
        self._starts = np.zeros(len(self.shards) + 1, dtype=np.int64)  # global index of each shard's first instance
        np.cumsum([len(s.len_a) for s in self.shards], out=self._starts[1:])
        sp = self.meta["special_ids"]
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = sp["[PAD]"], sp["[CLS]"], sp["[SEP]"], sp["[MASK]"]
        # Random replacements are drawn from the ordinary tokens (never [PAD], [CLS], [SEP], [MASK], [UNK]).
        self.random_ids = np.setdiff1d(np.arange(self.vocab_size), np.array(list(sp.values())))
        if max_predictions is None:
            max_predictions = default_max_predictions(self.max_seq_len, mask_prob)
        self.seed, self.mask_prob, self.max_predictions = seed, mask_prob, max_predictions
        self.fixed_masking = fixed_masking
        self.word_start = None  # per vocabulary id: False for `##` continuation pieces
        if whole_word_mask:
            vocab = (data_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()[:self.vocab_size]
            self.word_start = np.ones(self.vocab_size, dtype=bool)
            self.word_start[:len(vocab)] = [not t.startswith("##") for t in vocab]
        self._warn_if_the_cap_binds()
        self.epoch = 0

    def _warn_if_the_cap_binds(self) -> None:
        """`cap_binds`: the share of sequences whose Google count exceeds max_predictions (warned above 10 %)."""
        wanted = binding = tokens = labelled = 0
        for s in self.shards:
            lengths = np.diff(s.offsets) + 3
            count = np.maximum(1, np.round(lengths * self.mask_prob).astype(np.int64))
            binding += int(np.sum(count > self.max_predictions))
            tokens += int(lengths.sum())
            labelled += int(num_to_predict(lengths, self.mask_prob, self.max_predictions).sum())
            wanted += len(lengths)
        self.cap_binds = binding / wanted if wanted else 0.0
        if self.cap_binds > 0.1:
            warnings.warn(
                f"max_predictions={self.max_predictions} caps the masked count of {self.cap_binds:.0%} of the "
                f"{self.split} sequences of {self.data_dir}: {labelled / tokens:.1%} of the tokens get a label "
                f"instead of {self.mask_prob:.0%}; raise max_predictions to "
                f"{default_max_predictions(self.max_seq_len, self.mask_prob)} "
                f"(ceil({self.mask_prob} × {self.max_seq_len}))", stacklevel=3,
            )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def is_random_next(self) -> np.ndarray:
        """uint8 [len]: the NSP label of every instance, in global order."""
        return np.concatenate([s.is_random_next for s in self.shards] or [np.zeros(0, np.uint8)])

    @property
    def len_a(self) -> np.ndarray:
        """int32 [len]: the length of segment A of every instance, in global order."""
        return np.concatenate([s.len_a for s in self.shards] or [np.zeros(0, np.int32)])

    def head_tokens(self, n: int) -> np.ndarray:
        """The first n token ids of the split (A and B of its instances back to back, in global order)."""
        out, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            out.append(np.asarray(s.tokens[:left]))
            left -= len(out[-1])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # ------------------------------------------------------------------ reading
    def _keys(self, keys: Sequence[Key]) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, index) int64 [B] each, from a list of keys; IndexError names an index out of range."""
        try:
            a = np.asarray(keys, dtype=np.int64)
        except (ValueError, TypeError):  # indices and (epoch, index) pairs mixed
            a = np.asarray([k if isinstance(k, tuple) else (self.epoch, k) for k in keys], dtype=np.int64)
        if a.ndim == 1 and len(a):
            epoch, index = np.full(len(a), self.epoch, dtype=np.int64), a
        elif a.ndim == 2 and a.shape[1] == 2 and len(a):
            epoch, index = a[:, 0], a[:, 1]
        else:
            raise ValueError(f"keys must be a non-empty list of indices or (epoch, index) pairs, got {keys!r}")
        bad = (index < 0) | (index >= len(self))
        if bad.any():
            raise IndexError(f"index {int(index[bad][0])} out of range for {len(self)} instances")
        return (np.zeros_like(epoch) if self.fixed_masking else epoch), index

    def _gather(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Instances `index` (int64 [B]), rows sorted by shard: (order int64 [B] (row r is instance
        index[order[r]]), A and B tokens of all rows back to back int64 [ΣL], lengths L [B], len_a [B],
        is_random_next [B]), reading only their part of each shard."""
        B = len(index)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        order = np.argsort(shard, kind="stable")
        shard = shard[order]
        local = index[order] - self._starts[shard]
        lo, hi = np.empty(B, np.int64), np.empty(B, np.int64)
        len_a, is_random = np.empty(B, np.int64), np.empty(B, np.int64)
        cuts = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), B]
        groups = [(self.shards[shard[a]], a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for s, a, b in groups:
            rows = local[a:b]
            lo[a:b], hi[a:b] = s.offsets[rows], s.offsets[rows + 1]
            len_a[a:b], is_random[a:b] = s.len_a[rows], s.is_random_next[rows]
        lengths = hi - lo
        ends = np.cumsum(lengths)
        # Token j of the flat body is token (j - start of its row) of its row's span in its shard.
        src = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(lo - (ends - lengths), lengths)
        body = np.empty(len(src), dtype=np.int64)
        for s, a, b in groups:
            t0, t1 = int(ends[a] - lengths[a]), int(ends[b - 1])
            body[t0:t1] = s.tokens[src[t0:t1]]
            if t1 > t0 and body[t0:t1].max() >= self.vocab_size:
                raise ValueError(f"{shard_path(self.data_dir, s.name, 'tokens')}: token id "
                                 f"{int(body[t0:t1].max())} outside the vocabulary of {self.vocab_size}; "
                                 "prepare the data again (fastbert-prepare)")
        return order, body, lengths, len_a, is_random

    def _arrays(self, keys: Sequence[Key], width: int | None = None) -> dict[str, np.ndarray]:
        """The batch of `keys` as int64 numpy arrays [B, T] (T = `width`, or the longest sequence rounded up to a
        multiple of 8, at most max_seq_len) and next_sentence_label [B]."""
        epoch, index = self._keys(keys)
        order, body, lengths, len_a, is_random = self._gather(index)  # rows sorted by shard
        n = lengths + 3  # [CLS] A [SEP] B [SEP]
        T = width or min(self.max_seq_len, -(-int(n.max()) // 8) * 8)
        col = np.arange(T)
        real = col < n[:, None]  # (B, T)
        special = (col == 0) | (col == (len_a + 1)[:, None]) | (col == (n - 1)[:, None])
        maskable = real & ~special
        ids = np.full((len(n), T), self.pad_id, dtype=np.int64)
        ids[maskable] = body  # row-major: A then B of each row, in order
        ids[special & real] = self.sep_id
        ids[:, 0] = self.cls_id
        ids, labels = mask_batch(
            ids, n, maskable, row_keys(self.seed, epoch[order], index[order]), mask_id=self.mask_id,
            random_ids=self.random_ids, mask_prob=self.mask_prob, max_predictions=self.max_predictions,
            word_start=None if self.word_start is None else self.word_start[ids], max_len=self.max_seq_len,
        )
        back = np.argsort(order)  # rows in the order of the keys
        return {
            "input_ids": ids[back],
            "attention_mask": real[back].astype(np.int64),
            "token_type_ids": (real & (col >= (len_a + 2)[:, None]))[back].astype(np.int64),
            "labels": labels[back],
            "next_sentence_label": is_random[back],
        }

    def instance(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Unmasked instance i: (input_ids, token_type_ids, maskable, is_random_next), unpadded."""
        _, index = self._keys([i])
        _, body, lengths, len_a, is_random = self._gather(index)
        la, n = int(len_a[0]), int(lengths[0]) + 3
        ids = np.concatenate(([self.cls_id], body[:la], [self.sep_id], body[la:], [self.sep_id]))
        types = (np.arange(n) >= la + 2).astype(np.int64)
        maskable = np.ones(n, dtype=bool)
        maskable[[0, la + 1, n - 1]] = False  # [CLS] and both [SEP]
        return ids, types, maskable, int(is_random[0])

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        """Item `i` masked for the current epoch, or `(epoch, i)`: item i masked for that epoch; padded to
        max_seq_len."""
        arrays = self._arrays([key], width=self.max_seq_len)
        return {k: torch.from_numpy(v[0]) if v.ndim == 2 else torch.tensor(int(v[0])) for k, v in arrays.items()}

    def batch(self, keys: Sequence[Key]) -> dict[str, torch.Tensor | PackedBatch]:
        """The batch of `keys` (module docstring): what `collate` makes of `[self[k] for k in keys]`."""
        batch: dict = {k: torch.from_numpy(v) for k, v in self._arrays(keys).items()}
        batch["packed"] = PackedBatch.from_batch(batch["attention_mask"], batch["labels"])
        return batch

    __getitems__ = batch  # what PyTorch's DataLoader calls with each list of keys of a batch sampler


def keep_batch(batch: dict[str, torch.Tensor | PackedBatch]) -> dict[str, torch.Tensor | PackedBatch]:
    """The DataLoader's `collate_fn` for the batch path: `PretrainingDataset.__getitems__` already built it."""
    return batch


def collate(items: list[dict[str, torch.Tensor]], pad_to_multiple: int = 8) -> dict[str, torch.Tensor | PackedBatch]:
    """Stack items and drop the padding columns no sequence of the batch uses (length rounded up to a
    multiple of `pad_to_multiple`, which keeps GPU matmul shapes friendly). ``batch["packed"]`` is the batch's
    packing metadata (`fastbert.packing.PackedBatch`: cu_seqlens, max_seqlen, token indices, labelled positions
    and their count), computed here on the CPU so that the model's step needs no device→host synchronisation."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    longest = int(batch["attention_mask"].sum(1).max())
    T = min(batch["input_ids"].shape[1], -(-longest // pad_to_multiple) * pad_to_multiple)
    for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        batch[k] = batch[k][:, :T]
    batch["packed"] = PackedBatch.from_batch(batch["attention_mask"], batch["labels"])
    return batch


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices as a pure function of the optimizer step, for one DDP rank.

    An optimizer step consumes `global_batch = micro_batch × grad_accum × world_size` instances: the slice
    [pos·G, (pos+1)·G) of epoch e's permutation (seeded by (seed, e)); the last incomplete global batch of
    an epoch is dropped. Rank r takes, for accumulation micro-step m, the contiguous piece
    m·(W·b) + r·b ... + b of that slice — so a run on W ranks sees the same global batches as one process.
    Starting at `start_step` is how a resumed run continues exactly where it stopped.
    """

    def __init__(self, n: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 start_step: int, num_steps: int):
        self.global_batch = micro_batch * grad_accum * world_size
        if n < self.global_batch:
            raise ValueError(f"the dataset has {n} instances, fewer than one global batch ({self.global_batch})")
        self.n, self.b, self.accum, self.world, self.rank = n, micro_batch, grad_accum, world_size, rank
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's `grad_accum` micro-batches for optimizer step `step` (0-based), as (epoch, index) keys."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = self.permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
        wb = self.world * self.b
        return [
            [(epoch, int(i)) for i in g[m * wb + self.rank * self.b:m * wb + (self.rank + 1) * self.b]]
            for m in range(self.accum)
        ]

    def __iter__(self):
        for step in range(self.start_step, self.start_step + self.num_steps):
            yield from self.step_indices(step)

    def __len__(self) -> int:
        return self.num_steps * self.accum
