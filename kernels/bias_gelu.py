"""Bias + GELU epilogue: ``y = gelu(x + b)`` elementwise, the second half of the cuBLAS GEMM path.

What it is for: on the ``"cublas"`` GEMM path (`kernels.matmul`'s switch, the default) the linear layers run
``torch.addmm`` — cuBLASLt adds the bias in its own epilogue — and this kernel applies the GELU (exact erf, or
``approximate="tanh"``; the formulas of ``torch.nn.functional.gelu``) in one pass. The GEMM's output is then the
pre-activation backward needs, saved as it is: nothing is stored twice. With ``bias`` given (a GEMM that did not
add it) the kernel adds it too and, when asked (``STORE_PRE``, training), writes the pre-activation ``x + b``
beside ``y``.

Bytes moved: ``M·N · s`` read and ``M·N · s`` written (``2·M·N · s`` with the stored pre-activation), plus ``N``
bias elements per row tile, ``s`` the element size; the floor is those bytes at the device's copy bandwidth.
Math in fp32, one rounding on each store.

Backward: ``dx = dy · gelu'(z)`` (the Triton elementwise `kernels.matmul.gelu_backward`), ``db = Σ_rows dx``.

Dtypes: fp32, fp16, bf16 (x and bias one dtype); elementwise, so bf16 runs through the interpreter too.
Caution: x is flattened to ``[M, N]`` with ``reshape`` (a copy when its strides do not allow a view); bias is
broadcast along the last dimension only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_same_dtype, check_tensor, use_triton
from kernels.matmul import GELU_CODES, _gelu_erf, _gelu_tanh, gelu_backward

APPROXIMATIONS = tuple(GELU_CODES)  # ("none", "tanh")


# One program per (BLOCK_M × BLOCK_N) tile: the bias tile is loaded once and reused for BLOCK_M rows.
@triton.jit
def _bias_gelu_kernel(
    x_ptr, b_ptr, y_ptr, pre_ptr, M, N, stride_xm, stride_ym,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # M·N may pass 2**31 elements
    z = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    offs = rows64 * stride_ym + cols[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + offs, z.to(pre_ptr.dtype.element_ty), mask=mask)
    if ACTIVATION == 1:
        z = _gelu_erf(z)
    else:
        z = _gelu_tanh(z)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): up to 1024 columns per tile, the widest power of two (down to 128) that
    divides N so no lane idles (3072 → 1024, 768 → 256), about 4096 elements per program (16 per thread with 8
    warps), never fewer than one row. Compile-time check (sm_90): 31-43 registers, no spills, 128-bit accesses."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    while block_n > 128 and N % block_n:
        block_n //= 2
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def bias_gelu_launch(
    x: torch.Tensor, bias: torch.Tensor | None, approximate: str, y: torch.Tensor, pre: torch.Tensor | None
) -> None:
    """Launch into preallocated buffers (no checks: callers validate). x, y, pre ``[M, N]`` with unit column
    stride (y and pre one layout); bias ``[N]`` contiguous or None."""
    M, N = x.shape
    if M == 0 or N == 0:
        return
    block_m, block_n, warps = _launch_config(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bias_gelu_kernel[grid](
        x, x if bias is None else bias, y, y if pre is None else pre, M, N, x.stride(0), y.stride(0),
        ACTIVATION=GELU_CODES[approximate], HAS_BIAS=bias is not None, STORE_PRE=pre is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- ops
# torch.library custom ops: opaque to torch.compile (no graph break), with fake implementations for tracing.


@torch.library.custom_op("kernels::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(
    x: torch.Tensor, bias: torch.Tensor | None, approximate: str, store_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, pre) for 2-D x; pre is x + bias when `store_pre` (needs a bias), else an empty tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    pre = torch.empty(x.shape if store_pre else (0,), dtype=x.dtype, device=x.device)
    bias_gelu_launch(x, None if bias is None else bias.contiguous(), approximate, y, pre if store_pre else None)
    return y, pre


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate, store_pre):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape if store_pre else (0,))


@torch.library.custom_op("kernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: torch.Tensor, z: torch.Tensor, approximate: str) -> torch.Tensor:
    """dy · gelu'(z), elementwise, in z's dtype."""
    return gelu_backward(dy.contiguous(), z.contiguous(), approximate)


@_bias_gelu_bwd.register_fake
def _(dy, z, approximate):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


# ------------------------------------------------------------------------------------------ autograd


class _BiasGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
        has_bias = bias is not None
        y, pre = torch.ops.kernels.bias_gelu_fwd(x, bias, approximate, has_bias)
        ctx.save_for_backward(pre if has_bias else x)  # the pre-activation: stored, or x itself
        ctx.approximate, ctx.has_bias = approximate, has_bias
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (z,) = ctx.saved_tensors
        dz = torch.ops.kernels.bias_gelu_bwd(dy, z, ctx.approximate)  # (M, N)
        db = dz.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None  # (N,)
        return dz, db, None


# -------------------------------------------------------------------------------------------- public


def _check_args(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension ([..., N])")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_same_dtype(x=x, bias=bias)
        if bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias has {bias.shape[0]} entries but x's last dimension is {x.shape[-1]}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)`` (``gelu(x)`` without bias) in one elementwise pass, in x's dtype (fp32 math).

    x ``[..., N]``, bias ``[N]`` or None, one dtype (fp32/fp16/bf16) and device; ``approximate`` is ``"none"``
    (exact erf) or ``"tanh"``. Differentiable in x and bias; saves x (without bias) or the stored ``x + bias``
    (with bias) for backward."""
    _check_args(x, bias, approximate)
    if not use_triton(x):
        return bias_gelu_ref(x, bias, approximate)
    lead, N = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(lead.numel(), N)  # (M, N)
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        y = _BiasGELU.apply(x2d, bias, approximate)
    else:
        y, _ = torch.ops.kernels.bias_gelu_fwd(x2d, bias, approximate, False)
    return y.view(*lead, N)  # (..., N)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch: ``F.gelu(x + bias, approximate=approximate)``."""
    return F.gelu(x if bias is None else x + bias, approximate=approximate)
