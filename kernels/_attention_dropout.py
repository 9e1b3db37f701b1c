"""Attention dropout: the counter-based keep-mask shared by `softmax_dropout` and `attention`.

Nothing is stored: the kernels regenerate the mask in backward from (seed, position), and
`attention_dropout_mask` rebuilds the very same mask in plain PyTorch (`kernels._philox`), so references and
the PyTorch fallback path drop exactly what the kernels drop.

The scheme (one Philox call feeds 8 score elements, all four of its 32-bit output words used): with i the
query row and j the key column, both counted from the sequence's first token,

    philox key      = (seed, b·h + head)                       # seed < 2**31 low word, b·h+head high word
    philox counter  = (j // 4, 8·(i // 16) + i % 8, 0, 0)      # rows i and i + 8 share a call
    draw(i, j)      = (word[j % 4] >> 16·((i // 8) % 2)) & 0xFFFF
    keep(b, head, i, j)  <=>  draw ≥ t,   t = round(65536 · dropout_p)  (≤ 65535)

so a call covers rows {i, i + 8} × 4 consecutive columns, and each 32-bit word the pair (i, j), (i + 8, j).
Why that grouping: on Hopper a thread of a wgmma accumulator holds rows r and r + 8 of a 16-row slab (and pairs
of adjacent columns), in the forward's S [queries, keys] as in the backward's Sᵀ [keys, queries]; a word
{(i, j), (i + 8, j)} therefore belongs to one thread in both orientations, and moving the words from the layout
that computes them to the accumulator layout costs one word per two elements in both loops. (A grouping along
one axis only, e.g. 8 adjacent columns of a row, is cheap in the forward and twice as dear in the backward.)

with Philox-4x32 at 7 rounds. Why these choices:
- several elements per call: a score element is worth ≈ 10 lane-instructions of issue budget at d = 64 on an
  H100/H200 (PERF.md); one 10-round `tl.rand` call per element cost ≈ 55 SASS instructions per element in the
  forward loop. In a first version compiled for sm_90 (128×64 tile, 8 warps), 8 16-bit draws per 7-round
  call added ≈ 11 instructions per element and FlashAttention-2's 16 8-bit draws per call the same (±0.5): past
  a few elements per call the Philox rounds are not what costs, unpacking, moving and comparing the draws are.
  So 16-bit draws (the keep probability quantised to 2**-16 instead of 2**-8). With the grouping below, one wide
  multiply per Philox product and in-place compares, `python -m kernels.aot_check --dropout-cost` reads 7-9
  added instructions per score element in the forward loop and 9-11 in the backward loops (budget 12).
- 7 rounds: Philox-4x32-7 is the fewest rounds Salmon et al. (SC 2011) report as passing TestU01's BigCrush
  (10 is their safety margin); FlashAttention-2 uses 7 too. Dropout needs independent-looking bits, not
  strength against an adversary; tests/kernels/test_attention_dropout_stats.py checks the rate and the
  independence of elements that share a call, of neighbouring rows, heads, batches and seeds.
- quantised thresholds, unbiased: the keep probability is exactly q = (65536 - t) / 65536 (within 2**-17 of
  1 - p: for p = 0.1, t = 6554 and q = 0.899993896...). Kept entries are scaled by 1 / q (`keep_scale(p)`), so
  E[keep / q] = 1 exactly; every reference path uses the same factor. `effective_dropout_p(p)` = t / 65536.
- the counter is a function of (i, j) in one attention matrix, independent of tiles, layouts and strides: a
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

from kernels._common import draw_seed, interpreter_on
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


# Philox-4x32 constants (as Triton's `philox_impl`). Compiled, each round's two 32x32 -> 64-bit products are one
# `mul.wide.u32` each (one IMAD.WIDE.U32 on sm_90: high and low word together; `tl.philox` spends an IMAD.HI and
# an IMAD on each); under the interpreter (no inline PTX) the same products come from umulhi and a wrapping mul.
_ROUND_A = tl.constexpr(0xD2511F53)
_ROUND_B = tl.constexpr(0xCD9E8D57)
_KEY_A = tl.constexpr(0x9E3779B9)
_KEY_B = tl.constexpr(0xBB67AE85)
_INLINE_PTX = tl.constexpr(not interpreter_on())


@triton.jit
def _mul_wide_a(x):
    """(high, low) words of _ROUND_A · x for a uint32 tensor x."""
    if _INLINE_PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$1, $0}, t; }",
            "=r,=r,r", [x], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return tl.umulhi(x, _ROUND_A), x * _ROUND_A


@triton.jit
def _mul_wide_b(x):
    """(high, low) words of _ROUND_B · x for a uint32 tensor x."""
    if _INLINE_PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$1, $0}, t; }",
            "=r,=r,r", [x], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return tl.umulhi(x, _ROUND_B), x * _ROUND_B


@triton.jit
def philox_4x32_7(seed, bh, c0, c1):
    """`tl.philox(bh·2**32 + seed, c0, c1, 0, 0, 7)`: the four uint32 words for key (seed, bh) and counter
    (c0, c1, 0, 0) (uint32 tensors); the first round is specialised for c2 = c3 = 0."""
    k0 = seed.to(tl.uint32)
    k1 = bh.to(tl.uint32)
    hi_a, lo_a = _mul_wide_a(c0)
    x0 = c1 ^ k0  # hi(B·0) ^ c1 ^ k0
    x1 = tl.zeros_like(c0)  # lo(B·0)
    x2 = hi_a ^ k1  # hi(A·c0) ^ 0 ^ k1
    x3 = lo_a
    for _ in tl.static_range(DROPOUT_ROUNDS - 1):
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
        hi_b, lo_b = _mul_wide_b(x2)
        hi_a, lo_a = _mul_wide_a(x0)
        x0, x1, x2, x3 = hi_b ^ x1 ^ k0, lo_b, hi_a ^ x3 ^ k1, lo_a
    return x0, x1, x2, x3


@triton.jit
def _draw_groups(seed, bh, row_start, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep bits of rows row_start + [0, BLOCK_M) (row_start, BLOCK_M multiples of 16) and columns
    col_start + [0, BLOCK_N) (multiples of 4), as [BLOCK_M // 16, 8, BLOCK_N // 4, 4, 2] = [I, r, J, w, h]:
    row 16·I + 8·h + r, column 4·J + w. One 7-round Philox call per (I, r, J)."""
    ROW_BLOCKS: tl.constexpr = BLOCK_M // 16
    COL_GROUPS: tl.constexpr = BLOCK_N // 4
    pair = (row_start // 16 + tl.arange(0, ROW_BLOCKS))[:, None, None] * 8 + tl.arange(0, 8)[None, :, None]
    group = (col_start // 4 + tl.arange(0, COL_GROUPS))[None, None, :]
    c0 = tl.broadcast_to(group, [ROW_BLOCKS, 8, COL_GROUPS]).to(tl.uint32)
    c1 = tl.broadcast_to(pair, [ROW_BLOCKS, 8, COL_GROUPS]).to(tl.uint32)
    w0, w1, w2, w3 = philox_4x32_7(seed, bh, c0, c1)
    # join adds a minor axis: join(join(w0, w2), join(w1, w3))[.., y, x] = word 2·y + x
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROW_BLOCKS, 8, COL_GROUPS, 4])
    # draw h of a word is its 16-bit half h, compared in place: half h >= t  <=>  (word << 16·(1-h)) >= t << 16.
    # tl.join (not a broadcast over a new axis) keeps both halves in the thread that holds the word.
    t_hi = threshold.to(tl.uint32) << 16
    return tl.join((words << 16) >= t_hi, words >= t_hi)  # [I, r, J, w, h]


