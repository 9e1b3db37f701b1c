"""Flash-style fused attention with key padding / variable length and dropout, forward and backward.

Fused: S = Q·Kᵀ·scale, key padding (or per-sequence bounds in the varlen layout), online softmax in fp32,
dropout on the probabilities (rescaled by 1 / the exact keep probability), ·V — without materialising any
[T, T] tensor. Backward recomputes the probabilities from Q, K and the saved row logsumexp (fp32 [B, h, T] /
[h, total]); no probabilities and no dropout mask are stored. Backward = a small pass for delta = rowsum(dO ∘ O),
then by default FlashAttention-2's scheme: one program per key block, looping over the query blocks, S, P and
the dropout bits once per (query block, key block) pair, dK and dV accumulated in registers and dQ added into
an fp32 buffer with atomics (zeroed before every autotune trial). `deterministic=True` (or
`torch.use_deterministic_algorithms(True)`, or FASTBERT_DETERMINISTIC_ATTENTION=1 at import) runs the two-pass
backward instead: a dK/dV pass (per key block) and a dQ pass (per query block), no atomics, bitwise repeatable,
at 7 instead of 5 matrix products per block pair.

Bytes moved (e = element size, N = B·T·h·d·e): forward reads Q once and K, V once per query block
(mostly from L2), writes O (N) and the fp32 logsumexp (4·B·h·T); backward reads Q, K, V, O, dO and the
logsumexp and writes dQ, dK, dV (the default path also adds into and reads back an fp32 dQ, 2·4/e·N) — never
an O(T²) tensor. FLOPs (2 per multiply-add): forward 4·B·h·Tq·Tk·d (Q·Kᵀ, P·V); backward 10·B·h·Tq·Tk·d by
default (Q·Kᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K), 14·B·h·Tq·Tk·d with deterministic=True (S and dP computed twice).

Layouts:
- padded: q, k, v [B, T, h, d] (k, v may have their own length S), key_padding_mask bool [B, S]
  (True = real token) or additive float [B, 1, 1, S] (< -1 = padding).
- varlen: q, k, v [total_tokens, h, d] packed real tokens, cu_seqlens int32 [B+1] (cumulative lengths,
  cu_seqlens[0] == 0, cu_seqlens[-1] == total), max_seqlen ≥ every length. Use `kernels.padding`'s
  `unpad_input` / `pad_input` to get there and back.
q, k, v need a contiguous last dim only: views into one packed [B, T, 3, h, d] QKV buffer are read in
place (no copy). Outputs and gradients are contiguous.

Dropout: counter-based Philox-4x32-7, regenerated in backward, 8 16-bit draws per call (see
`kernels._attention_dropout`): key (seed, b·h + head), counter from (query row i, key column j) counted in the
sequence, so the padded call and the varlen call of the same batch and seed drop the same entries, whatever the
tile config. dropout_p is applied as t / 65536 with t = round(65536·p) (within 2**-17 of p) and kept entries are
scaled by 65536 / (65536 - t): unbiased. `attention_dropout_mask(seed, B, h, Tq, Tk, p)` /
`attention_dropout_mask_varlen(...)` rebuild the mask.

Dtypes: fp32 / fp16 / bf16 in and out (one dtype for q, k, v), fp32 accumulation; fp32 matmuls run in
IEEE fp32 (no TF32). Head dims 16..128 (padded to a power of two inside the kernel, masked).
Rows with no real key (all padding; or a zero-length sequence) give zeros, forward and backward.

Dispatch (kernels._common.use_triton): CUDA → Triton; CPU → Triton interpreter when TRITON_INTERPRET=1,
else the plain-PyTorch reference with the same Philox keep-mask (same result as the kernel for a seed,
but it materialises [B, h, T, T]). bf16 on the interpreter also takes the reference path, with a warning
(the interpreter's bf16 tl.dot is wrong).

Caution: no causal masking, no attention bias other than key padding, no head-dim > 128 or < 16, no MQA/GQA (q,
k, v share the head count). The padded layout still computes the padded query rows and visits padded key blocks
(masked): use the varlen layout to skip padding. Only the last, partial key block is bounds-checked in the
forward; with a padding mask every key block reads its mask bytes. The default backward's dQ sums come in a run-
dependent order (fp32 atomics): use deterministic=True for bitwise repeatability. 16-bit calls with head dim >
64 run the one-pass backward with 16- or 32-row query blocks only (dQ computed transposed; larger query blocks
spill there: dK and dV alone fill half the register file). Dropout needs Tq·row_stride < 2**31
(T ≤ 46340). In the varlen layout q and k share cu_seqlens (self-attention only). The cu_seqlens value checks
(monotonic, total, lengths ≤ max_seqlen) read cu_seqlens on the host once per tensor (cached by identity and
version) and are skipped while torch.compile traces.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from kernels._attention_dropout import (
    MAX_OFFSETS,
    attention_dropout_mask,
    attention_dropout_mask_varlen,
    dropout_keep_tile,
    dropout_keep_tile_t,
    dropout_threshold,
    effective_dropout_p,
    keep_scale,
)
from kernels._common import (
    FLOAT_DTYPES,
    check_dropout_p,
    check_same_dtype,
    check_tensor,
    draw_seed,
    interpreter_on,
    seed_value,
    use_triton,
)
from kernels.padding import pad_input, unpad_input
from kernels.softmax_dropout import key_padding_to_bool

__all__ = [
    "attention_dropout_mask",
    "attention_dropout_mask_varlen",
    "attention_ref",
    "attention_varlen_ref",
    "check_cu_seqlens",
    "fused_attention",
    "fused_attention_qkvpacked",
    "fused_attention_varlen",
    "fused_attention_varlen_qkvpacked",
    "pad_input",
    "unpad_input",
]

LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# --------------------------------------------------------------------------------------------------------
# Launch settings
# --------------------------------------------------------------------------------------------------------


# Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper (sm_90), one list per kernel, dtype class
# (fp32 / 16-bit) and BLOCK_D. Chosen from compile-time data only — `python -m kernels.aot_check` (registers,
# spills, shared memory, MMA family, warp layouts, from the ptxas / nvdisasm bundled with triton) — NOT from GPU
# timings: a GPU session must still time them and may drop slow ones. Rules for the 16-bit lists (fp16 compiled,
# key padding + dropout; `--gate` checks them all): every config lowers to wgmma (no mma.sync), no ptxas warning
# (C7515: wgmma serialized), every warpgroup owns >= 64 rows of each product (4 warps for 64-row products, 8 warps
# only with 128-row ones: 8 warps on a 64-row tile make both warpgroups compute the same rows), at most a few bytes
# of spill, shared memory within the 227 KB per block.
# What the data showed:
# - fp32 (IEEE dots: FMAs, no tensor cores) needs far more registers: most tiles of 64 rows or more spill
#   kilobytes from d = 64, and which small tiles stay clean is irregular. fp32 is the exactness path, not the
#   fast one: small tiles only, every one compiled spill-free with both training switch sets (key padding +
#   dropout, varlen + dropout). 8 warps spill least, and 1 stage spills more than 2 or 3, not less. Re-pruned from
#   the compiled code (before → after, spill bytes): forward d = 64 136–672 → 0 (16×32, 32×16, 16×16 with 8 warps;
#   32×32 spills 192 even with 8 warps, 360 with 1 stage), d = 128 264–4224 → 0 (only 16×16 with 8 warps is clean:
#   16×32 spills 296, 16×16 with 4 warps 544–600), d = 32 288–376 → 0 (32×32 / 3 stages: 32 with varlen); backward
#   (one-pass) d = 64 16 → 0, d = 128 32–468 → 0 (ptxas is irregular here: with 2 stages 16×32 spills 24 with varlen
#   and 16×16 16 with key padding, with 3 stages both are clean); dK/dV d = 64 (varlen) 16 → 0 and d = 128
#   24–32 → 0; dQ d = 64 12 → 0, d = 128 (varlen) 24 → 0.
# - forward: 128×64 and 128×128 with 8 warps and 64×64 / 64×128 with 4 warps are clean at every head dim;
#   128×128 with 4 warps (FA2 / the Triton tutorial) spills kilobytes from d = 32 and 128×64 with 4 warps from
#   d = 64, so those stay out.
# - one-pass backward (`bwd`: the products are Kᵀ-side [BLOCK_N, ·] and the dQ product, [BLOCK_M, d] or, for
#   16-bit query blocks under 64 rows, transposed [d, BLOCK_M]): 8 warps only with BLOCK_N = 128; at d = 32 / 64
#   64×64 with 4 warps and 64×128 with 8 are clean, 128-row query blocks and 4-warp 128-key blocks spill. At
#   d = 128 (dK and dV alone are 128 fp32 registers a thread) every 64- or 128-row query block spills or breaks a
#   rule, fp16, key padding + dropout, all at 255 registers: 64×64/4 warps 684 B (1 stage) / 432 (2), 64×128/8
#   380 / 316, 128×128/8 3112, 128×64/8 780 and WARP-DUP; 64×64/8 warps spills 0 (2 stages) / 28 (1) but both
#   warpgroups compute the same 64×64 Sᵀ / dPᵀ (warpsPerCTA [8, 1]). 16- and 32-row query blocks are clean since
#   dQ is computed transposed there (`DQ_T`, 16-bit only): as dS·K its M is BLOCK_M < 64, which lowered it to
#   mma.sync; dQᵀ = Kᵀ·dSᵀ has M = d = 128 and lowers to wgmma, and Sᵀ, Pᵀ, dPᵀ, dSᵀ shrink with BLOCK_M.
#   Before → after, spill bytes with key padding + dropout / varlen + dropout (and mma.sync → none in every
#   one): 32×64/4 warps 2 stages 376 / 128 → 0, 32×128/8 3 stages 52 / 0 → 0, 16×64/4 2 stages 172 / 96 → 0,
#   3 stages 96 / 0 → 0, 16×128/8 2 stages 16 / 0 → 0, 3 stages 40 / 0 → 0; the same 6 tiles are spill-free in
#   the other four switch sets too. Left out, transposed: 32×64/4 3 stages (24 / 48 B), 32×128/8 1 stage (12),
#   32×128/8 2 stages (clean in the training sets, 48 B padded with dropout and no key padding), 32×64/4 1 stage
#   (8 B with key padding, no dropout); 64-row blocks gain nothing from it (64×64/4 512 / 596, 64×128/8 324).
# - two-pass backward: dK/dV (BLOCK_N keys per program) 64×64 / 32×64 with 4 warps, 64×128 / 32×128 with 8;
#   dQ (BLOCK_M queries per program) 64-row tiles with 4 warps, 128-row tiles with 8. At d = 128 the 32×64 4-warp
#   dK/dV tile runs 2 stages: with 3 it spilled 8 B, with 2 (or 1) it spills 0.
# Head dims 16 and 32 share the BLOCK_D = 32 lists (d = 16 is not compiled separately: a smaller BLOCK_D should
# only lower register use).
_TILES_16BIT: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 32): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4),
                  (64, 128, 4, 2), (128, 32, 4, 3)],
    ("fwd", 64): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                  (64, 64, 4, 4), (64, 128, 4, 2)],
    ("fwd", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 8, 3),
                   (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3)],
    ("bwd", 32): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)],
    ("bwd", 64): [(64, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 3)],
    ("bwd", 128): [(32, 128, 8, 3), (32, 64, 4, 2), (16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 4, 2), (16, 64, 4, 3)],
    ("dkdv", 32): [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2),
                   (32, 128, 4, 2)],
    ("dkdv", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2)],
    ("dkdv", 128): [(32, 128, 8, 2), (32, 64, 4, 2)],
    ("dq", 32): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
                 (64, 32, 4, 3), (128, 32, 4, 2)],
    ("dq", 64): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
                 (64, 32, 4, 3), (128, 32, 4, 2)],
    ("dq", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
}  # fmt: skip
_TILES_FP32: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 32): [(32, 64, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2), (16, 64, 8, 2), (64, 16, 8, 2), (32, 16, 8, 2)],
    ("fwd", 64): [(16, 32, 8, 2), (16, 32, 8, 3), (32, 16, 8, 2), (16, 16, 8, 2)],
    ("fwd", 128): [(16, 16, 8, 2), (16, 16, 8, 3)],
    ("bwd", 32): [(32, 32, 4, 2), (32, 32, 4, 3), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("bwd", 64): [(32, 16, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
    ("bwd", 128): [(32, 16, 8, 2), (32, 16, 8, 3), (16, 32, 8, 3), (16, 16, 8, 3)],
    ("dkdv", 32): [(32, 32, 4, 2), (32, 32, 4, 3), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dkdv", 64): [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 128): [(16, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("dq", 32): [(32, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 3)],
    ("dq", 64): [(32, 32, 4, 2), (32, 32, 4, 3), (16, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dq", 128): [(32, 32, 4, 2), (16, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
}  # fmt: skip
# The interpreter runs every config in numpy: one small tile keeps the CPU tests fast.
_INTERPRETER_TILE = (64, 32, 4, 1)


def _config(tile: tuple[int, int, int, int]) -> triton.Config:
    m, n, w, s = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _tile(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def attn_tiles(kernel: str, dtype: torch.dtype, block_d: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries for `kernel` ("fwd", "bwd", "dkdv", "dq") at this
    dtype and BLOCK_D; the single interpreter tile under TRITON_INTERPRET=1."""
    if interpreter_on():
        return [_INTERPRETER_TILE]
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    return table[(kernel, max(block_d, 32))]


