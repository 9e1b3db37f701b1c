"""Loading pretraining instances (see train/prepare.py) with dynamic masking, and the step-indexed batch order.

Masking happens here, at load time, with an RNG derived from (seed, epoch, index): every epoch masks each
instance afresh (RoBERTa-style dynamic masking), yet any item is reproducible on its own — which is what makes
`--resume` exact and lets data-loader workers and DDP ranks mask without sharing state.

Masking rule (Google's `create_pretraining_data.py`): n = round(15 % of all the sequence's tokens, [CLS] and
[SEP] counted) — at least 1, at most `max_predictions` — positions are chosen among the real tokens other than
[CLS] / [SEP] (padding is never a candidate); each chosen token becomes [MASK] with probability 0.8, a random
non-special token with probability 0.1, and stays itself otherwise. Its label is the original id; every other
label is -100. `max_predictions` defaults to ceil(15 % of the sequence length) — 20 at 128 tokens, 77 at 512
(Google: 20 and 80), which round(15 %) of a sequence of the dataset's length never exceeds — and a warning
says when a given cap binds on more than 10 % of a dataset's sequences.

Whole-word masking (`whole_word_mask=True`, Google's `--do_whole_word_mask`): a word (a token and the `##`
pieces after it) is chosen or left as a whole — words are taken in random order while they fit in n — and
each of its tokens then gets the 80/10/10 draw on its own. Unlike Google's code, a `##` piece right after
[SEP] starts a new word instead of joining the last word of segment A.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from fastbert.packing import PackedBatch

from .prepare import FORMAT_VERSION, SPLITS, load_array

IGNORE_INDEX = -100


def default_max_predictions(max_seq_len: int, mask_prob: float = 0.15) -> int:
    """ceil(mask_prob × max_seq_len): 20 at 128, 77 at 512, 10 at 64 (at 15 %)."""
    return max(1, math.ceil(round(mask_prob * max_seq_len, 6)))


def num_to_predict(length: int | np.ndarray, mask_prob: float, max_predictions: int):
    """Google's count: round(mask_prob × all tokens of the sequence), at least 1, at most max_predictions."""
    return np.minimum(max_predictions, np.maximum(1, np.round(np.asarray(length) * mask_prob).astype(np.int64)))


def mask_tokens(
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    max_predictions: int = 20,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one unpadded sequence. ids int64 (T,), maskable bool (T,) → (masked ids, labels with
    -100). `word_start` bool (T,) (True where a token is not a `##` continuation) turns on whole-word masking."""
    candidates = np.flatnonzero(maskable)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    n = int(num_to_predict(len(ids), mask_prob, max_predictions)) if len(candidates) else 0
    if n == 0:
        return ids, labels
    if word_start is None:
        chosen = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
    else:
        # A word starts at a non-## token or where the previous position is not a candidate ([SEP]).
        starts = word_start[candidates].copy()
        starts[0] = True
        starts[1:] |= np.diff(candidates) > 1
        words = np.split(candidates, np.flatnonzero(starts)[1:])
        picked: list[np.ndarray] = []
        count = 0
        for w in rng.permutation(len(words)):
            if count >= n:
                break
            if count + len(words[w]) > n:
                continue  # does not fit: try the next word, as Google does
            picked.append(words[w])
            count += len(words[w])
        chosen = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    labels[chosen] = ids[chosen]
    out = ids.copy()
    u = rng.random(len(chosen))
    to_mask = chosen[u < 0.8]
    to_random = chosen[(u >= 0.8) & (u < 0.9)]  # the last 10 % keep their token
    out[to_mask] = mask_id
    out[to_random] = random_ids[rng.integers(0, len(random_ids), size=len(to_random))]
    return out, labels


class PretrainingDataset(torch.utils.data.Dataset):
    """One split of a prepared directory; item i = dict of int64 tensors, padded to `max_seq_len`:
    input_ids, attention_mask, token_type_ids, labels (-100 where nothing is predicted), next_sentence_label.

    `set_epoch(e)` changes the masking draw; `fixed_masking=True` ignores the epoch (evaluation).
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
        self.tokens = load_array(data_dir / f"{split}.tokens.npy", mmap=True)
        self.offsets = load_array(data_dir / f"{split}.offsets.npy")
        self.len_a = load_array(data_dir / f"{split}.len_a.npy")
        self.is_random_next = load_array(data_dir / f"{split}.is_random_next.npy")
        self.max_seq_len = int(self.meta["max_seq_len"])
        self.vocab_size = int(self.meta["vocab_size"])
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
        # Google's count per sequence, and how often the cap cuts it.
        lengths = np.diff(self.offsets) + 3
        wanted = np.maximum(1, np.round(lengths * mask_prob).astype(np.int64))
        self.cap_binds = float(np.mean(wanted > max_predictions)) if len(lengths) else 0.0
        if self.cap_binds > 0.1:
            got = num_to_predict(lengths, mask_prob, max_predictions).sum() / lengths.sum()
            warnings.warn(
                f"max_predictions={max_predictions} caps the masked count of {self.cap_binds:.0%} of the {split} "
                f"sequences of {data_dir}: {got:.1%} of the tokens get a label instead of {mask_prob:.0%}; "
                f"raise max_predictions to {default_max_predictions(self.max_seq_len, mask_prob)} "
                f"(ceil({mask_prob} × {self.max_seq_len}))", stacklevel=2,
            )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.len_a)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def instance(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Unmasked instance i: (input_ids, token_type_ids, maskable, is_random_next), unpadded."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        body = self.tokens[lo:hi].astype(np.int64)
        la, lb = int(self.len_a[i]), hi - lo - int(self.len_a[i])
        ids = np.concatenate(([self.cls_id], body[:la], [self.sep_id], body[la:], [self.sep_id]))
        types = np.concatenate((np.zeros(la + 2, np.int64), np.ones(lb + 1, np.int64)))
        maskable = np.ones(len(ids), dtype=bool)
        maskable[[0, la + 1, len(ids) - 1]] = False  # [CLS] and both [SEP]
        return ids, types, maskable, int(self.is_random_next[i])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Item `i` masked for the current epoch, or `(epoch, i)`: item i masked for that epoch (the form the
        step sampler uses, since data-loader workers hold their own copy of the dataset)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} instances")
        ids, types, maskable, is_random = self.instance(i)
        rng = np.random.default_rng([self.seed, 0 if self.fixed_masking else epoch, i])
        ids, labels = mask_tokens(
            ids, maskable, rng, mask_id=self.mask_id, random_ids=self.random_ids,
            mask_prob=self.mask_prob, max_predictions=self.max_predictions,
            word_start=None if self.word_start is None else self.word_start[ids],
        )
        T, n = self.max_seq_len, len(ids)

        def pad(x: np.ndarray, value: int) -> torch.Tensor:
            out = np.full(T, value, dtype=np.int64)
            out[:n] = x
            return torch.from_numpy(out)

        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad(np.ones(n, np.int64), 0),
            "token_type_ids": pad(types, 0),
            "labels": pad(labels, IGNORE_INDEX),
            "next_sentence_label": torch.tensor(is_random, dtype=torch.int64),
        }


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