@triton.jit
def dropout_keep_tile(seed, bh, row_start, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask (True = kept) [BLOCK_M, BLOCK_N] of attention matrix bh = b·h + head for query rows
    row_start + [0, BLOCK_M) and key columns col_start + [0, BLOCK_N), counted in the sequence; row_start and
    BLOCK_M multiples of 16, col_start and BLOCK_N multiples of 4; threshold t (`dropout_threshold`)."""
    keep = _draw_groups(seed, bh, row_start, col_start, threshold, BLOCK_M, BLOCK_N)  # [I, r, J, w, h]
    return tl.reshape(tl.permute(keep, (0, 4, 1, 2, 3)), [BLOCK_M, BLOCK_N])  # [I, h, r | J, w]


@triton.jit
def dropout_keep_tile_t(seed, bh, row_start, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of `dropout_keep_tile`, [BLOCK_N keys, BLOCK_M queries], drawn in that orientation."""
    keep = _draw_groups(seed, bh, row_start, col_start, threshold, BLOCK_M, BLOCK_N)  # [I, r, J, w, h]
    return tl.reshape(tl.permute(keep, (2, 3, 0, 4, 1)), [BLOCK_N, BLOCK_M])  # [J, w | I, h, r]


@triton.jit
def dropout_keep(seed, bh, rows, cols, threshold):
    """`dropout_keep_tile` for any rows / columns (int32 [R], [C]) → [R, C]: one Philox call per element
    (the materialised softmax kernel, whose row blocks may be smaller than 16)."""
    i = rows[:, None]
    j = cols[None, :]
    c0 = tl.broadcast_to(j // 4, [rows.shape[0], cols.shape[0]]).to(tl.uint32)
    c1 = tl.broadcast_to((i // 16) * 8 + i % 8, [rows.shape[0], cols.shape[0]]).to(tl.uint32)
    w0, w1, w2, w3 = philox_4x32_7(seed, bh, c0, c1)
    w = j % 4
    word = tl.where(w == 0, w0, tl.where(w == 1, w1, tl.where(w == 2, w2, w3)))
    draw = (word >> (((i // 8) % 2) * 16).to(tl.uint32)) & 0xFFFF
    return draw >= threshold.to(tl.uint32)


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
    blocks, groups = -(-Tq // 16), -(-Tk // 4)
    bh = torch.arange(B * h, device=device, dtype=torch.int64).view(B * h, 1, 1, 1)
    pair = torch.arange(blocks * 8, device=device, dtype=torch.int64).view(1, blocks, 8, 1)  # 8·I + r
    group = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, 1, groups)  # J
    key = bh * 2**32 + seed.reshape(()).to(device)  # the kernel's `key`: (seed, b·h + head)
    words = torch.stack(philox4x32(key, group, pair, 0, 0, DROPOUT_ROUNDS.value), dim=-1)  # (B·h, I, r, J, w)
    shifts = torch.arange(2, device=device, dtype=torch.int64) * 16
    keep = ((words[..., None] >> shifts) & 0xFFFF) >= t  # (B·h, I, r, J, w, h)
    keep = keep.permute(0, 1, 5, 2, 3, 4).reshape(B * h, blocks * 16, groups * 4)  # rows 16·I + 8·h + r, cols 4·J + w
    return keep[:, :Tq, :Tk].reshape(B, h, Tq, Tk)