def _configs(kernel: str) -> list[triton.Config]:
    """Every config `kernel` may use (the union over dtypes and head dims); `_prune` picks the launch's list."""
    if interpreter_on():
        return [_config(_INTERPRETER_TILE)]
    tables = (_TILES_16BIT, _TILES_FP32)
    tiles = [t for table in tables for (name, _), ts in table.items() if name == kernel for t in ts]
    return [_config(t) for t in dict.fromkeys(tiles)]  # the union, without duplicates


def _prune(kernel: str):
    """`early_config_prune` for `kernel`: keep the configs of the launch's dtype (Q's) and BLOCK_D.

    Why a prune function rather than one autotuned wrapper per list: one kernel object per kernel, the launchers
    stay unchanged, and `kernels.aot_check` calls this same function to compile exactly what will be tried.
    The autotune cache key needs no extra entry: it holds D (hence BLOCK_D), and Triton appends the dtype of
    every tensor argument to it."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        wanted = set(attn_tiles(kernel, named_args["Q"].dtype, kwargs["BLOCK_D"]))
        return [c for c in configs if _tile(c) in wanted]

    return prune


def _seq_bucket(n: int) -> int:
    """Autotune key for the sequence length: powers of two up to 2048, then one bucket."""
    return min(triton.next_power_of_2(max(n, 1)), 4096)


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _seq_bounds(CU, b, Tq, Tk, VARLEN: tl.constexpr):
    """(first query token, first key token, query length, key length) of sequence b."""
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
        return start, start, length, length
    else:
        zero = (b * 0).to(tl.int32)
        return zero, zero, Tq, Tk


@triton.jit
def _key_bias(KEEP_KEY, b, cols, len_k, Tk, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr):
    """0 for a real key, -inf for padding or a column past the sequence: added to the base-2 logits, where it
    fuses with the softmax scale into one FMA (no select per score element)."""
    if BOUNDARY:
        ok = cols < len_k
        if HAS_MASK:
            ok &= tl.load(KEEP_KEY + b.to(tl.int64) * Tk + cols, mask=cols < len_k, other=0) != 0
    else:  # a full block: only the padding mask can remove a key
        ok = tl.load(KEEP_KEY + b.to(tl.int64) * Tk + cols) != 0
    return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, KEEP_KEY, seed, b, bh, row_start, offs_d, d_ok, start_n, len_k, Tk,
    sk_t, sv_t, qk_scale, drop_t,
    BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One key block of the online softmax. BOUNDARY: the last, partial block (columns past len_k masked); the
    # full blocks before it load without bounds and, without a padding mask, add no bias at all.
    cols = start_n + tl.arange(0, BLOCK_N)
    if BOUNDARY:
        n_ok = cols < len_k
        kT = tl.load(k_base + cols[None, :] * sk_t + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        kT = tl.load(k_base + cols[None, :] * sk_t + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    s = _dot(q, kT, IEEE)  # (BLOCK_M, BLOCK_N) fp32
    if BOUNDARY or HAS_MASK:
        s = s * qk_scale + _key_bias(KEEP_KEY, b, cols, len_k, Tk, HAS_MASK, BOUNDARY)[None, :]
    else:
        s = s * qk_scale  # base-2 logits
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no real key yet: avoid inf - inf
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
    if HAS_DROPOUT:  # the 1 / keep-probability rescale is applied once, to the output
        p = tl.where(dropout_keep_tile(seed, bh, row_start, start_n, drop_t, q.shape[0], BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


# Forward FLOPs: 4·Tq·Tk·d per (sequence, head) — Q·Kᵀ and P·V, 2·Tq·Tk·d each.
@triton.autotune(
    configs=_configs("fwd"),
    key=["D", "SEQ_BUCKET", "VARLEN", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune("fwd")},
)
@triton.jit(do_not_specialize=["seed", "drop_t"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KEEP_KEY, CU, seed,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_h,
    H, Tq, Tk, D, qk_scale, drop_t, inv_keep, SEQ_BUCKET,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M query rows of one (sequence, head); loops over key blocks with an online
    # softmax (running max m_i and sum l_i, in base 2: qk_scale = softmax_scale · log2(e)).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    q_start, k_start, len_q, len_k = _seq_bounds(CU, b, Tq, Tk, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + q_start.to(tl.int64) * sq_t
    k_base = K + b.to(tl.int64) * sk_b + head.to(tl.int64) * sk_h + k_start.to(tl.int64) * sk_t
    v_base = V + b.to(tl.int64) * sv_b + head.to(tl.int64) * sv_h + k_start.to(tl.int64) * sv_t
    q = tl.load(q_base + offs_m[:, None] * sq_t + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (len_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no bounds checks
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, KEEP_KEY, seed, b, bh, pid_m * BLOCK_M, offs_d, d_ok, start_n, len_k, Tk,
            sk_t, sv_t, qk_scale, drop_t, False, HAS_MASK, HAS_DROPOUT, IEEE, BLOCK_N,
        )  # fmt: skip
    if n_full < len_k:  # the boundary block
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, KEEP_KEY, seed, b, bh, pid_m * BLOCK_M, offs_d, d_ok, n_full, len_k, Tk,
            sk_t, sv_t, qk_scale, drop_t, True, HAS_MASK, HAS_DROPOUT, IEEE, BLOCK_N,
        )  # fmt: skip

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc * tl.where(l_ok, inv_keep / l_safe, 0.0)[:, None]  # no real key: zeros
    lse = tl.where(l_ok, m_i + tl.log2(l_safe), 0.0)  # base 2; 0 for empty rows (their p is 0 anyway)
    o_base = O + b.to(tl.int64) * so_b + head.to(tl.int64) * so_h + q_start.to(tl.int64) * so_t
    tl.store(o_base + offs_m[:, None] * so_t + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])  # fmt: skip
    l_base = LSE + b.to(tl.int64) * sl_b + head.to(tl.int64) * sl_h + q_start.to(tl.int64)
    tl.store(l_base + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU,
    so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, sl_b, sl_h,
    H, Tq, D,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # delta = rowsum(dO ∘ O) (= rowsum(dP ∘ P) of the softmax backward, dropout included).
    # Moves 2 · BLOCK_M · d · e bytes in, 4 · BLOCK_M out.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    q_start, _, len_q, _ = _seq_bounds(CU, b, Tq, Tq, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < len_q)[:, None] & (offs_d < D)[None, :]
    o_base = O + b.to(tl.int64) * so_b + head.to(tl.int64) * so_h + q_start.to(tl.int64) * so_t
    do_base = DO + b.to(tl.int64) * sdo_b + head.to(tl.int64) * sdo_h + q_start.to(tl.int64) * sdo_t
    o = tl.load(o_base + offs_m[:, None] * so_t + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * sdo_t + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    l_base = DELTA + b.to(tl.int64) * sl_b + head.to(tl.int64) * sl_h + q_start.to(tl.int64)
    tl.store(l_base + offs_m, tl.sum(o * do, 1), mask=offs_m < len_q)


# Backward, with P = softmax(S), Z the keep-mask, q the keep probability, Pd = Z ∘ P / q, O = Pd·V:
#   dV = Pdᵀ·dO      dP = Z ∘ (dO·Vᵀ) / q      dS = P ∘ (dP - delta),  delta = rowsum(dO ∘ O)
#   dQ = scale · dS·K      dK = scale · dSᵀ·Q
# P is recomputed as exp2(S·log2e - lse2) from the saved base-2 logsumexp. Rows past the sequence load
# lse = +inf, so their P is exactly 0 without a select; padded keys get a -inf logit bias (one FMA).
#
# The default backward (`_attn_bwd_kernel`, FlashAttention-2's scheme): one program per key block, a loop over
# the query blocks; per (query block, key block) pair S, P and the dropout bits once and 5 products —
# S = K·Qᵀ, dP = V·dOᵀ, dV += Pdᵀ·dO, dK += dSᵀ·Q, dQ += dS·K — with dK, dV in registers and dQ added into an
# fp32 buffer with atomics: 10·Tq·Tk·d FLOPs per (sequence, head). Atomic adds make the order of the dQ sums,
# hence its last bits, vary from run to run.
# The deterministic backward (`deterministic=True`): a dK/dV kernel (per key block, looping over query blocks:
# S, dP, dV, dK) and a dQ kernel (per query block, looping over key blocks: S, dP, dQ) — no atomics, bitwise
# repeatable, but S, P, dP and the dropout bits are computed twice: 7 products, 14·Tq·Tk·d FLOPs.
@triton.jit
def _bwd_kv_step(
    dk, dv, k, v, kbias, Q, DO, LSE, DELTA, DQ, seed, bh, q_base, do_base, dq_base, l_base, start_m, start_n,
    offs_m, offs_d, d_ok, len_q, sq_t, sdo_t, sdq_t, qk_scale, drop_t, inv_keep,
    HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = start_m + offs_m
    m_ok = rows < len_q
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :], mask=qd_ok, other=0.0)
    do = tl.load(do_base + rows[:, None] * sdo_t + offs_d[None, :], mask=qd_ok, other=0.0)
    # The keep-scale 1/q rides in the exponent: pT_s = P / q = exp2(S - lse + log2(1/q)) (a per-row shift), so
    #   Pd = Z ∘ pT_s,   dS = P ∘ (Z ∘ dP_raw / q - delta) = Pd ∘ dP_raw - pT_s ∘ (q · delta)
    # with dP_raw = dO·Vᵀ: dropout costs one select per element (no rescale of dP, none of dV after the loop).
    lse = tl.load(LSE + l_base + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + l_base + rows, mask=m_ok, other=0.0)
    if HAS_DROPOUT:
        lse -= tl.log2(inv_keep)
        delta /= inv_keep
    sT = _dot(k, tl.trans(q), IEEE) * qk_scale + kbias[:, None]  # (BLOCK_N, BLOCK_M) base-2 logits
    pT = tl.exp2(sT - lse[None, :])  # P / q
    dpT = _dot(v, tl.trans(do), IEEE)  # dP before dropout
    if HAS_DROPOUT:
        keepT = dropout_keep_tile_t(seed, bh, start_m, start_n, drop_t, offs_m.shape[0], BLOCK_N)  # (BLOCK_N, BLOCK_M)
        pdT = tl.where(keepT, pT, 0.0)
        dsT = pdT * dpT - pT * delta[None, :]
    else:
        pdT = pT
        dsT = pT * (dpT - delta[None, :])
    dv += _dot(pdT.to(do.dtype), do, IEEE)
    dk += _dot(dsT.to(q.dtype), q, IEEE)
    if ATOMIC_DQ:  # softmax scale applied on the host
        if DQ_T:
            # dQᵀ = Kᵀ·dSᵀ, added through transposed pointers: its M is BLOCK_D, not BLOCK_M, so a 16- or 32-row
            # query block still lowers to wgmma (dS·K would take mma.sync: wgmma needs M >= 64 per warpgroup).
            dqT = _dot(tl.trans(k), dsT.to(k.dtype), IEEE)  # (BLOCK_D, BLOCK_M)
            tl.atomic_add(dq_base + rows[None, :] * sdq_t + offs_d[:, None], dqT, mask=d_ok[:, None] & m_ok[None, :],
                          sem="relaxed")  # fmt: skip
        else:
            dq = _dot(tl.trans(dsT.to(k.dtype)), k, IEEE)  # (BLOCK_M, BLOCK_D)
            tl.atomic_add(dq_base + rows[:, None] * sdq_t + offs_d[None, :], dq, mask=qd_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_kv_program(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KEEP_KEY, CU, seed,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdk_b, sdk_t, sdk_h, sdq_b, sdq_t, sdq_h, sl_b, sl_h,
    H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DQ_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N keys of one (sequence, head); loops over all query blocks. Works transposed
    # ([BLOCK_N, BLOCK_M] tiles) so dK and dV accumulate without transposing the products.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    q_start, k_start, len_q, len_k = _seq_bounds(CU, b, Tq, Tk, VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < len_k
    d_ok = offs_d < D
    kbias = _key_bias(KEEP_KEY, b, offs_n, len_k, Tk, HAS_MASK, True)  # once per program, not per block pair
    kd_ok = n_ok[:, None] & d_ok[None, :]
    k_base = K + b.to(tl.int64) * sk_b + head.to(tl.int64) * sk_h + k_start.to(tl.int64) * sk_t
    v_base = V + b.to(tl.int64) * sv_b + head.to(tl.int64) * sv_h + k_start.to(tl.int64) * sv_t
    k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :], mask=kd_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :], mask=kd_ok, other=0.0)
    q_base = Q + b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + q_start.to(tl.int64) * sq_t
    do_base = DO + b.to(tl.int64) * sdo_b + head.to(tl.int64) * sdo_h + q_start.to(tl.int64) * sdo_t
    dq_base = DQ + b.to(tl.int64) * sdq_b + head.to(tl.int64) * sdq_h + q_start.to(tl.int64) * sdq_t
    l_base = b.to(tl.int64) * sl_b + head.to(tl.int64) * sl_h + q_start.to(tl.int64)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, len_q, BLOCK_M):
        dk, dv = _bwd_kv_step(
            dk, dv, k, v, kbias, Q, DO, LSE, DELTA, DQ, seed, bh, q_base, do_base, dq_base, l_base, start_m,
            start_n, offs_m, offs_d, d_ok, len_q, sq_t, sdo_t, sdq_t, qk_scale, drop_t, inv_keep,
            HAS_DROPOUT, IEEE, ATOMIC_DQ, DQ_T, BLOCK_N,
        )  # fmt: skip

    dk_base = DK + b.to(tl.int64) * sdk_b + head.to(tl.int64) * sdk_h + k_start.to(tl.int64) * sdk_t
    dv_base = DV + b.to(tl.int64) * sdk_b + head.to(tl.int64) * sdk_h + k_start.to(tl.int64) * sdk_t
    out_offs = offs_n[:, None] * sdk_t + offs_d[None, :]
    tl.store(dk_base + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(dv_base + out_offs, dv.to(DV.dtype.element_ty), mask=kd_ok)


@triton.autotune(
    configs=_configs("bwd"),
    key=["D", "SEQ_BUCKET", "VARLEN", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune("bwd")},
    reset_to_zero=["DQ"],  # dQ is accumulated with atomics: every autotune trial starts from zeros
)
@triton.jit(do_not_specialize=["seed", "drop_t"])
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KEEP_KEY, CU, seed,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdk_b, sdk_t, sdk_h, sdq_b, sdq_t, sdq_h, sl_b, sl_h,
    H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep, SEQ_BUCKET,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # dK, dV of BLOCK_N keys, and their share of dQ added into the fp32 buffer DQ (zeroed by the launcher).
    # 16-bit query blocks under 64 rows compute dQ transposed (see `_bwd_kv_step`); fp32 (FMA dots) never does:
    # there the transposed form spilled 8–20 B on shipped tiles that are clean as they are.
    DQ_T: tl.constexpr = BLOCK_M < 64 and not IEEE
    _bwd_kv_program(
        Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KEEP_KEY, CU, seed,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
        sdk_b, sdk_t, sdk_h, sdq_b, sdq_t, sdq_h, sl_b, sl_h,
        H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep,
        VARLEN, HAS_MASK, HAS_DROPOUT, IEEE, True, DQ_T, BLOCK_D, BLOCK_M, BLOCK_N,
    )  # fmt: skip


@triton.autotune(
    configs=_configs("dkdv"),
    key=["D", "SEQ_BUCKET", "VARLEN", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune("dkdv")},
)
@triton.jit(do_not_specialize=["seed", "drop_t"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEEP_KEY, CU, seed,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdk_b, sdk_t, sdk_h, sl_b, sl_h,
    H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep, SEQ_BUCKET,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Deterministic backward, pass 1: dK and dV only (4 products per block pair, no atomics).
    _bwd_kv_program(
        Q, K, V, DO, LSE, DELTA, DK, DV, Q, KEEP_KEY, CU, seed,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
        sdk_b, sdk_t, sdk_h, 0, 0, 0, sl_b, sl_h,
        H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep,
        VARLEN, HAS_MASK, HAS_DROPOUT, IEEE, False, False, BLOCK_D, BLOCK_M, BLOCK_N,
    )  # fmt: skip


@triton.autotune(
    configs=_configs("dq"),
    key=["D", "SEQ_BUCKET", "VARLEN", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune("dq")},
)
@triton.jit(do_not_specialize=["seed", "drop_t"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEEP_KEY, CU, seed,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdq_b, sdq_t, sdq_h, sl_b, sl_h,
    H, Tq, Tk, D, qk_scale, sm_scale, drop_t, inv_keep, SEQ_BUCKET,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Deterministic backward, pass 2: one program per BLOCK_M queries, looping over all key blocks
    # (3 products per block pair: S, dP and dQ).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    q_start, k_start, len_q, len_k = _seq_bounds(CU, b, Tq, Tk, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = offs_d < D
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q_base = Q + b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + q_start.to(tl.int64) * sq_t
    do_base = DO + b.to(tl.int64) * sdo_b + head.to(tl.int64) * sdo_h + q_start.to(tl.int64) * sdo_t
    q = tl.load(q_base + offs_m[:, None] * sq_t + offs_d[None, :], mask=qd_ok, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdo_t + offs_d[None, :], mask=qd_ok, other=0.0)
    l_base = b.to(tl.int64) * sl_b + head.to(tl.int64) * sl_h + q_start.to(tl.int64)
    lse = tl.load(LSE + l_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + l_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * sk_b + head.to(tl.int64) * sk_h + k_start.to(tl.int64) * sk_t
    v_base = V + b.to(tl.int64) * sv_b + head.to(tl.int64) * sv_h + k_start.to(tl.int64) * sv_t

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < len_k
        kd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :], mask=kd_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=kd_ok, other=0.0)
        kbias = _key_bias(KEEP_KEY, b, cols, len_k, Tk, HAS_MASK, True)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale + kbias[None, :]  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), IEEE)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, bh, pid_m * BLOCK_M, start_n, drop_t, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp, 0.0) * inv_keep
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)

    dq_base = DQ + b.to(tl.int64) * sdq_b + head.to(tl.int64) * sdq_h + q_start.to(tl.int64) * sdq_t
    tl.store(dq_base + offs_m[:, None] * sdq_t + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qd_ok)  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Launchers (custom ops: opaque to torch.compile; fake implementations give shapes and dtypes)
# --------------------------------------------------------------------------------------------------------


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, h, d] tensor, or (0, token, head) of a [total, h, d] one."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _geometry(q, k, cu_seqlens, max_seqlen):
    """(B, H, Tq, Tk, dropout row_stride, lse shape, lse (batch, head) strides) of a padded or varlen call."""
    if cu_seqlens is None:
        B, Tq, H, _ = q.shape
        Tk = k.shape[1]
        return B, H, Tq, Tk, Tk, (B, H, Tq), (H * Tq, Tq)
    total, H, _ = q.shape
    B = cu_seqlens.shape[0] - 1
    return B, H, max_seqlen, max_seqlen, max_seqlen, (H, total), (0, total)


@torch.library.custom_op("kernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_key: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens is not None
    B, H, Tq, Tk, _, lse_shape, (sl_b, sl_h) = _geometry(q, k, cu_seqlens, max_seqlen)
    D = q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Tk == 0:
        return out.zero_(), lse.zero_()
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        keep_key.view(torch.uint8) if keep_key is not None else q,
        cu_seqlens if varlen else q,
        seed_value(seed),
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        sl_b, sl_h,
        H, Tq, Tk, D, softmax_scale * LOG2E, dropout_threshold(dropout_p), keep_scale(dropout_p),
        _seq_bucket(max(Tq, Tk)),
        VARLEN=varlen, HAS_MASK=keep_key is not None, HAS_DROPOUT=dropout_threshold(dropout_p) > 0,
        IEEE=q.dtype == torch.float32,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    lse_shape = _geometry(q, k, cu_seqlens, max_seqlen)[5]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


def _flash_attn_bwd_into(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep_key: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    deterministic: bool = False,
) -> None:
    """The backward launches, writing into dq, dk, dv (any strides with a unit last one; dk and dv alike).
    `deterministic`: the two-pass dK/dV + dQ kernels (7 products per block pair, no atomics) instead of the
    one-pass kernel (5 products, dQ accumulated with fp32 atomics)."""
    varlen = cu_seqlens is not None
    B, H, Tq, Tk, _, _, (sl_b, sl_h) = _geometry(q, k, cu_seqlens, max_seqlen)
    D = q.shape[-1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    if dq.numel() == 0 or dk.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(Tq, 64), B * H)](
        out, do, delta, cu_seqlens if varlen else q,
        *_strides3(out, varlen), *_strides3(do, varlen), sl_b, sl_h,
        H, Tq, D,
        VARLEN=varlen, BLOCK_M=64, BLOCK_D=block_d,
    )  # fmt: skip
    common = dict(
        VARLEN=varlen, HAS_MASK=keep_key is not None, HAS_DROPOUT=dropout_threshold(dropout_p) > 0,
        IEEE=q.dtype == torch.float32, BLOCK_D=block_d,
    )  # fmt: skip
    scalars = (H, Tq, Tk, D, softmax_scale * LOG2E, softmax_scale, dropout_threshold(dropout_p),
               keep_scale(dropout_p), _seq_bucket(max(Tq, Tk)))  # fmt: skip
    mask_arg = keep_key.view(torch.uint8) if keep_key is not None else q
    cu_arg = cu_seqlens if varlen else q
    in_strides = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen))
    kv_grid = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H)
    # Every shipped list has one-pass tiles (16-bit d = 128: 16- / 32-row query blocks, dQ computed transposed);
    # an empty one would fall back to the two-pass backward.
    if not deterministic and attn_tiles("bwd", q.dtype, block_d):
        # One pass, 5 products per block pair; dQ accumulates in fp32 (zeros: the kernel adds into it).
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _attn_bwd_kernel[kv_grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc, mask_arg, cu_arg, seed_value(seed),
            *in_strides, *_strides3(dk, varlen), *_strides3(dq_acc, varlen), sl_b, sl_h, *scalars, **common,
        )  # fmt: skip
        dq.copy_(dq_acc.mul_(softmax_scale))
        return
    _attn_bwd_dkdv_kernel[kv_grid](
        q, k, v, do, lse, delta, dk, dv, mask_arg, cu_arg, seed_value(seed),
        *in_strides, *_strides3(dk, varlen), sl_b, sl_h, *scalars, **common,
    )  # fmt: skip
    _attn_bwd_dq_kernel[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, mask_arg, cu_arg, seed_value(seed),
        *in_strides, *_strides3(dq, varlen), sl_b, sl_h, *scalars, **common,
    )  # fmt: skip


@torch.library.custom_op("kernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep_key: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _flash_attn_bwd_into(do, q, k, v, out, lse, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
                         dq, dk, dv, deterministic)  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("kernels::flash_attn_bwd_qkvpacked", mutates_args=())
def _flash_attn_bwd_qkvpacked(
    do: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep_key: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor,
    deterministic: bool = False,
) -> torch.Tensor:
    """dqkv [..., 3, h, d] in one buffer (the layout of qkv): dq, dk, dv written in place, no concatenation."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _flash_attn_bwd_into(do, *qkv.unbind(-3), out, lse, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                         seed, *dqkv.unbind(-3), deterministic)  # fmt: skip
    return dqkv


