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
`(x if x >= 0 else -x - 1) · 4.6566127342e-10` in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import draw_seed

# Philox-4x32 constants (the ones Triton's `philox_impl` uses for 32-bit counters).
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_N_ROUNDS = 10
# Largest counter the int32 offsets can hold: Tq · row_stride must stay below it.
MAX_OFFSETS = 2**31 - 1


@triton.jit
def dropout_keep(seed, bh, offsets, p_drop):
    """Keep-mask (True = kept) for `offsets` (int32 block) of attention matrix `bh` = b·h + head."""
    key = bh.to(tl.int64) * 4294967296 + seed  # high word: (batch, head); low word: the user seed
    return tl.rand(key, offsets) >= p_drop


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a·b for a constant a < 2**32 and b in [0, 2**32).

    Split b in 16-bit halves so every partial product fits a signed int64."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox_uniform(seed: torch.Tensor, key_hi: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's `tl.rand(seed_lo + key_hi·2**32, offsets)` in plain PyTorch (int64 arithmetic), float32.

    `seed` is a 1-element int64 tensor, `key_hi` and `offsets` int64 tensors that broadcast together."""
    c0 = (offsets & _MASK32).to(torch.int64)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed.reshape(()).to(device=offsets.device, dtype=torch.int64) & _MASK32) + torch.zeros_like(key_hi)
    k1 = key_hi.to(torch.int64) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


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
    u = philox_uniform(seed, bh, rows * row_stride + cols)  # (B·h, Tq, Tk)
    # Compare in float32 like the kernels (p arrives there as a float32 argument).
    keep = u >= torch.tensor(dropout_p, dtype=torch.float32, device=device)
    return keep.view(B, h, Tq, Tk)
