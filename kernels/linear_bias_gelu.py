"""Linear + bias + GELU: ``y = gelu(x · Wᵀ + b)`` (BERT's FFN up-projection and MLM transform), two GEMM paths.

``backend="triton"``: the bias add and the GELU (exact erf by default, ``approximate="tanh"`` selectable, the
formulas of ``torch.nn.functional.gelu``) run in the GEMM epilogue (`kernels.matmul`), on the fp32 accumulator,
so the ``M × N`` output is written once instead of three times (GEMM, +bias, GELU).
``backend="cublas"`` (the default, see `kernels.matmul`'s GEMM path switch): ``z = torch.addmm(b, x, Wᵀ)``
(cuBLASLt adds the bias in its epilogue), then the Triton GELU epilogue `kernels.bias_gelu` (``M·N`` read and
written once more); ``z`` is the saved pre-activation as it is. Without gradients and with the tanh GELU,
``torch._addmm_activation`` does it all in cuBLASLt's GELU epilogue on CUDA (its GELU is the tanh form there —
erf on the CPU —; the erf GELU has no cuBLASLt epilogue, so erf always takes the Triton epilogue).

Backward saves the pre-activation ``z = x · Wᵀ + b``: the epilogue writes it next to ``y`` for one extra
``M·N`` store, while recomputing it in backward would cost a whole extra GEMM (``2·M·N·K`` FLOPs, a third of
the layer's backward work). Backward is ``dz = dy · gelu'(z)`` (one Triton elementwise pass) followed by
cuBLAS: ``dx = dz · W``, ``dW = dzᵀ · x``, ``db = Σ_rows dz``. The pre-activation is saved only when a
gradient is needed.

Bytes moved, forward: ``(M·K + N·K + N) · s`` read, ``M·N · s`` written (``2·M·N · s`` when training),
``s`` the element size; ``2·M·N·K`` FLOPs.

Dtypes: fp32, fp16, bf16 (all inputs one dtype); fp32 accumulation; outputs in the input dtype.
Caution: on the Triton GEMM path bf16 runs the kernel only compiled on a GPU (Triton's interpreter cannot do
bf16 ``tl.dot``, so bf16 CPU tensors take the ``*_ref`` path, with a warning; the cuBLAS path's elementwise
epilogue runs bf16 in the interpreter too); no autocast handling (cast inputs yourself); ``x``
is flattened to 2-D with ``reshape`` (a copy when its strides do not allow a view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import FLOAT_DTYPES, check_same_dtype, check_tensor, use_triton
from kernels.bias_gelu import bias_gelu_launch
from kernels.matmul import GELU_CODES, check_backend, gelu_backward, gemm_bias_act, gemm_dispatch

APPROXIMATIONS = tuple(GELU_CODES)  # ("none", "tanh")


# ----------------------------------------------------------------------------------------------- ops
# torch.library custom ops: opaque to torch.compile (no graph break), with fake implementations for tracing.


@torch.library.custom_op("kernels::linear_bias_gelu_fwd", mutates_args=())
def _linear_bias_gelu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for 2-D x; z is the pre-activation when `save_pre`, else an empty tensor."""
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty((M, N))
    pre = x.new_empty((M, N)) if save_pre else x.new_empty((0,))
    gemm_bias_act(x, weight, bias.contiguous(), y, activation=GELU_CODES[approximate], pre=pre if save_pre else None)
    return y, pre


@_linear_bias_gelu_fwd.register_fake
def _(x, weight, bias, approximate, save_pre):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N) if save_pre else (0,))


@torch.library.custom_op("kernels::gelu_epilogue", mutates_args=())
def _gelu_epilogue(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(z) for the 2-D output of a GEMM that added the bias itself (the cuBLAS path)."""
    y = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    bias_gelu_launch(z if z.stride(-1) == 1 else z.contiguous(), None, approximate, y, None)
    return y


@_gelu_epilogue.register_fake
def _(z, approximate):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _cublas_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, save_pre: bool):
    """(y, z) on the cuBLAS path for 2-D x: z = addmm (bias fused by cuBLASLt) is the pre-activation."""
    if not save_pre and approximate == "tanh" and x.is_cuda:  # its GELU is tanh on CUDA only (erf on the CPU)
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True), None  # (M, N), cuBLASLt GELU
    z = torch.addmm(bias, x, weight.t())  # (M, N)
    return torch.ops.kernels.gelu_epilogue(z, approximate), z


@torch.library.custom_op("kernels::linear_bias_gelu_dz", mutates_args=())
def _linear_bias_gelu_dz(dy: torch.Tensor, z: torch.Tensor, approximate: str) -> torch.Tensor:
    """dy · gelu'(z), elementwise, in z's dtype."""
    return gelu_backward(dy.contiguous(), z.contiguous(), approximate)


@_linear_bias_gelu_dz.register_fake
def _(dy, z, approximate):
    return torch.empty_like(z)


# ------------------------------------------------------------------------------------------ autograd


class _LinearBiasGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, backend: str):
        if backend == "triton":
            y, z = torch.ops.kernels.linear_bias_gelu_fwd(x, weight, bias, approximate, True)
        else:
            y, z = _cublas_forward(x, weight, bias, approximate, True)
        ctx.save_for_backward(x, weight, z)
        ctx.approximate = approximate
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, z = ctx.saved_tensors
        dz = torch.ops.kernels.linear_bias_gelu_dz(dy, z, ctx.approximate)  # (M, N)
        dx = dz @ weight if ctx.needs_input_grad[0] else None  # (M, K)
        dw = dz.t() @ x if ctx.needs_input_grad[1] else None  # (N, K)
        db = dz.sum(0) if ctx.needs_input_grad[2] else None  # (N,)
        return dx, dw, db, None, None


# -------------------------------------------------------------------------------------------- public


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension ([..., K])")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_same_dtype(x=x, weight=weight, bias=bias)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal weight's in_features "
            f"(weight is [N, K] = {tuple(weight.shape)})"
        )
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} output features")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def linear_bias_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str = "none", backend: str | None = None
) -> torch.Tensor:
    """``gelu(x · weightᵀ + bias)``: cuBLAS + Triton GELU epilogue, or one Triton GEMM with the epilogue fused.

    x ``[..., K]``, weight ``[N, K]`` (``nn.Linear`` layout), bias ``[N]``, all one dtype (fp32/fp16/bf16)
    and one device; returns ``[..., N]`` in that dtype. ``approximate`` is ``"none"`` (exact erf) or
    ``"tanh"``. ``backend``: ``"cublas"``, ``"triton"`` or None (`kernels.matmul.gemm_backend("bias_gelu")`).
    Differentiable in x, weight and bias.
    """
    _check_args(x, weight, bias, approximate)
    backend = check_backend(backend, "bias_gelu")
    if not (use_triton(x, weight, bias) if backend == "cublas" else gemm_dispatch(x, weight, bias)):
        return linear_bias_gelu_ref(x, weight, bias, approximate)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        y = _LinearBiasGELU.apply(x2d, weight, bias, approximate, backend)
    elif backend == "triton":
        y, _ = torch.ops.kernels.linear_bias_gelu_fwd(x2d, weight, bias, approximate, False)
    else:
        y, _ = _cublas_forward(x2d, weight, bias, approximate, False)
    return y.view(*lead, weight.shape[0])  # (..., N)


def linear_bias_gelu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str = "none"
) -> torch.Tensor:
    """Plain PyTorch: ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)