@_flash_attn_bwd_qkvpacked.register_fake
def _(do, qkv, out, lse, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, deterministic=False):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, deterministic=False):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, deterministic=False):
        out, lse = _flash_attn_fwd(q, k, v, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, keep_key, cu_seqlens, seed)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, keep_key, cu_seqlens, seed = ctx.saved_tensors
        dq, dk, dv = _flash_attn_bwd(
            do, q, k, v, out, lse, keep_key, cu_seqlens, ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale, seed,
            ctx.deterministic,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


class FlashAttnQKVPackedFunction(torch.autograd.Function):
    """`FlashAttnFunction` on one packed qkv [..., 3, h, d]: its gradient is one dqkv buffer of that layout, which a
    fused QKV projection's backward reads as ``[M, 3H]`` directly (no torch.cat of dq, dk, dv)."""

    @staticmethod
    def forward(ctx, qkv, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, deterministic=False):
        q, k, v = qkv.unbind(-3)
        out, lse = _flash_attn_fwd(q, k, v, keep_key, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)
        ctx.save_for_backward(qkv, out, lse, keep_key, cu_seqlens, seed)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, do):
        qkv, out, lse, keep_key, cu_seqlens, seed = ctx.saved_tensors
        dqkv = _flash_attn_bwd_qkvpacked(
            do, qkv, out, lse, keep_key, cu_seqlens, ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale, seed,
            ctx.deterministic,
        )
        return dqkv, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _check_qkv(q: object, k: object, v: object, ndim: int) -> None:
    layout = "[B, T, h, d]" if ndim == 4 else "[total_tokens, h, d]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES, device=q.device if name != "q" else None)
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got {t.stride()}")
    check_same_dtype(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {list(k.shape)} and {list(v.shape)}")
    same = (q.shape[0], q.shape[-2], q.shape[-1]) == (k.shape[0], k.shape[-2], k.shape[-1])
    if ndim == 3:
        same = q.shape == k.shape
    if not same:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} do not match (layout {layout})")
    d = q.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM):
        raise ValueError(f"head dim {d} out of range [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def _check_scale(softmax_scale: object, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_offsets(Tq: int, row_stride: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and Tq * row_stride > MAX_OFFSETS:
        raise ValueError(f"sequence too long for dropout: Tq·Tk = {Tq * row_stride} is over the limit 2**31 - 1")


# FASTBERT_DETERMINISTIC_ATTENTION=1 (read once, at import: a training script sets it before importing)
# makes deterministic=None mean True.
_DETERMINISTIC_ENV = os.environ.get("FASTBERT_DETERMINISTIC_ATTENTION", "0") == "1"


def _check_deterministic(deterministic: object) -> bool:
    if deterministic is None:
        return _DETERMINISTIC_ENV or torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool or None, got {deterministic!r}")
    return deterministic


# cu_seqlens tensors whose values were already checked, with the (version, total, max_seqlen) checked:
# an encoder passes the same cu_seqlens to every layer, so only the first layer pays the host copy.
_checked_cu = WeakIdKeyDictionary()


def _check_cu_seqlens(
    cu_seqlens: object, max_seqlen: object, total: int, device: torch.device, values: bool = True
) -> None:
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, device=device)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (like FlashAttention), got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have B+1 >= 2 entries, got shape {list(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not values or torch.compiler.is_compiling():
        return  # the caller vouches for the values; under compilation they are data (a check would break the graph)
    # Cached per tensor version: the encoder passes one cu_seqlens to every layer (one host sync, not twelve).
    # Inference tensors have no version counter: those are checked every call.
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    key = (version, total, max_seqlen)
    if version is not None and _checked_cu.get(cu_seqlens) == key:
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1] = {cu[-1]} must equal the number of packed tokens {total}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"a sequence has length {max(lengths)} > max_seqlen = {max_seqlen}")
    if version is not None:
        _checked_cu[cu_seqlens] = key


