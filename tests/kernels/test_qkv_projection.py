"""qkv_projection: q, k, v and every gradient against float64, within 2× PyTorch's same-dtype error, on both
GEMM paths (Triton GEMM with the 3-way split epilogue; cuBLAS into one buffer with q/k/v views)."""

from __future__ import annotations

import pytest
import torch

from kernels.qkv_projection import qkv_projection, qkv_projection_ref
from tests.helpers import assert_within_torch_error

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(x_shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = x_shape[-1]
    x = torch.randn(x_shape, generator=g)
    x.view(-1, H)[-1] = 0.0  # a fully padded (zeroed) token row: q, k, v must be the bias, finite
    w = torch.randn(3 * H, H, generator=g) / H**0.5
    b = torch.randn(3 * H, generator=g)
    dys = [torch.randn(x_shape, generator=g) for _ in range(3)]
    cast = lambda t: t.to(device=device, dtype=dtype)
    return [cast(t) for t in (x, w, b)], [cast(t) for t in dys]


# The cuBLAS path of the QKV projection is torch.addmm with the bias fused: it launches no Triton kernel by design
# (its packed-attention tests still launch the attention kernels).
BACKENDS = ["triton", pytest.param("cublas", marks=pytest.mark.no_kernel("cuBLAS path: torch.addmm, no Triton GEMM"))]


def _run(fn, inputs, dys, num_heads, use=(0, 1, 2), **kw):
    """Outputs and (dx, dW, db) with upstream grads dys[i] on the outputs listed in `use`."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, num_heads, **kw)
    loss = sum((outs[i] * dys[i].unflatten(-1, outs[i].shape[-2:])).sum() for i in use)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _check(x_shape, num_heads, dtype, device, use=(0, 1, 2), backend="triton"):
    inputs, dys = _inputs(x_shape, dtype, device)
    outs, grads = _run(qkv_projection, inputs, dys, num_heads, use, backend=backend)
    outs_t, grads_t = _run(qkv_projection_ref, inputs, dys, num_heads, use)  # PyTorch in the same dtype
    inputs64 = [t.double() for t in inputs]
    outs64, grads64 = _run(qkv_projection_ref, inputs64, [t.double() for t in dys], num_heads, use)
    H, d = x_shape[-1], x_shape[-1] // num_heads
    atol = ATOL[dtype]
    for name, o, o64, ot in zip("qkv", outs, outs64, outs_t, strict=True):
        assert o.shape == (*x_shape[:-1], num_heads, d) and o.dtype == dtype
        if backend == "triton":
            assert o.is_contiguous(), f"{name} must be contiguous"
        else:  # views of one [..., 3H] buffer: row stride 3H
            assert o.stride()[-3:] == (3 * H, d, 1), f"{name} strides {o.stride()}"
        assert_within_torch_error(o, o64, ot, atol=atol, name=name)
    for name, g, g64, gt in zip(("dx", "dW", "db"), grads, grads64, grads_t, strict=True):
        assert g.dtype == dtype
        assert_within_torch_error(g, g64, gt, atol=atol, name=name)
    assert grads[1].shape == (3 * H, H)


# (x shape, heads): 3-D and 2-D x; H = 96, 160; heads 3 and 5; H = 45 puts q/k/v boundaries inside tiles.
SHAPES = [((2, 37, 96), 3), ((37, 160), 5), ((1, 7, 45), 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape,num_heads", SHAPES)
def test_forward_backward(x_shape, num_heads, dtype, backend, device):
    _check(x_shape, num_heads, dtype, device, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_outputs_get_zero_grads(backend, device):
    """Only k feeds the loss: dq and dv are zero, so dW's q and v rows and db's q and v parts are zero."""
    _check((3, 5, 40), 4, torch.float32, device, use=(1,), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("x_shape,num_heads", SHAPES + [((8, 128, 768), 12), ((3, 77, 1024), 16)])
def test_forward_backward_gpu(x_shape, num_heads, dtype, backend):
    _check(x_shape, num_heads, dtype, "cuda", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_strided_input(backend, device):
    (x, w, b), _ = _inputs((37, 48), torch.float32, device, seed=1)
    x_t = x.t().contiguous().t()  # same values, column-major
    with torch.no_grad():
        outs = qkv_projection(x_t, w, b, 4, backend=backend)
    refs64 = qkv_projection_ref(x.double(), w.double(), b.double(), 4)
    for o, r64, rt in zip(outs, refs64, qkv_projection_ref(x, w, b, 4), strict=True):
        assert_within_torch_error(o, r64, rt, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    (x, w, b), dys = _inputs((2, 9, 24), torch.float32, device, seed=2)
    fn = lambda x, w, b, num_heads: qkv_projection(x, w, b, num_heads, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs_c, grads_c = _run(compiled, [x, w, b], dys, 3)
    outs_e, grads_e = _run(fn, [x, w, b], dys, 3)
    for a, e in zip(outs_c + grads_c, outs_e + grads_e, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def _bad_args():
    x, w, b = torch.randn(2, 5, 8), torch.randn(24, 8), torch.randn(24)
    return [
        ((x.tolist(), w, b, 2), "x must be a torch.Tensor"),
        ((x[0, 0], w, b, 2), "x must have 2 or 3 dimensions"),
        ((x[None], w, b, 2), "x must have 2 or 3 dimensions"),
        ((x, w[None], b, 2), "w_qkv must have 2 dimensions"),
        ((x, w, b[None], 2), "b_qkv must have 1 dimensions"),
        ((x, w[:16], b, 2), r"w_qkv must be the stacked"),
        ((x, w, b[:16], 2), r"b_qkv must have shape"),
        ((x.int(), w, b, 2), "x must have dtype"),
        ((x, w.half(), b, 2), "share one dtype"),
        ((x, w, b.to("meta"), 2), "b_qkv is on meta"),
        ((x, w, b, 3), "not divisible by num_heads"),
        ((x, w, b, 0), "num_heads must be a positive int"),
        ((x, w, b, 2.0), "num_heads must be a positive int"),
        ((x, w, b, 2, "cutlass"), "backend must be one of"),
    ]


@pytest.mark.parametrize("args,match", _bad_args())
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        qkv_projection(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 fallback concerns the CPU interpreter")
def test_bf16_cpu_falls_back_to_reference():
    (x, w, b), _ = _inputs((5, 24), torch.bfloat16, "cpu", seed=3)
    with pytest.warns(UserWarning, match="bf16 GEMM under Triton's interpreter"):
        outs = qkv_projection(x, w, b, 2, backend="triton")
    for o, r in zip(outs, qkv_projection_ref(x, w, b, 2), strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


# ------------------------------------------------------------------------ packed qkv + packed attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_forward_backward(backend, dtype, device):
    """qkv_projection_packed: one [..., 3, h, d] output and its gradients against float64."""
    from kernels.qkv_projection import qkv_projection_packed, qkv_projection_packed_ref

    inputs, dys = _inputs((2, 37, 96), dtype, device)
    dy = torch.stack(dys, -2).unflatten(-1, (3, 32))  # (B, T, 3, h, d)

    def run(fn, ins, g, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        out = fn(*leaves, 3, **kw)
        out.backward(g)
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(qkv_projection_packed, inputs, dy, backend=backend)
    out_t, grads_t = run(qkv_projection_packed_ref, inputs, dy)
    out64, grads64 = run(qkv_projection_packed_ref, [t.double() for t in inputs], dy.double())
    assert out.shape == (2, 37, 3, 3, 32) and out.is_contiguous()
    assert_within_torch_error(out, out64, out_t, atol=ATOL[dtype], name="qkv")
    for name, g, g64, gt in zip(("dx", "dW", "db"), grads, grads64, grads_t, strict=True):
        assert_within_torch_error(g, g64, gt, atol=ATOL[dtype], name=name)


class _CatLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.cats = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("cat", "stack"):
            self.cats.append(sum(t.numel() for t in args[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_attention_backward_needs_no_concatenation(backend, varlen, device):
    """Projection + attention on one packed qkv: the same outputs and gradients as the three-tensor path, and the
    backward concatenates no activation-sized tensor (dq, dk, dv arrive in one buffer)."""
    from kernels.attention import (
        fused_attention,
        fused_attention_qkvpacked,
        fused_attention_varlen,
        fused_attention_varlen_qkvpacked,
    )
    from kernels.qkv_projection import qkv_projection_packed
    from tests.helpers import pad_mask

    B, T, H, heads = 3, 9, 32, 2
    inputs, _ = _inputs((B, T, H), torch.float32, device, seed=5)
    mask = pad_mask([9, 4, 0], T, device)
    cu = torch.tensor([0, 9, 13, 13], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(13 if varlen else B * T, heads, H // heads, generator=g).to(device)

    def run(packed_path: bool):
        x, w, b = (t.detach().clone().requires_grad_() for t in inputs)
        xs = x.reshape(B * T, H)[mask.reshape(-1)] if varlen else x  # (N, H) or (B, T, H)
        if packed_path:
            qkv = qkv_projection_packed(xs, w, b, heads, backend=backend)
            out = (fused_attention_varlen_qkvpacked(qkv, cu, T, 0.1, seed=3) if varlen
                   else fused_attention_qkvpacked(qkv, mask, 0.1, seed=3))  # fmt: skip
        else:
            q, k, v = qkv_projection(xs, w, b, heads, backend=backend)
            out = (fused_attention_varlen(q, k, v, cu, T, 0.1, seed=3) if varlen
                   else fused_attention(q, k, v, mask, 0.1, seed=3))  # fmt: skip
        log = _CatLog()
        with log:
            out.backward(dout.reshape(out.shape))
        return out.detach(), [t.grad for t in (x, w, b)], log.cats

    out_a, grads_a, cats_a = run(False)
    out_b, grads_b, cats_b = run(True)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    n_tokens = 13 if varlen else B * T
    assert any(c >= 3 * n_tokens * H for c in cats_a)  # the three-tensor path concatenates dq, dk, dv
    assert not any(c >= n_tokens * H for c in cats_b), cats_b
