"""Attention dropout: the counter-based keep-mask shared by `softmax_dropout` and `attention`.

Nothing is stored: the kernels regenerate the mask in backward from (seed, position) with Philox-4x32-10
(`tl.rand`), and `attention_dropout_mask` rebuilds the very same mask in plain PyTorch, so references and
the PyTorch fallback path drop exactly what the kernels drop.

Offset scheme (why it looks like this): `tl.rand(seed, offset)` counts with 32-bit offsets, and
B·h·Tq·Tk overflows int32 for real batches (256·12·512·512 ≈ 8e8 is close, larger ones wrap and collide).
So the (batch, head) index goes into the *key* and only the position inside one attention matrix goes
into the counter:

    philox key     = (seed, b·h + head)          # seed < 2**31 in the low word, b·h+head in the high word
    philox counter = i · row_stride + j          # < 2**31: i query row, j key column
    keep(b, head, i, j)  <=>  uniform(key, counter) >= dropout_p

with `row_stride = Tk` for the padded layout and `max_seqlen` for the variable-length layout, where
`b` is the sequence index in `cu_seqlens` and i, j count from each sequence's first token. Hence a padded
call with T == max_seqlen and a varlen call of the same batch with the same seed drop the same
(b, head, i, j) entries. `uniform` is Triton's: the first Philox output word, read as int32 `x`, mapped to
`(x if x >= 0 else -x - 1) · 4.6566127342e-10` in float32; `kernels._philox.philox_uniform` rebuilds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import draw_seed
from kernels._philox import philox_uniform

# Largest counter the int32 offsets can hold: Tq · row_stride must stay below it.
MAX_OFFSETS = 2**31 - 1


@triton.jit
def dropout_keep(seed, bh, offsets, p_drop):
    """Keep-mask (True = kept) for `offsets` (int32 block) of attention matrix `bh` = b·h + head."""
    key = bh.to(tl.int64) * 4294967296 + seed  # high word: (batch, head); low word: the user seed
    return tl.rand(key, offsets) >= p_drop


def attention_dropout_mask(
    seed: int | torch.Tensor,
    B: int,
    h: int,
    Tq: int,
    Tk: int,
    dropout_p: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The bool keep-mask [B, h, Tq, Tk] (True = kept) that a padded-layout call with this seed applies.

    `seed` is the int passed to the kernel call (or the int64 tensor from `draw_seed`). Varlen calls:
    see `attention_dropout_mask_varlen`. Materialises B·h·Tq·Tk elements with int64 temporaries:
    meant for tests and the PyTorch fallback path, not for large shapes."""
    seed_t = seed if isinstance(seed, torch.Tensor) else draw_seed(seed)
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if Tq * Tk > MAX_OFFSETS:
        raise ValueError(f"Tq·Tk = {Tq * Tk} overflows the int32 dropout offsets (limit 2**31 - 1)")
    return _keep_mask(seed_t, B, h, Tq, Tk, Tk, dropout_p, torch.device(device))


def attention_dropout_mask_varlen(
    seed: int | torch.Tensor,
    cu_seqlens: torch.Tensor,
    h: int,
    max_seqlen: int,
    dropout_p: float,
) -> torch.Tensor:
    """Keep-mask of a varlen call, in padded form [B, h, max_seqlen, max_seqlen] on cu_seqlens' device.

    Entry [b, head, i, j] belongs to query token cu_seqlens[b] + i and key token cu_seqlens[b] + j; entries
    with i or j ≥ the sequence's length are unused. By the offset scheme (module docstring) this equals
    `attention_dropout_mask(seed, B, h, max_seqlen, max_seqlen, dropout_p)`."""
    B = cu_seqlens.numel() - 1
    return attention_dropout_mask(seed, B, h, max_seqlen, max_seqlen, dropout_p, cu_seqlens.device)


def _keep_mask(
    seed: torch.Tensor, B: int, h: int, Tq: int, Tk: int, row_stride: int, dropout_p: float, device
) -> torch.Tensor:
    if dropout_p == 0.0:
        return torch.ones(B, h, Tq, Tk, dtype=torch.bool, device=device)
    bh = torch.arange(B * h, device=device, dtype=torch.int64).view(B * h, 1, 1)
    rows = torch.arange(Tq, device=device, dtype=torch.int64).view(1, Tq, 1)
    cols = torch.arange(Tk, device=device, dtype=torch.int64).view(1, 1, Tk)
    key = bh * 2**32 + seed.reshape(()).to(device)  # the kernel's `key`: (seed, b·h + head)
    u = philox_uniform(key, rows * row_stride + cols)  # (B·h, Tq, Tk)
    # Compare in float32 like the kernels (p arrives there as a float32 argument).
    keep = u >= torch.tensor(dropout_p, dtype=torch.float32, device=device)
    return keep.view(B, h, Tq, Tk)