def mark_cu_seqlens_checked(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Record that `cu_seqlens`' values were validated on the host before it reached the device (packing metadata
    from a CPU data loader), so `fused_attention_varlen` skips its device-to-host copy of them for this version."""
    if not torch.compiler.is_compiling() and not cu_seqlens.is_inference():
        _checked_cu[cu_seqlens] = (cu_seqlens._version, total, max_seqlen)


def check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> None:
    """What `fused_attention_varlen` checks of cu_seqlens (one device-to-host copy of its values), for a caller that
    checks once and then calls the kernels of every layer with ``validate_cu_seqlens=False``."""
    _check_cu_seqlens(cu_seqlens, max_seqlen, total, cu_seqlens.device)


def _run_kernel(q: torch.Tensor, *others: torch.Tensor) -> bool:
    """use_triton, except bf16 on the CPU interpreter, whose bf16 tl.dot is wrong: reference path there."""
    if not use_triton(q, *others):
        return False
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        warnings.warn(
            "fused attention: the Triton interpreter cannot do bf16 tl.dot; using the PyTorch reference path",
            stacklevel=3,
        )
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale, padded keys removed) with dropout, ·V. q [B, Tq, h, d], k/v [B, Tk, h, d].

    key_padding_mask: bool [B, Tk] (True = real token), additive float [B, 1, 1, Tk] (0 = real token,
    very negative = padding), or None. softmax_scale defaults to 1/√d. seed: int in [0, 2**31) or None
    (drawn from torch's generator). dropout_p is applied as t / 65536, t = round(65536·p), and kept entries
    are scaled by the exact 1 / keep-probability (`kernels._attention_dropout`). deterministic: True runs the
    two-pass backward without atomics (bitwise repeatable dQ, 7 products per block pair instead of 5); None
    means True when `torch.use_deterministic_algorithms(True)` is on or FASTBERT_DETERMINISTIC_ATTENTION=1 was
    set when kernels.attention was imported, else False.
    Returns a contiguous [B, Tq, h, d] tensor in q's dtype; differentiable in q, k, v.
    """
    _check_qkv(q, k, v, ndim=4)
    B, Tq, H, d = q.shape
    Tk = k.shape[1]
    keep_key = key_padding_to_bool(key_padding_mask, B, Tk, q.device)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(softmax_scale, d)
    _check_offsets(Tq, Tk, dropout_p)
    deterministic = _check_deterministic(deterministic)
    seed_t = draw_seed(seed)
    if _run_kernel(q, k, v):
        return FlashAttnFunction.apply(q, k, v, keep_key, None, 0, dropout_p, scale, seed_t, deterministic)
    dropout_mask = attention_dropout_mask(seed_t, B, H, Tq, Tk, dropout_p, q.device) if dropout_p else None
    return attention_ref(q, k, v, keep_key, dropout_p, scale, dropout_mask=dropout_mask, upcast=True)


