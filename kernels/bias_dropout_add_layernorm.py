"""Fused bias + dropout + residual add + LayerNorm: ``y = LayerNorm(residual + dropout(x + bias))``.

The tail of every BERT sub-layer (attention output and FFN output), and — with no bias and no residual —
the LayerNorm of the embeddings and of the MLM transform. One pass over rows, in both directions:

forward   reads x, residual (and bias, γ, β once per program), writes y and two fp32 statistics per row;
backward  reads dy, x, residual (regenerating the dropout mask and the pre-norm sum instead of storing
          them), writes dx and dresidual, plus per-program partial sums of dγ, dβ and dbias that one
          deterministic reduction (no atomics) turns into the parameter gradients.

Bytes moved, ``N`` rows of ``H``, element size ``s`` (2 for fp16/bf16): forward ``3·N·H·s + 8·N`` (x and
residual in, y out, mean and rstd out; ``2·N·H·s`` without a residual); backward ``5·N·H·s + 8·N`` (dy, x,
residual in, dx and dresidual out; ``3·N·H·s`` without a residual), plus ``H``-sized vectors per program.
Unfused PyTorch moves about three times that (bias add, dropout with a stored mask, add and LayerNorm each
read and write the activation). Saved for backward: the inputs (x, residual, bias, γ) and the fp32
mean and rstd, ``8·N`` bytes of new memory — never the dropout mask nor the pre-norm sum.

Dropout is counter-based: element ``(row, col)`` of a ``[N, H]`` call is kept when the Philox uniform for
counter ``row·H + col`` under the call's seed is ``>= p``, and kept values are scaled by ``1/(1-p)``. The
counter is a 64-bit integer split into Philox's two low counter words (low 32 bits, high 32 bits), so
offsets never overflow, whatever ``N·H``; for ``N·H < 2**32`` this is exactly ``tl.rand(seed, row·H+col)``.
``bias_dropout_add_layernorm_dropout_mask`` rebuilds the same keep-mask in plain PyTorch (bit-exact), for
tests, for the reference path and for the fused layers' reference comparison. ``seed=None`` draws the seed
from torch's default generator (``kernels._common.draw_seed``), so ``torch.manual_seed`` makes runs
repeatable on every path (Triton, interpreter, reference).

Dtypes: ``x`` and ``residual`` fp32, fp16 or bf16 (one dtype); ``bias``, ``gamma``, ``beta`` any of those
(fp32 master weights beside bf16 activations are fine). Statistics and arithmetic are fp32; ``y`` and
``dx``/``dresidual`` are in ``x``'s dtype, each parameter gradient in its parameter's dtype.

Dispatch (``kernels._common.use_triton``): CUDA tensors → Triton; CPU tensors → Triton through the
interpreter when ``TRITON_INTERPRET=1``, ``bias_dropout_add_layernorm_ref`` otherwise. The launchers are
``torch.library`` custom ops (``kernels::bias_dropout_add_layernorm_fwd`` / ``_bwd``) with fake
implementations, so ``torch.compile(..., fullgraph=True)`` traces through this op.

Caution: the last dimension must fit one block (``H <= 65536``; beyond ~8K a row no longer fits in
registers and spills: the launch settings target BERT's 128..4096); rows are made contiguous (a copy
when they are not); no RMSNorm / pre-norm variant; the reference path rounds intermediates in the input dtype
(like PyTorch) while the kernel keeps them in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    check_dropout_p,
    check_tensor,
    draw_seed,
    interpreter_on,
    seed_value,
    use_triton,
)
from kernels._philox import philox_uniform

MAX_HIDDEN = 65536

# ----------------------------------------------------------------------------------------------------------
# Launch settings
# ----------------------------------------------------------------------------------------------------------


def _launch_config(H: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_M rows per tile, num_warps) for hidden size H.

    A tile is BLOCK_M whole rows. Forward on Hopper: tiles of ~4K elements, 16 fp32 values per thread at
    8 warps (4 rows at H = 768/1024, 32 rows at H = 96/128, one row from H = 4096), ~100 registers.
    Backward regenerates the Philox mask and keeps three partial-sum accumulators live, so it uses ~2K
    element tiles and at most 8 values per thread (ptxas, sm_90: 80-150 registers, no spills up to
    H = 2048). The interpreter pays per operation, not per element: bigger tiles make the CPU tests faster."""
    block_h = triton.next_power_of_2(H)
    if interpreter_on():
        target = 16384
    else:
        target = 2048 if backward else 4096
    block_m = max(1, min(64, target // block_h))
    tile = block_h * block_m
    if backward:
        num_warps = max(4, min(16, tile // 256))
    else:
        num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_h, block_m, num_warps


def _num_bwd_programs(num_tiles: int, device: torch.device) -> int:
    """Backward programs: each loops over a contiguous run of tiles and keeps its dγ/dβ/dbias partial sums
    in registers, so the partial buffer is ``programs × H`` fp32. Two waves of programs on a GPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, 2 * sms))
    return max(1, min(num_tiles, 4))


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, offs, p):
    """Keep-mask for 64-bit counters ``offs``: Philox(seed, lo32, hi32, 0, 0) → uniform in [0, 1) ≥ p."""
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _presum_tile(x_ptr, bias_ptr, res_ptr, offs, cols, mask, col_ok, seed, p, scale,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """The pre-norm sum s = residual + dropout(x + bias) of one tile in fp32, and the keep-mask."""
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    keep = mask
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offs, p) & mask
        s = tl.where(keep, s * scale, 0.0)
    if HAS_RES:
        s += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return s, keep


@triton.jit
def _bdaln_fwd_kernel(
    x_ptr, bias_ptr, res_ptr, gamma_ptr, beta_ptr, y_ptr, mean_ptr, rstd_ptr,
    N, H, seed, p, scale, eps,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Per element: read x (+ residual), write y: 2-3 · s bytes; γ, β, bias once per tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < N
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]  # (BLOCK_M, BLOCK_H) int64 counters / offsets

    s, _ = _presum_tile(x_ptr, bias_ptr, res_ptr, offs, cols, mask, col_ok, seed, p, scale,
                        HAS_BIAS, HAS_RES, HAS_DROPOUT)
    mean = tl.sum(s, axis=1) / H
    d = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


# Backward, per row, with x̂ = (s - mean)·rstd, g = dy·γ:
#   ds        = rstd · (g - mean(g) - x̂ · mean(g · x̂))
#   dresidual = ds
#   dx        = ds · keep / (1 - p)          (dbias = Σ_rows dx)
#   dγ        = Σ_rows dy · x̂,   dβ = Σ_rows dy
@triton.jit
def _bdaln_bwd_tile(
    tile, acc_dgamma, acc_dbeta, acc_dbias, gamma, cols, col_ok,
    dy_ptr, x_ptr, bias_ptr, res_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr,
    N, H, seed, p, scale,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]  # (BLOCK_M, BLOCK_H)

    s, keep = _presum_tile(x_ptr, bias_ptr, res_ptr, offs, cols, mask, col_ok, seed, p, scale,
                           HAS_BIAS, HAS_RES, HAS_DROPOUT)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = dy * gamma[None, :]
    c_xhat = tl.sum(g * xhat, axis=1) / H
    c_one = tl.sum(g, axis=1) / H
    ds = tl.where(mask, (g - xhat * c_xhat[:, None] - c_one[:, None]) * rstd[:, None], 0.0)
    if HAS_RES:
        tl.store(dres_ptr + offs, ds.to(dres_ptr.dtype.element_ty), mask=mask)
    dz = ds
    if HAS_DROPOUT:
        dz = tl.where(keep, ds * scale, 0.0)
    tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=mask)
    acc_dgamma += dy * xhat
    acc_dbeta += dy
    if HAS_BIAS:
        acc_dbias += dz
    return acc_dgamma, acc_dbeta, acc_dbias


@triton.jit
def _bdaln_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, res_ptr, gamma_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dres_ptr, dgamma_part_ptr, dbeta_part_ptr, dbias_part_ptr,
    N, H, seed, p, scale, tiles_per_prog,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Per element: read dy, x (+ residual), write dx (+ dresidual): 3-5 · s bytes. Each program walks a
    # contiguous run of tiles and keeps its dγ/dβ/dbias partial sums in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dgamma = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_dbeta = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_dbias = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    first = pid * tiles_per_prog
    for tile in range(first, first + tiles_per_prog):
        acc_dgamma, acc_dbeta, acc_dbias = _bdaln_bwd_tile(
            tile, acc_dgamma, acc_dbeta, acc_dbias, gamma, cols, col_ok,
            dy_ptr, x_ptr, bias_ptr, res_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr,
            N, H, seed, p, scale, HAS_BIAS, HAS_RES, HAS_DROPOUT, BLOCK_M,
        )
    part = pid.to(tl.int64) * H + cols
    tl.store(dgamma_part_ptr + part, tl.sum(acc_dgamma, axis=0), mask=col_ok)
    tl.store(dbeta_part_ptr + part, tl.sum(acc_dbeta, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part, tl.sum(acc_dbias, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers (torch.library custom ops: opaque to torch.compile, described to it by their fakes)
# ----------------------------------------------------------------------------------------------------------


def _dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


@torch.library.custom_op("kernels::bias_dropout_add_layernorm_fwd", mutates_args=())
def _bdaln_fwd(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: contiguous [N, H]. Returns y [N, H] (x's dtype), mean and rstd [N] fp32."""
    N, H = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return y, mean, rstd
    block_h, block_m, num_warps = _launch_config(H)
    _bdaln_fwd_kernel[(triton.cdiv(N, block_m),)](
        x, bias if bias is not None else x, residual if residual is not None else x, gamma, beta,
        y, mean, rstd, N, H, seed_value(seed), dropout_p, _dropout_scale(dropout_p), eps,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y, mean, rstd


@_bdaln_fwd.register_fake
def _(x, bias, residual, gamma, beta, seed, dropout_p, eps):
    N = x.shape[0]
    stats = x.new_empty((N,), dtype=torch.float32)
    return torch.empty_like(x), stats, stats.new_empty((N,))


@torch.library.custom_op("kernels::bias_dropout_add_layernorm_bwd", mutates_args=())
def _bdaln_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, dbias, dresidual, dγ, dβ. dbias is empty when bias is None, dresidual when residual is.
    Parameter gradients are fp32 (the autograd Function casts them to their parameter's dtype)."""
    N, H = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    block_h, block_m, num_warps = _launch_config(H, backward=True)
    num_tiles = triton.cdiv(N, block_m)
    programs = _num_bwd_programs(num_tiles, x.device) if N > 0 else 0
    # (programs, H) fp32 partial sums; summed once below (deterministic, no atomics).
    dgamma_part = torch.empty((programs, H), device=x.device, dtype=torch.float32)
    dbeta_part = torch.empty_like(dgamma_part)
    dbias_part = torch.empty_like(dgamma_part) if bias is not None else dgamma_part
    if programs > 0:
        _bdaln_bwd_kernel[(programs,)](
            dy, x, bias if bias is not None else x, residual if residual is not None else x, gamma, mean, rstd,
            dx, dres if residual is not None else dx, dgamma_part, dbeta_part, dbias_part,
            N, H, seed_value(seed), dropout_p, _dropout_scale(dropout_p), triton.cdiv(num_tiles, programs),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_DROPOUT=dropout_p > 0.0,
            BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
        )
    dgamma = dgamma_part.sum(0)
    dbeta = dbeta_part.sum(0)
    dbias = dbias_part.sum(0) if bias is not None else x.new_empty((0,))
    return dx, dbias, dres, dgamma, dbeta


@_bdaln_bwd.register_fake
def _(dy, x, bias, residual, gamma, mean, rstd, seed, dropout_p):
    H = x.shape[1]
    dbias = x.new_empty((H,) if bias is not None else (0,), dtype=torch.float32)
    dres = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    dgamma = x.new_empty((H,), dtype=torch.float32)
    return torch.empty_like(x), dbias, dres, dgamma, torch.empty_like(dgamma)


# ----------------------------------------------------------------------------------------------------------
# Autograd and public API
# ----------------------------------------------------------------------------------------------------------


class _BiasDropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, gamma, beta, seed, dropout_p, eps):
        y, mean, rstd = torch.ops.kernels.bias_dropout_add_layernorm_fwd(
            x, bias, residual, gamma, beta, seed, dropout_p, eps
        )
        ctx.save_for_backward(x, bias, residual, gamma, mean, rstd, seed)
        ctx.dropout_p = dropout_p
        ctx.param_dtypes = (None if bias is None else bias.dtype, gamma.dtype, beta.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias, residual, gamma, mean, rstd, seed = ctx.saved_tensors
        dx, dbias, dres, dgamma, dbeta = torch.ops.kernels.bias_dropout_add_layernorm_bwd(
            dy, x, bias, residual, gamma, mean, rstd, seed, ctx.dropout_p
        )
        need = ctx.needs_input_grad
        bias_dtype, gamma_dtype, beta_dtype = ctx.param_dtypes
        return (
            dx if need[0] else None,
            dbias.to(bias_dtype) if bias is not None and need[1] else None,
            dres if residual is not None and need[2] else None,
            dgamma.to(gamma_dtype) if need[3] else None,
            dbeta.to(beta_dtype) if need[4] else None,
            None,
            None,
            None,
        )


def _check_args(x, bias, residual, gamma, beta, dropout_p, eps) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., H], got shape {tuple(x.shape)}")
    H = x.shape[-1]
    if not 0 < H <= MAX_HIDDEN:
        raise ValueError(f"hidden size (last dim of x) must be in [1, {MAX_HIDDEN}], got {H}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    for name, t in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        if t is None and name == "bias":
            continue
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if t.shape[0] != H:
            raise ValueError(f"{name} must have shape ({H},) to match x's last dim, got {tuple(t.shape)}")
    check_dropout_p(dropout_p)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def bias_dropout_add_layernorm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    dropout_p: float = 0.0,
    eps: float = 1e-12,
    seed: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(residual + dropout(x + bias))`` over the last dim, in one pass (see the module docstring).

    x, residual: ``[..., H]`` (residual may be None: plain dropout + LayerNorm); bias, gamma, beta: ``[H]``
    (bias may be None). ``seed`` fixes the dropout mask (rebuild it with
    ``bias_dropout_add_layernorm_dropout_mask``); None draws one from torch's generator. Differentiable in
    x, bias, residual, gamma and beta. Returns y in x's dtype and shape."""
    _check_args(x, bias, residual, gamma, beta, dropout_p, eps)
    dropout_p, eps = float(dropout_p), float(eps)
    seed_t = draw_seed(seed)
    tensors = [t for t in (x, bias, residual, gamma, beta) if t is not None]
    if not use_triton(*tensors):
        return bias_dropout_add_layernorm_ref(x, bias, residual, gamma, beta, dropout_p, eps, seed_t)
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()  # (N, H)
    r2 = residual.reshape(-1, H).contiguous() if residual is not None else None  # (N, H)
    y = _BiasDropoutAddLayerNorm.apply(
        x2, bias, r2, gamma.contiguous(), beta.contiguous(), seed_t, dropout_p, eps
    )
    return y.view(x.shape)


# ----------------------------------------------------------------------------------------------------------
# Dropout mask (bit-exact PyTorch rebuild of the kernel's Philox stream) and the reference
# ----------------------------------------------------------------------------------------------------------

def bias_dropout_add_layernorm_dropout_mask(
    seed: int | torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The exact keep-mask (bool, True = kept) a ``bias_dropout_add_layernorm`` call with this seed, input
    shape ``[..., H]`` and dropout probability used. ``seed`` is an int or the 1-element tensor from
    ``kernels._common.draw_seed``. All True when ``p == 0``."""
    check_dropout_p(p)
    shape = tuple(shape)
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    seed_int = seed_value(seed) if isinstance(seed, torch.Tensor) else int(seed)
    counters = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64, device=device).view(shape)
    return philox_uniform(seed_int, counters) >= torch.tensor(float(p), dtype=torch.float32)


def bias_dropout_add_layernorm_ref(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    dropout_p: float = 0.0,
    eps: float = 1e-12,
    seed: int | torch.Tensor | None = None,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch, computed in x's dtype (any float dtype, float64 included): the same dropout mask as
    the kernel for the same seed, or ``dropout_mask`` (bool keep-mask) when given."""
    z = x if bias is None else x + bias.to(x.dtype)
    if dropout_p > 0.0:
        if dropout_mask is None:
            seed_t = seed if isinstance(seed, torch.Tensor) else draw_seed(seed)
            dropout_mask = bias_dropout_add_layernorm_dropout_mask(seed_t, x.shape, dropout_p, x.device)
        z = z * dropout_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    s = z if residual is None else residual + z
    return F.layer_norm(s, (x.shape[-1],), gamma.to(x.dtype), beta.to(x.dtype), eps)
