"""Unpad / re-pad helpers for the variable-length attention layout (plain PyTorch, differentiable).

An encoder unpads once at its entry (`unpad_input`), runs every layer on the packed real tokens
[total_tokens, ...] with `fused_attention_varlen(..., cu_seqlens, max_seqlen)`, and re-pads once at its
exit (`pad_input`), so no layer does work on padding.

Bytes moved: one gather of the real tokens (unpad) and one scatter into a zeroed [B·T, ...] buffer (pad).

Caution: `unpad_input` reads the lengths on the host (one device-to-host copy: `max_seqlen` is a Python
int and the packed size is data-dependent), so under `torch.compile` it is a graph break; call it outside
the compiled region. `unpad_input_indexed` is the synchronisation-free form for metadata computed beforehand (on the
CPU, by the data loader: `fastbert.packing.PackedBatch`): a gather by known indices, whose output size is the
indices' length — a shape, not a value — so it traces under `torch.compile` with dynamic shapes.

The mask need not be a prefix: real tokens are packed in order, which is equivalent for attention without
position biases (dropout positions then count within the packed sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import check_tensor

__all__ = ["pad_input", "unpad_input", "unpad_input_indexed"]


def unpad_input(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack the real tokens of x [B, T, ...] (mask [B, T] bool, True = real token).

    Returns (x_packed [total, ...], indices int64 [total] into the flattened B·T positions,
    cu_seqlens int32 [B+1], max_seqlen int)."""
    check_tensor("x", x)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=x.device)
    if x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"x must be [B, T, ...] matching mask {list(mask.shape)}, got {list(x.shape)}")
    B, T = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)  # (total,)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))  # (B+1,)
    max_seqlen = int(lengths.max().item()) if B > 0 else 0
    x_packed = x.reshape(B * T, *x.shape[2:]).index_select(0, indices)  # (total, ...)
    return x_packed, indices, cu_seqlens, max_seqlen


def unpad_input_indexed(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The real tokens of x [B, T, ...] at the flattened positions `indices` (int64 [total], as `unpad_input`
    returns them): x_packed [total, ...]. No host synchronisation; the indices' values are the caller's to check."""
    check_tensor("x", x)
    check_tensor("indices", indices, ndim=1, dtypes=(torch.int64,), device=x.device)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...], got {list(x.shape)}")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, indices)  # (total, ...)


def pad_input(x_packed: torch.Tensor, indices: torch.Tensor, B: int, T: int, validate: bool = True) -> torch.Tensor:
    """Scatter packed tokens x_packed [total, ...] back to [B, T, ...]; padding positions are zero.

    `validate=False` skips the value check of `indices` against B·T (a host read on CPU tensors): for callers
    whose indices were already checked against this batch, e.g. a `fastbert.packing.PackedBatch`."""
    check_tensor("x_packed", x_packed)
    check_tensor("indices", indices, ndim=1, dtypes=(torch.int64, torch.int32), device=x_packed.device)
    if x_packed.dim() < 1 or x_packed.shape[0] != indices.shape[0]:
        raise ValueError(
            f"x_packed has {x_packed.shape[0] if x_packed.dim() else 0} tokens but indices {indices.shape[0]}"
        )
    if B < 0 or T < 0:
        raise ValueError(f"B and T must be >= 0, got B={B}, T={T}")
    # index_copy silently writes out of bounds on some devices: an index past B·T means B or T is too small.
    if validate and indices.numel() and indices.device.type == "cpu" and not torch.compiler.is_compiling() and \
            int(indices.max()) >= B * T:
        raise ValueError(f"B={B}, T={T} is too small for indices up to {int(indices.max())} (B·T must exceed every "
                         "index; pass the batch size and length the indices came from)")
    if indices.numel() > B * T:
        raise ValueError(f"B={B}, T={T} holds {B * T} positions but x_packed has {indices.numel()} tokens")
    out = x_packed.new_zeros((B * T, *x_packed.shape[1:]))
    out = out.index_copy(0, indices.long(), x_packed)  # (B·T, ...)
    return out.view(B, T, *x_packed.shape[1:])