def fused_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    deterministic: bool | None = None,
    *,
    validate_cu_seqlens: bool = True,
) -> torch.Tensor:
    """`fused_attention` on packed real tokens: q, k, v [total_tokens, h, d], sequence b is tokens
    cu_seqlens[b] : cu_seqlens[b+1] (int32 [B+1]); max_seqlen ≥ every length. No work is done on padding.
    Drops the same entries as the padded call of the same batch and seed. Returns a contiguous
    [total_tokens, h, d] tensor. cu_seqlens' values are read back and checked (one host sync, cached per tensor
    version outside inference mode) unless `validate_cu_seqlens=False`: for a caller that made them itself or ran
    `check_cu_seqlens` once for all its layers (shape and dtype are checked either way).
    """
    _check_qkv(q, k, v, ndim=3)
    total, H, d = q.shape
    _check_cu_seqlens(cu_seqlens, max_seqlen, total, q.device, validate_cu_seqlens)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(softmax_scale, d)
    _check_offsets(max_seqlen, max_seqlen, dropout_p)
    deterministic = _check_deterministic(deterministic)
    seed_t = draw_seed(seed)
    if _run_kernel(q, k, v, cu_seqlens):
        return FlashAttnFunction.apply(q, k, v, None, cu_seqlens, max_seqlen, dropout_p, scale, seed_t, deterministic)
    dropout_mask = attention_dropout_mask_varlen(seed_t, cu_seqlens, H, max_seqlen, dropout_p) if dropout_p else None
    return attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, dropout_mask, upcast=True)


