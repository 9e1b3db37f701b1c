"""Attention dropout: the counter-based keep-mask shared by `softmax_dropout` and `attention`.

Nothing is stored: the kernels regenerate the mask in backward from (seed, position), and
`attention_dropout_mask` rebuilds the very same mask in plain PyTorch (`kernels._philox`), so references and
the PyTorch fallback path drop exactly what the kernels drop.

The scheme (one Philox call feeds 8 score elements, all four of its 32-bit output words used):

    philox key      = (seed, b·h + head)           # seed < 2**31 in the low word, b·h+head in the high word
    philox counter  = (j // 8, i, 0, 0)             # i query row, j key column, both counted in the sequence
    4 output words  → 8 16-bit draws; lane l = j % 8 reads (word l // 2 >> 16·(l % 2)) & 0xFFFF
    keep(b, head, i, j)  <=>  draw ≥ t,   t = round(65536 · dropout_p)  (≤ 65535)

with Philox-4x32 at 7 rounds. Why these choices:
- several elements per call: a score element is worth ≈ 10 lane-instructions of issue budget at d = 64 on an
  H100/H200 (PERF.md); one 10-round `tl.rand` call per element cost ≈ 55 SASS instructions per element in the
  forward loop. Compiled for sm_90 (128×64 tile, 8 warps, `python -m kernels.aot_check --dropout-cost`), 8
  16-bit draws per 7-round call add ≈ 11 instructions per element, and FlashAttention-2's 16 8-bit draws per
  call measured the same (±0.5): the Philox rounds are no longer what costs, the unpacking and the compare
  are. So 16-bit draws: the keep probability is quantised to 2**-16 instead of 2**-8.
- 7 rounds: Philox-4x32-7 is the fewest rounds Salmon et al. (SC 2011) report as passing TestU01's BigCrush
  (10 is their safety margin); FlashAttention-2 uses 7 too. Dropout needs independent-looking bits, not
  strength against an adversary; tests/kernels/test_attention_dropout_stats.py checks the rate and the
  independence of elements that share a call, of neighbouring rows, heads, batches and seeds.
- quantised thresholds, unbiased: the keep probability is exactly q = (65536 - t) / 65536 (within 2**-17 of
  1 - p: for p = 0.1, t = 6554 and q = 0.899993896...). Kept entries are scaled by 1 / q (`keep_scale(p)`), so
  E[keep / q] = 1 exactly; every reference path uses the same factor. `effective_dropout_p(p)` = t / 65536.
- the counter is (column group, row) of one attention matrix, independent of tiles, layouts and strides: a
  padded call and a varlen call of the same batch and seed drop the same (b, head, i, j) entries, every tile
  config gives the same mask, and the softmax kernel (whole rows) draws the same bits as the flash kernels.
  (The launchers still refuse Tq·row_stride ≥ 2**31, the limit of the earlier 32-bit-offset scheme, so that
  no call that failed before now silently succeeds with a different meaning; the counters themselves have no
  such limit.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import draw_seed
from kernels._philox import philox4x32

# Largest Tq · row_stride the launchers accept with dropout (kept from the earlier 32-bit-offset scheme).
MAX_OFFSETS = 2**31 - 1
DROPOUT_ROUNDS = tl.constexpr(7)  # Philox rounds per call
DROPOUT_LANES = tl.constexpr(8)  # score elements per Philox call: four 32-bit words, two 16-bit draws each
_LEVELS = 65536  # 16-bit draws


def dropout_threshold(dropout_p: float) -> int:
    """The 16-bit threshold t: an element is kept when its draw is ≥ t (t = round(65536·p), ≤ 65535)."""
    return min(_LEVELS - 1, max(0, round(float(dropout_p) * _LEVELS)))


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels actually apply for `dropout_p`: t / 65536."""
    return dropout_threshold(dropout_p) / _LEVELS


def keep_scale(dropout_p: float) -> float:
    """1 / (exact keep probability) = 65536 / (65536 - t): the rescale of kept entries (unbiased dropout)."""
    return _LEVELS / (_LEVELS - dropout_threshold(dropout_p))


