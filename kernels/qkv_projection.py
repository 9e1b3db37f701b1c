"""Fused QKV projection: one GEMM against the stacked ``[3H, H]`` weight, q/k/v written in attention layout.

Fused: the three ``H → H`` projections of BERT self-attention run as one ``x · W_qkvᵀ + b_qkv`` GEMM
(`kernels.matmul`) with the bias in the epilogue, and the epilogue stores output column ``c`` into q, k or v
(``c // H``) at column ``c % H``. Each of q, k, v is its own contiguous ``[B, T, h, d]`` tensor (``[N, h, d]``
for 2-D x), the layout the fused attention reads, so there is no split, transpose or ``.contiguous()`` copy
after the GEMM. ``W_qkv`` is Hugging Face's query, key and value ``nn.Linear`` weights stacked in that order
(``torch.cat([Wq, Wk, Wv])``), likewise the bias.

Two GEMM paths (`kernels.matmul`'s switch): ``backend="triton"`` is the above; ``backend="cublas"`` (the default)
runs ``torch.addmm`` (cuBLASLt adds the bias in its epilogue, so a Triton epilogue would save nothing) into one
``[M, 3H]`` buffer and returns q, k, v as views of it: ``[B, T, h, d]`` with row stride ``3H`` (not
contiguous; the fused attention reads any token/head strides with a unit last stride).

`qkv_projection_packed` returns one ``qkv [..., 3, h, d]`` instead (the layout of the GEMM's ``[M, 3H]`` output,
on both paths), for `kernels.attention.fused_attention_qkvpacked` / ``_varlen_qkvpacked``, whose backward writes dq,
dk, dv into one ``dqkv`` buffer of that layout: the weight-gradient GEMMs read it as ``dY [M, 3H]`` directly, with no
concatenation (the copy `qkv_projection`'s backward makes: ``2 · 3·M·H · s`` bytes, 302 MB per layer at
``M = 32768``, H = 768 in bf16).

`qkv_projection`'s backward concatenates ``dq, dk, dv`` into ``dY [M, 3H]`` (one copy) and uses cuBLAS on it:
``dx = dY · W_qkv``, ``dW_qkv = dYᵀ · x``, ``db_qkv = Σ_rows dY``: the same GEMMs, accumulation and rounding
as ``nn.Linear``'s backward.

Bytes moved, forward: ``(M·H + 3H·H + 3H) · s`` read and ``3·M·H · s`` written (``M = B·T``, ``s`` the element
size); ``6·M·H²`` FLOPs. Unfused, HF's three Linears read x three times and the usual
``view(B, T, h, d).transpose(1, 2)`` leads to a copy of each output before attention.

Dtypes: fp32, fp16, bf16 (all inputs one dtype); fp32 accumulation; outputs in the input dtype.
Caution: on the Triton path bf16 runs the kernel only compiled on a GPU (Triton's interpreter cannot do bf16
``tl.dot``, so bf16 CPU tensors take the ``*_ref`` path, with a warning); the outputs are ``[B, T, h, d]``, not
``[B, h, T, d]`` (``.transpose(1, 2)`` is a free view where that is wanted); no autocast handling; `qkv_projection`'s
backward concatenates dq, dk, dv (a real copy; `qkv_projection_packed` with the packed attention avoids it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import FLOAT_DTYPES, check_same_dtype, check_tensor, use_triton
from kernels.matmul import check_backend, gemm_bias_act, gemm_dispatch

# ----------------------------------------------------------------------------------------------- ops
# torch.library custom op: opaque to torch.compile (no graph break), with a fake implementation for tracing.


@torch.library.custom_op("kernels::qkv_projection_fwd", mutates_args=())
def _qkv_projection_fwd(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each a contiguous ``[M, h, d]``, from 2-D ``x [M, H]``."""
    M, H = x.shape
    q, k, v = (x.new_empty((M, num_heads, H // num_heads)) for _ in range(3))
    gemm_bias_act(x, w_qkv, b_qkv.contiguous(), (q.view(M, H), k.view(M, H), v.view(M, H)))
    return q, k, v


@_qkv_projection_fwd.register_fake
def _(x, w_qkv, b_qkv, num_heads):
    M, H = x.shape
    return tuple(x.new_empty((M, num_heads, H // num_heads)) for _ in range(3))


@torch.library.custom_op("kernels::qkv_projection_packed_fwd", mutates_args=())
def _qkv_projection_packed_fwd(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """qkv, a contiguous ``[M, 3, h, d]``, from 2-D ``x [M, H]`` (the Triton GEMM, bias in its epilogue)."""
    M, H = x.shape
    qkv = x.new_empty((M, 3, num_heads, H // num_heads))
    gemm_bias_act(x, w_qkv, b_qkv.contiguous(), qkv.view(M, 3 * H))
    return qkv


@_qkv_projection_packed_fwd.register_fake
def _(x, w_qkv, b_qkv, num_heads):
    M, H = x.shape
    return x.new_empty((M, 3, num_heads, H // num_heads))


# ------------------------------------------------------------------------------------------ autograd


def _cublas_qkv(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int):
    """q, k, v as [M, h, d] views (row stride 3H) of one addmm output, bias fused by cuBLASLt."""
    M, H = x.shape
    y = torch.addmm(b_qkv, x, w_qkv.t())  # (M, 3H)
    return y.view(M, 3, num_heads, H // num_heads).unbind(1)  # 3 × (M, h, d)


class _QKVProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int, backend: str):
        ctx.save_for_backward(x, w_qkv)
        if backend == "cublas":
            return _cublas_qkv(x, w_qkv, b_qkv, num_heads)
        return torch.ops.kernels.qkv_projection_fwd(x, w_qkv, b_qkv, num_heads)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        x, w_qkv = ctx.saved_tensors
        M, H = x.shape
        dy = torch.cat([dq.reshape(M, H), dk.reshape(M, H), dv.reshape(M, H)], dim=1)  # (M, 3H)
        dx = dy @ w_qkv if ctx.needs_input_grad[0] else None  # (M, H)
        dw = dy.t() @ x if ctx.needs_input_grad[1] else None  # (3H, H)
        db = dy.sum(0) if ctx.needs_input_grad[2] else None  # (3H,)
        return dx, dw, db, None, None


def _packed_forward(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int, backend: str):
    M, H = x.shape
    if backend == "cublas":
        return torch.addmm(b_qkv, x, w_qkv.t()).view(M, 3, num_heads, H // num_heads)  # (M, 3, h, d)
    return torch.ops.kernels.qkv_projection_packed_fwd(x, w_qkv, b_qkv, num_heads)  # (M, 3, h, d)


class _QKVProjectionPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int, backend: str):
        ctx.save_for_backward(x, w_qkv)
        return _packed_forward(x, w_qkv, b_qkv, num_heads, backend)

    @staticmethod
    def backward(ctx, dqkv: torch.Tensor):
        x, w_qkv = ctx.saved_tensors
        M, H = x.shape
        dy = dqkv.reshape(M, 3 * H)  # (M, 3H): a view of the one gradient buffer, no copy when it is contiguous
        dx = dy @ w_qkv if ctx.needs_input_grad[0] else None  # (M, H)
        dw = dy.t() @ x if ctx.needs_input_grad[1] else None  # (3H, H)
        db = dy.sum(0) if ctx.needs_input_grad[2] else None  # (3H,)
        return dx, dw, db, None, None


# -------------------------------------------------------------------------------------------- public


def _check_args(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int) -> None:
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("w_qkv", w_qkv, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("b_qkv", b_qkv, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_same_dtype(x=x, w_qkv=w_qkv, b_qkv=b_qkv)
    H = x.shape[-1]
    if tuple(w_qkv.shape) != (3 * H, H):
        raise ValueError(
            f"w_qkv must be the stacked query/key/value weight [3H, H] = {(3 * H, H)} for hidden size "
            f"H = {H}, got {tuple(w_qkv.shape)}"
        )
    if tuple(b_qkv.shape) != (3 * H,):
        raise ValueError(f"b_qkv must have shape [3H] = {(3 * H,)}, got {tuple(b_qkv.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if H % num_heads != 0:
        raise ValueError(f"hidden size {H} is not divisible by num_heads = {num_heads}")


def qkv_projection(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` of BERT self-attention from one GEMM, each ``[B, T, h, d]`` with a unit last stride.

    x ``[B, T, H]`` (or ``[N, H]``, giving ``[N, h, d]``), w_qkv ``[3H, H]`` (query, key, value weights
    stacked), b_qkv ``[3H]``, all one dtype (fp32/fp16/bf16) and one device; ``d = H // num_heads``.
    ``backend``: ``"triton"`` (three contiguous outputs), ``"cublas"`` (views of one ``[..., 3H]`` buffer) or
    None (`kernels.matmul.gemm_backend("qkv")`). Differentiable in x, w_qkv and b_qkv.
    """
    _check_args(x, w_qkv, b_qkv, num_heads)
    backend = check_backend(backend, "qkv")
    if not (use_triton(x, w_qkv, b_qkv) if backend == "cublas" else gemm_dispatch(x, w_qkv, b_qkv)):
        return qkv_projection_ref(x, w_qkv, b_qkv, num_heads)
    lead, H = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(lead.numel(), H)  # (M, H)
    if torch.is_grad_enabled() and (x.requires_grad or w_qkv.requires_grad or b_qkv.requires_grad):
        q, k, v = _QKVProjection.apply(x2d, w_qkv, b_qkv, num_heads, backend)
    elif backend == "cublas":
        q, k, v = _cublas_qkv(x2d, w_qkv, b_qkv, num_heads)
    else:
        q, k, v = torch.ops.kernels.qkv_projection_fwd(x2d, w_qkv, b_qkv, num_heads)
    return tuple(t.unflatten(0, lead) for t in (q, k, v))  # 3 × (B, T, h, d)


def qkv_projection_ref(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``F.linear`` then split into q, k, v and unflatten heads (views, not contiguous)."""
    H = x.shape[-1]
    q, k, v = F.linear(x, w_qkv, b_qkv).split(H, dim=-1)  # 3 × (..., H)
    return tuple(t.unflatten(-1, (num_heads, H // num_heads)) for t in (q, k, v))  # (..., h, d)


def qkv_projection_packed(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int, backend: str | None = None
) -> torch.Tensor:
    """`qkv_projection` with q, k, v stacked in one contiguous ``qkv [B, T, 3, h, d]`` (``[N, 3, h, d]`` for 2-D x),
    for the packed attention entry points; its backward reads the incoming ``dqkv`` as ``[M, 3H]`` (no copy)."""
    _check_args(x, w_qkv, b_qkv, num_heads)
    backend = check_backend(backend, "qkv")
    if not (use_triton(x, w_qkv, b_qkv) if backend == "cublas" else gemm_dispatch(x, w_qkv, b_qkv)):
        return qkv_projection_packed_ref(x, w_qkv, b_qkv, num_heads)
    lead, H = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(lead.numel(), H)  # (M, H)
    if torch.is_grad_enabled() and (x.requires_grad or w_qkv.requires_grad or b_qkv.requires_grad):
        qkv = _QKVProjectionPacked.apply(x2d, w_qkv, b_qkv, num_heads, backend)
    else:
        qkv = _packed_forward(x2d, w_qkv, b_qkv, num_heads, backend)
    return qkv.unflatten(0, lead)  # (B, T, 3, h, d)


def qkv_projection_packed_ref(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear`` unflattened to ``[..., 3, h, d]``."""
    H = x.shape[-1]
    return F.linear(x, w_qkv, b_qkv).unflatten(-1, (3, num_heads, H // num_heads))  # (..., 3, h, d)