def _split_qkv(qkv: object, ndim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = "[B, T, 3, h, d]" if ndim == 5 else "[total_tokens, 3, h, d]"
    check_tensor("qkv", qkv, ndim=ndim, dtypes=FLOAT_DTYPES)
    if qkv.shape[-3] != 3:
        raise ValueError(f"qkv must be {layout} (q, k, v stacked on dim -3), got {list(qkv.shape)}")
    return qkv.unbind(-3)


def fused_attention_qkvpacked(
    qkv: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """`fused_attention` on q, k, v stacked in one qkv [B, T, 3, h, d] (what a fused QKV GEMM writes). Its gradient
    is one dqkv buffer of the same layout: dq, dk, dv written in place, no concatenation. Returns [B, T, h, d].
    `deterministic` as in `fused_attention`."""
    q, k, v = _split_qkv(qkv, 5)
    if not _run_kernel(q, k, v):
        return fused_attention(q, k, v, key_padding_mask, dropout_p, softmax_scale, seed, deterministic)
    _check_qkv(q, k, v, ndim=4)
    B, T, _, d = q.shape
    keep_key = key_padding_to_bool(key_padding_mask, B, T, q.device)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(softmax_scale, d)
    _check_offsets(T, T, dropout_p)
    deterministic = _check_deterministic(deterministic)
    return FlashAttnQKVPackedFunction.apply(qkv, keep_key, None, 0, dropout_p, scale, draw_seed(seed), deterministic)


def fused_attention_varlen_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    deterministic: bool | None = None,
    *,
    validate_cu_seqlens: bool = True,
) -> torch.Tensor:
    """`fused_attention_varlen` on q, k, v stacked in one qkv [total_tokens, 3, h, d]; its gradient is one dqkv
    buffer of that layout (see `fused_attention_qkvpacked`). Returns [total_tokens, h, d]. `validate_cu_seqlens` as
    in `fused_attention_varlen`."""
    q, k, v = _split_qkv(qkv, 4)
    if not _run_kernel(q, k, v, cu_seqlens):
        return fused_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, deterministic,
                                      validate_cu_seqlens=validate_cu_seqlens)
    _check_qkv(q, k, v, ndim=3)
    _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device, validate_cu_seqlens)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(softmax_scale, q.shape[-1])
    _check_offsets(max_seqlen, max_seqlen, dropout_p)
    deterministic = _check_deterministic(deterministic)
    return FlashAttnQKVPackedFunction.apply(qkv, None, cu_seqlens, max_seqlen, dropout_p, scale, draw_seed(seed),
                                            deterministic)