@triton.jit
def dropout_keep_tile(seed, bh, rows, col_start, threshold, BLOCK_N: tl.constexpr):
    """Keep-mask (True = kept) [rows.shape[0], BLOCK_N] of attention matrix bh = b·h + head, for query rows
    `rows` (int32 [BLOCK_M], counted in the sequence) and key columns col_start .. col_start + BLOCK_N - 1
    (col_start a multiple of 8), threshold t (int32, `dropout_threshold`). One 7-round Philox call per row
    and 8 columns."""
    BLOCK_M: tl.constexpr = rows.shape[0]
    GROUPS: tl.constexpr = BLOCK_N // DROPOUT_LANES
    key = bh.to(tl.int64) * 4294967296 + seed  # high word: (batch, head); low word: the user seed
    group = col_start // DROPOUT_LANES + tl.arange(0, GROUPS)
    c0 = tl.broadcast_to(group[None, :], [BLOCK_M, GROUPS])
    c1 = tl.broadcast_to(rows[:, None], [BLOCK_M, GROUPS])
    w0, w1, w2, w3 = tl.philox(key, c0, c1, 0, 0, DROPOUT_ROUNDS)
    # join adds a minor axis: join(join(w0, w2), join(w1, w3))[.., y, x] = word 2·y + x
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_M, GROUPS, 4])  # [.., w]: word w
    shifts = (tl.arange(0, 2) * 16).to(tl.uint32)
    draws = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFFFF  # [.., w, h]: lane 2·w + h
    keep = draws >= threshold.to(tl.uint32)
    return tl.reshape(keep, [BLOCK_M, BLOCK_N])


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
    see `attention_dropout_mask_varlen`. Kept entries are scaled by `keep_scale(dropout_p)`. Materialises
    B·h·Tq·Tk elements with int64 temporaries: meant for tests and the PyTorch fallback path, not for large
    shapes."""
    seed_t = seed if isinstance(seed, torch.Tensor) else draw_seed(seed)
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if Tq * Tk > MAX_OFFSETS:
        raise ValueError(f"Tq·Tk = {Tq * Tk} is over the dropout limit 2**31 - 1")
    return _keep_mask(seed_t, B, h, Tq, Tk, dropout_p, torch.device(device))


def attention_dropout_mask_varlen(
    seed: int | torch.Tensor,
    cu_seqlens: torch.Tensor,
    h: int,
    max_seqlen: int,
    dropout_p: float,
) -> torch.Tensor:
    """Keep-mask of a varlen call, in padded form [B, h, max_seqlen, max_seqlen] on cu_seqlens' device.

    Entry [b, head, i, j] belongs to query token cu_seqlens[b] + i and key token cu_seqlens[b] + j; entries
    with i or j ≥ the sequence's length are unused. By the counter scheme (module docstring) this equals
    `attention_dropout_mask(seed, B, h, max_seqlen, max_seqlen, dropout_p)`."""
    B = cu_seqlens.numel() - 1
    return attention_dropout_mask(seed, B, h, max_seqlen, max_seqlen, dropout_p, cu_seqlens.device)


def _keep_mask(seed: torch.Tensor, B: int, h: int, Tq: int, Tk: int, dropout_p: float, device) -> torch.Tensor:
    t = dropout_threshold(dropout_p)
    if t == 0:
        return torch.ones(B, h, Tq, Tk, dtype=torch.bool, device=device)
    lanes = DROPOUT_LANES.value
    groups = -(-Tk // lanes)
    bh = torch.arange(B * h, device=device, dtype=torch.int64).view(B * h, 1, 1)
    rows = torch.arange(Tq, device=device, dtype=torch.int64).view(1, Tq, 1)
    group = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, groups)
    key = bh * 2**32 + seed.reshape(()).to(device)  # the kernel's `key`: (seed, b·h + head)
    words = torch.stack(philox4x32(key, group, rows, 0, 0, DROPOUT_ROUNDS.value), dim=-1)  # (B·h, Tq, groups, 4)
    shifts = torch.arange(2, device=device, dtype=torch.int64) * 16
    draws = (words[..., None] >> shifts) & 0xFFFF  # (B·h, Tq, groups, 4 words, 2 halves): lane 2·w + h
    keep = (draws >= t).reshape(B * h, Tq, groups * lanes)[..., :Tk]
    return keep.reshape(B, h, Tq, Tk)
