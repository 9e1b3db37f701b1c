"""`PackedBatch`: the packing metadata of a padded batch, computed once on the CPU by the data loader.

What unpadding and the masked-only MLM head need, and what costs a device→host synchronisation when computed from
device tensors (the number of real tokens, the longest length as a Python int, the number of labelled positions):

    cu_seqlens          int32 [B+1]  start of each sequence in the packed real tokens
    max_seqlen          int          the longest length (a Python int: the attention kernel's grid needs it)
    token_indices       int64 [N]    flattened B·T positions of the real tokens, in row-major order
    labelled_positions  int64 [n]    flattened B·T positions whose label is not -100, row-major (or None)
    num_labelled        int          n
    seq_len             int          T, the padded length the metadata was computed for
    lengths             tuple[int]   the B lengths, on the host
    label_range         (lo, hi)     smallest and largest label at the labelled positions (None when n = 0)

`PackedBatch.from_batch(attention_mask, labels)` builds it from CPU tensors (the collate function calls it);
`.to(device)` moves its tensors (non-blocking); the models take it as ``packed=`` (fastbert models and ``optimize()``d
transformers models alike). With it, the fused encoder unpads by ``index_select`` on the known indices and the MLM
head gathers the known labelled rows: no ``nonzero``, no ``.item()``, no data-dependent shape, so a fused training
step makes no device→host synchronisation and ``torch.compile(fullgraph=True)`` keeps both fast paths.

Checks (all on the host, where they cost nothing). Construction validates the fields against each other (lengths,
cu_seqlens, token count, max_seqlen ≥ every length, label count); on CPU tensors it also validates their values,
and `check` compares the metadata with a batch: shapes always, and — where the batch's tensors are on the CPU
(the data loader, the tests) — the lengths and token indices against ``attention_mask`` and the labelled positions
and count against ``labels``. Caution: on CUDA the values of the batch's device tensors are not re-read (that would
be the very synchronisation this type removes): build the metadata with `from_batch` from the CPU batch the device
tensors were copied from, and move both together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

__all__ = ["PackedBatch"]


def _int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _index_tensor(name: str, t: object, dtype: torch.dtype, n: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D {dtype} tensor of {n} entries, got {t.dtype} {tuple(t.shape)}")


@dataclass(frozen=True)
class PackedBatch:
    """Packing metadata of one padded [B, T] batch (module docstring). Build with `from_batch`."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    token_indices: torch.Tensor
    labelled_positions: torch.Tensor | None
    num_labelled: int
    seq_len: int
    lengths: tuple[int, ...]
    label_range: tuple[int, int] | None = None
    # True when the tensors' values were validated on the CPU (here, or before `.to` moved them).
    values_checked: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        T = _int("seq_len", self.seq_len)
        lengths = self.lengths
        if not isinstance(lengths, tuple) or not lengths or any(
            isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= T for n in lengths
        ):
            raise ValueError(f"lengths must be a non-empty tuple of ints in [0, seq_len={T}], got {lengths!r}")
        B, N = len(lengths), sum(lengths)
        max_seqlen = _int("max_seqlen", self.max_seqlen)
        if max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen = {max_seqlen} is below the longest sequence ({max(lengths)} tokens)")
        if max_seqlen > T:
            raise ValueError(f"max_seqlen = {max_seqlen} exceeds seq_len = {T}")
        _index_tensor("cu_seqlens", self.cu_seqlens, torch.int32, B + 1)
        _index_tensor("token_indices", self.token_indices, torch.int64, N)
        n = _int("num_labelled", self.num_labelled)
        if self.labelled_positions is not None:
            _index_tensor("labelled_positions", self.labelled_positions, torch.int64, n)
            if self.labelled_positions.device != self.cu_seqlens.device:
                raise ValueError("labelled_positions and cu_seqlens must be on one device")
        elif n:
            raise ValueError(f"num_labelled = {n} but labelled_positions is None")
        if self.token_indices.device != self.cu_seqlens.device:
            raise ValueError("token_indices and cu_seqlens must be on one device")
        if self.label_range is not None and (len(self.label_range) != 2 or self.label_range[0] > self.label_range[1]):
            raise ValueError(f"label_range must be (lo, hi) with lo <= hi, got {self.label_range!r}")
        if self.cu_seqlens.device.type == "cpu":
            self._check_values(B, T, N, n)
            object.__setattr__(self, "values_checked", True)

    def _check_values(self, B: int, T: int, N: int, n: int) -> None:
        """The tensors' values against the host fields (CPU tensors: no synchronisation)."""
        want = torch.tensor((0, *self.lengths), dtype=torch.int64).cumsum(0)
        if not torch.equal(self.cu_seqlens.long(), want):
            raise ValueError(f"cu_seqlens {self.cu_seqlens.tolist()} disagrees with lengths {list(self.lengths)}")
        idx = self.token_indices
        if N and (bool((idx < 0).any()) or bool((idx >= B * T).any()) or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError(f"token_indices must be increasing positions in [0, B·T = {B * T})")
        if N and not torch.equal(idx // T, torch.repeat_interleave(torch.arange(B), torch.tensor(self.lengths))):
            raise ValueError("token_indices do not give each sequence its `lengths` tokens")
        pos = self.labelled_positions
        if n and (bool((pos < 0).any()) or bool((pos >= B * T).any()) or bool((pos[1:] <= pos[:-1]).any())):
            raise ValueError(f"labelled_positions must be increasing positions in [0, B·T = {B * T})")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_batch(cls, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> PackedBatch:
        """Metadata of a padded batch from its [B, T] attention_mask (1 = real token; any prefix or not) and its
        optional [B, T] labels (-100 = no prediction). Meant for CPU tensors (the collate function): on a device
        this reads the values back (synchronises)."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [B, T] tensor")
        if attention_mask.is_floating_point() or attention_mask.shape[0] == 0:
            raise ValueError(
                f"attention_mask must be an integer or bool [B >= 1, T] tensor, got {attention_mask.dtype} "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask.detach().cpu()
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding")
        mask = mask.bool()
        B, T = mask.shape
        lengths = mask.sum(1)  # (B,)
        positions = labels_range = None
        n = 0
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != mask.shape:
                raise ValueError(f"labels must be a [B, T] = {[B, T]} tensor like attention_mask")
            flat = labels.detach().cpu().reshape(-1)  # (B·T,)
            positions = torch.nonzero(flat != IGNORE_INDEX).reshape(-1)  # (n,), on the CPU: no device sync
            n = int(positions.numel())
            if n:
                picked = flat[positions]
                labels_range = (int(picked.min()), int(picked.max()))
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        lengths_t = tuple(int(x) for x in lengths)
        return cls(
            cu_seqlens=cu,
            max_seqlen=max(lengths_t),
            token_indices=torch.nonzero(mask.reshape(-1)).reshape(-1),
            labelled_positions=positions,
            num_labelled=n,
            seq_len=T,
            lengths=lengths_t,
            label_range=labels_range,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The same metadata with its tensors on `device` (the host fields stay Python values)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(
            self, cu_seqlens=move(self.cu_seqlens), token_indices=move(self.token_indices),
            labelled_positions=move(self.labelled_positions), values_checked=self.values_checked,
        )  # fmt: skip

    def pin_memory(self) -> PackedBatch:
        """Pinned host copies (what a DataLoader with ``pin_memory=True`` calls), for non-blocking copies."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return dataclasses.replace(
            self, cu_seqlens=pin(self.cu_seqlens), token_indices=pin(self.token_indices),
            labelled_positions=pin(self.labelled_positions),
        )  # fmt: skip

    # ------------------------------------------------------------------ checking against a batch
    @property
    def batch_size(self) -> int:
        # From a tensor shape, not len(lengths): under torch.compile a shape is a dynamic size, a tuple's length
        # a constant that would pin the batch size (one graph per batch size).
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.token_indices.shape[0]

    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Refuse metadata that disagrees with the batch's shape or attention_mask (a clear ValueError): shapes
        always, values where the batch's tensors are on the CPU (module docstring)."""
        B, T = input_ids.shape
        if (B, T) != (self.batch_size, self.seq_len):
            raise ValueError(f"packed metadata is for a [{self.batch_size}, {self.seq_len}] batch, got [{B}, {T}]")
        if self.cu_seqlens.device != input_ids.device:
            raise ValueError(f"packed metadata is on {self.cu_seqlens.device} but input_ids on {input_ids.device}")
        if attention_mask is None:
            raise ValueError("packed metadata needs the attention_mask it was computed from")
        if not _values_readable(input_ids):
            return  # reading device values back would synchronise; see the module docstring
        lengths = attention_mask.bool().sum(1)
        if lengths.tolist() != list(self.lengths):
            raise ValueError(f"packed lengths {list(self.lengths)} disagree with attention_mask ({lengths.tolist()})")
        real = torch.nonzero(attention_mask.bool().reshape(-1)).reshape(-1)
        if not torch.equal(real, self.token_indices):
            raise ValueError("packed token_indices disagree with attention_mask's real positions")

    def check_labels(self, labels: torch.Tensor, vocab_size: int) -> None:
        """Refuse metadata whose labelled positions, count or label range disagree with `labels` [B, T]."""
        if self.labelled_positions is None:
            raise ValueError("labels given but the packed metadata has none (build it with from_batch(mask, labels))")
        if tuple(labels.shape) != (self.batch_size, self.seq_len):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, the packed metadata [{self.batch_size}, "
                             f"{self.seq_len}]")
        if self.label_range is not None and not torch.compiler.is_compiling():  # per-batch values: no guards on them
            lo, hi = self.label_range
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}) or be -100, got [{lo}, {hi}]")
        if not _values_readable(labels):
            return
        labelled = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).reshape(-1)
        if labelled.numel() != self.num_labelled:
            raise ValueError(
                f"packed num_labelled = {self.num_labelled} but labels has {labelled.numel()} labelled positions"
            )
        if not torch.equal(labelled, self.labelled_positions):
            raise ValueError("packed labelled_positions disagree with labels")
        picked = labels.reshape(-1)[labelled]
        if labelled.numel() and (int(picked.min()), int(picked.max())) != self.label_range:
            raise ValueError(f"packed label_range {self.label_range} disagrees with labels")


def _values_readable(t: torch.Tensor) -> bool:
    """True where a tensor's values can be read without a device synchronisation (CPU, outside compilation)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