# --------------------------------------------------------------------------------------------------------
# References (plain PyTorch, materialise [B, h, Tq, Tk])
# --------------------------------------------------------------------------------------------------------


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference attention, q [B, Tq, h, d], k/v [B, Tk, h, d] → [B, Tq, h, d] in q's dtype.

    upcast=True computes in fp32 (fp64 inputs stay fp64); upcast=False in the input dtype (the
    "same-dtype PyTorch" baseline of the tests). dropout_mask: bool keep-mask [B, h, Tq, Tk]; when None and
    dropout_p > 0 a fresh one is drawn from torch's generator (not the kernel's Philox stream)."""
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    B, Tq, H, d = q.shape
    Tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    keep_key = key_padding_to_bool(key_padding_mask, B, Tk, q.device)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, h, Tq, Tk)
    if keep_key is not None:
        s = s.masked_fill(~keep_key[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep_key is not None:
        p = p.masked_fill(~keep_key.any(dim=-1)[:, None, None, None], 0.0)  # no real key: zeros, not NaN
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= effective_dropout_p(dropout_p)
        p = p.masked_fill(~dropout_mask, 0.0) * keep_scale(dropout_p)  # 1 / the exact keep probability
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)  # (B, Tq, h, d)
    return out.to(dtype)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for the varlen layout: pad to [B, max_seqlen, h, d], `attention_ref`, unpad.

    dropout_mask is in the padded form [B, h, max_seqlen, max_seqlen] (see attention_dropout_mask_varlen)."""
    B = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
    mask = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (B, max_seqlen)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    pad = lambda t: pad_input(t, indices, B, max_seqlen)  # (B, max_seqlen, h, d)
    out = attention_ref(pad(q), pad(k), pad(v), mask, dropout_p, softmax_scale, dropout_mask, upcast)
    return out.reshape(B * max_seqlen, *out.shape[2:]).index_select(0, indices)  # (total, h, d)
