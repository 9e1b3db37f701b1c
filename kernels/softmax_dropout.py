"""Scaled, key-padding-masked softmax with dropout on a materialised score tensor [B, h, Tq, Tk].

Fused: scale · scores, key padding, row softmax (fp32), dropout rescaled by 1 / the exact keep probability
(`kernels._attention_dropout`: the same keep-mask as `kernels.attention` for the same seed), one kernel.
Bytes moved: forward reads the scores once and writes the probabilities once (2·N·elem bytes, plus the
[B, Tk] mask); backward reads the saved tensor and dy and writes dscores (3·N·elem bytes). The dropout
keep-mask is never stored: backward regenerates it from (seed, position) — see `kernels._attention_dropout`
for the offset scheme; `attention_dropout_mask` gives the exact mask a call used.

What backward keeps: with dropout_p == 0 the output (= the probabilities, which the following
probs @ V matmul keeps alive anyway); with dropout_p > 0 the input scores, because the probabilities of
dropped entries are needed for dscores and cannot be read back from the dropped output.

Dtypes: fp32 / fp16 / bf16 in and out, fp32 arithmetic inside. Masks: bool [B, Tk] (True = real token)
or the additive float form [B, 1, 1, Tk] (0 = real token, very negative = padding).
Rows whose keys are all padding give zeros (not a uniform distribution, not NaN), forward and backward.

Caution: the additive float mask is read as a padding mask (entry < -1 means padding), not as an
arbitrary additive bias; a float mask with positive entries (a 0/1 mask) is refused with a ValueError.
One program holds whole rows: Tk is limited to 65536 (materialising longer
rows makes no sense: use `kernels.attention.fused_attention`). Dropout needs Tq·Tk < 2**31.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from kernels._attention_dropout import (
    MAX_OFFSETS,
    attention_dropout_mask,
    dropout_keep,
    dropout_threshold,
    effective_dropout_p,
    keep_scale,
)
from kernels._common import (
    FLOAT_DTYPES,
    check_dropout_p,
    check_tensor,
    draw_seed,
    interpreter_on,
    seed_value,
    use_triton,
)

__all__ = [
    "attention_dropout_mask",
    "key_padding_to_bool",
    "scaled_masked_softmax_dropout",
    "scaled_masked_softmax_dropout_ref",
]

LOG2E = 1.4426950408889634
MAX_TK = 65536


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _masked_row_probs(x, keep_key, scale_log2e):
    """fp32 softmax of each row of x·scale over the kept keys; all-masked rows give zeros."""
    s = tl.where(keep_key, x * scale_log2e, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # all-masked row: exp2(-inf - 0) = 0, no inf - inf
    e = tl.exp2(s - m[:, None])
    denom = tl.sum(e, 1)
    inv = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    return e * inv[:, None]


@triton.jit(do_not_specialize=["seed", "drop_t"])
def _softmax_dropout_fwd_kernel(
    X, Y, KEEP_KEY, seed,
    H, Tq, Tk,
    sx_b, sx_h, sx_q,
    scale_log2e, drop_t, inv_keep,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_R query rows of one (batch, head) matrix, whole rows of Tk keys.
    # Moves 2 · BLOCK_R · Tk · elem bytes (read scores, write probabilities).
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < Tq
    col_ok = cols < Tk
    ok = row_ok[:, None] & col_ok[None, :]
    x_base = X + b.to(tl.int64) * sx_b + head.to(tl.int64) * sx_h
    x = tl.load(x_base + rows[:, None].to(tl.int64) * sx_q + cols[None, :], mask=ok, other=0.0)
    keep_key = col_ok
    if HAS_MASK:
        keep_key &= tl.load(KEEP_KEY + b.to(tl.int64) * Tk + cols, mask=col_ok, other=0) != 0
    p = _masked_row_probs(x.to(tl.float32), keep_key[None, :], scale_log2e)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, rows, cols, drop_t)
        p = tl.where(keep, p * inv_keep, 0.0)
    y_base = Y + bh.to(tl.int64) * Tq * Tk
    tl.store(y_base + rows[:, None].to(tl.int64) * Tk + cols[None, :], p.to(Y.dtype.element_ty), mask=ok)


# Backward, with y = Z ∘ P / q (Z the keep-mask, q the exact keep probability) and s = scale · x:
#   dP = Z ∘ dy / q
#   ds = P ∘ (dP - rowsum(dP ∘ P)),  rowsum(dP ∘ P) = rowsum(dy ∘ y)
#   dx = scale · ds
@triton.jit(do_not_specialize=["seed", "drop_t"])
def _softmax_dropout_bwd_kernel(
    DY, SRC, DX, KEEP_KEY, seed,
    H, Tq, Tk,
    ss_b, ss_h, ss_q,
    scale, scale_log2e, drop_t, inv_keep,
    FROM_SCORES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # SRC holds the scores (FROM_SCORES: recompute P) or the saved probabilities (dropout_p == 0).
    # Moves 3 · BLOCK_R · Tk · elem bytes (read SRC and dy, write dscores).
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows < Tq)[:, None] & (cols < Tk)[None, :]
    src_base = SRC + b.to(tl.int64) * ss_b + head.to(tl.int64) * ss_h
    src = tl.load(src_base + rows[:, None].to(tl.int64) * ss_q + cols[None, :], mask=ok, other=0.0)
    if FROM_SCORES:
        keep_key = cols < Tk
        if HAS_MASK:
            keep_key &= tl.load(KEEP_KEY + b.to(tl.int64) * Tk + cols, mask=cols < Tk, other=0) != 0
        p = _masked_row_probs(src.to(tl.float32), keep_key[None, :], scale_log2e)
    else:
        p = src.to(tl.float32)
    row_off = bh.to(tl.int64) * Tq * Tk + rows[:, None].to(tl.int64) * Tk + cols[None, :]
    dp = tl.load(DY + row_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, rows, cols, drop_t)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    delta = tl.sum(dp * p, 1)
    ds = p * (dp - delta[:, None]) * scale
    tl.store(DX + row_off, ds.to(DX.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# Launchers (custom ops: opaque to torch.compile, fake implementations give shapes)
# --------------------------------------------------------------------------------------------------------


def _launch_shape(Tq: int, Tk: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): whole rows, about 4k (GPU) / 16k (interpreter) elements a program.

    8 warps from 4096 elements (16 a thread): with 4 warps (32 a thread) the backward with dropout at T = 128
    (32×128) spilled 64–108 B at 255 registers for sm_90, and the T = 512 tiles (8×512) used 200–242. With 8 warps
    (compile-time evidence, `kernels.aot_check`, key padding on/off, dropout on): T = 128 backward 176–177
    registers, forward 125–128, T = 512 backward 116–120, forward 102–104, no spills, fp32 and fp16."""
    block_n = max(16, triton.next_power_of_2(Tk))
    budget = 16384 if interpreter_on() else 4096
    block_r = max(1, min(triton.next_power_of_2(max(Tq, 1)), budget // block_n, 64))
    num_warps = 4 if block_r * block_n < 4096 else 8
    return block_r, block_n, num_warps


@torch.library.custom_op("kernels::softmax_dropout_fwd", mutates_args=())
def _softmax_dropout_fwd(
    scores: torch.Tensor, keep_key: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor
) -> torch.Tensor:
    B, H, Tq, Tk = scores.shape
    y = torch.empty((B, H, Tq, Tk), dtype=scores.dtype, device=scores.device)
    if y.numel() == 0:
        return y
    block_r, block_n, num_warps = _launch_shape(Tq, Tk)
    grid = (triton.cdiv(Tq, block_r), B * H)
    _softmax_dropout_fwd_kernel[grid](
        scores, y, keep_key.view(torch.uint8) if keep_key is not None else scores, seed_value(seed),
        H, Tq, Tk,
        scores.stride(0), scores.stride(1), scores.stride(2),
        scale * LOG2E, dropout_threshold(dropout_p), keep_scale(dropout_p),
        HAS_MASK=keep_key is not None, HAS_DROPOUT=dropout_threshold(dropout_p) > 0,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return y


@_softmax_dropout_fwd.register_fake
def _(scores, keep_key, scale, dropout_p, seed):
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


@torch.library.custom_op("kernels::softmax_dropout_bwd", mutates_args=())
def _softmax_dropout_bwd(
    dy: torch.Tensor,
    saved: torch.Tensor,
    keep_key: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    from_scores: bool,
) -> torch.Tensor:
    B, H, Tq, Tk = saved.shape
    dy = dy.contiguous()
    dx = torch.empty((B, H, Tq, Tk), dtype=saved.dtype, device=saved.device)
    if dx.numel() == 0:
        return dx
    block_r, block_n, num_warps = _launch_shape(Tq, Tk)
    grid = (triton.cdiv(Tq, block_r), B * H)
    _softmax_dropout_bwd_kernel[grid](
        dy, saved, dx, keep_key.view(torch.uint8) if keep_key is not None else saved, seed_value(seed),
        H, Tq, Tk,
        saved.stride(0), saved.stride(1), saved.stride(2),
        scale, scale * LOG2E, dropout_threshold(dropout_p), keep_scale(dropout_p),
        FROM_SCORES=from_scores, HAS_MASK=keep_key is not None, HAS_DROPOUT=dropout_threshold(dropout_p) > 0,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dx


@_softmax_dropout_bwd.register_fake
def _(dy, saved, keep_key, scale, dropout_p, seed, from_scores):
    return torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)


class SoftmaxDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, keep_key, scale, dropout_p, seed):
        y = _softmax_dropout_fwd(scores, keep_key, scale, dropout_p, seed)
        from_scores = dropout_p > 0.0
        ctx.save_for_backward(scores if from_scores else y, keep_key, seed)
        ctx.scale, ctx.dropout_p, ctx.from_scores = scale, dropout_p, from_scores
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, keep_key, seed = ctx.saved_tensors
        dx = _softmax_dropout_bwd(dy, saved, keep_key, ctx.scale, ctx.dropout_p, seed, ctx.from_scores)
        return dx, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def key_padding_to_bool(key_padding_mask: torch.Tensor | None, B: int, Tk: int, device) -> torch.Tensor | None:
    """Validate a key-padding mask and return it as bool [B, Tk] (True = real token), or None.

    Accepts bool [B, Tk] or the additive float form [B, 1, 1, Tk] (entries < -1 are padding)."""
    if key_padding_mask is None:
        return None
    m = check_tensor("key_padding_mask", key_padding_mask, device=device)
    if m.dtype == torch.bool:
        if tuple(m.shape) != (B, Tk):
            raise ValueError(f"bool key_padding_mask must have shape [B, Tk] = {[B, Tk]}, got {list(m.shape)}")
        return m.contiguous()
    if m.dtype in FLOAT_DTYPES:
        if tuple(m.shape) != (B, 1, 1, Tk):
            raise ValueError(
                f"additive key_padding_mask must have shape [B, 1, 1, Tk] = {[B, 1, 1, Tk]}, got {list(m.shape)}"
            )
        _check_additive(m)
        return m.reshape(B, Tk) > -1.0
    raise ValueError(f"key_padding_mask must be bool [B, Tk] or float [B, 1, 1, Tk], got dtype {m.dtype}")


# Float masks whose values were checked, with the tensor version checked: an encoder passes one mask to every
# layer, so only the first layer pays the host sync.
_checked_masks = WeakIdKeyDictionary()


def _check_additive(m: torch.Tensor) -> None:
    """Refuse a float mask that is not additive: a positive entry means a 0/1 (1 = real token) mask, which would
    otherwise be read as "no padding at all"."""
    if torch.compiler.is_compiling() or m.numel() == 0:
        return  # values are data: checking them would break the graph
    version = None if m.is_inference() else m._version
    if version is not None and _checked_masks.get(m) == version:
        return
    if bool((m > 0).any()):
        raise ValueError(
            "float key_padding_mask has positive entries: a 0/1 float mask (1 = real token) is not accepted. "
            "Pass a bool [B, Tk] mask (True = real token) or an additive float [B, 1, 1, Tk] mask (0 = real token, "
            "very negative, e.g. -10000 or -inf = padding)"
        )
    if version is not None:
        _checked_masks[m] = version


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    return float(scale)


def scaled_masked_softmax_dropout(
    scores: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """dropout(softmax(scale · scores with padded keys removed)), in scores' dtype, differentiable.

    scores: [B, h, Tq, Tk] fp32/fp16/bf16, last dim contiguous (other strides free).
    key_padding_mask: bool [B, Tk] (True = real token), additive float [B, 1, 1, Tk], or None.
    seed: dropout seed (int in [0, 2**31)); None draws one from torch's generator, so
    `torch.manual_seed` makes calls repeatable. `attention_dropout_mask(seed, B, h, Tq, Tk, dropout_p)`
    returns the keep-mask the call applied. Returns a contiguous [B, h, Tq, Tk] tensor.
    """
    check_tensor("scores", scores, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, Tq, Tk = scores.shape
    if scores.numel() and scores.stride(-1) != 1:
        raise ValueError("scores must have a contiguous last dim (stride(-1) == 1)")
    if Tk > MAX_TK:
        raise ValueError(f"Tk = {Tk} > {MAX_TK}: rows this long do not fit one program; use fused_attention")
    keep_key = key_padding_to_bool(key_padding_mask, B, Tk, scores.device)
    scale = _check_scale(scale)
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p > 0.0 and Tq * Tk > MAX_OFFSETS:
        raise ValueError(f"Tq·Tk = {Tq * Tk} overflows the int32 dropout offsets (limit 2**31 - 1)")
    seed_t = draw_seed(seed)
    if use_triton(scores):
        return SoftmaxDropoutFunction.apply(scores, keep_key, scale, dropout_p, seed_t)
    dropout_mask = attention_dropout_mask(seed_t, B, H, Tq, Tk, dropout_p, scores.device) if dropout_p else None
    return scaled_masked_softmax_dropout_ref(scores, keep_key, scale, dropout_p, dropout_mask=dropout_mask)


def scaled_masked_softmax_dropout_ref(
    scores: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch, computed in scores' dtype. `dropout_mask`: bool keep-mask [B, h, Tq, Tk]; when None
    and dropout_p > 0 a fresh one is drawn from torch's generator (not the kernel's Philox stream)."""
    B, H, Tq, Tk = scores.shape
    keep_key = key_padding_to_bool(key_padding_mask, B, Tk, scores.device)
    s = scores * scale
    if keep_key is not None:
        s = s.masked_fill(~keep_key[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep_key is not None:
        p = p.masked_fill(~keep_key.any(dim=-1)[:, None, None, None], 0.0)  # all-padding rows: 0, not NaN
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= effective_dropout_p(dropout_p)
        p = p.masked_fill(~dropout_mask, 0.0) * keep_scale(dropout_p)  # 1 / the exact keep probability
    return p
