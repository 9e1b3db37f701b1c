"""linear_bias_gelu: forward and every gradient against float64, within 2× PyTorch's same-dtype error, on both
GEMM paths (Triton GEMM with the fused epilogue; cuBLAS addmm + the Triton GELU epilogue)."""

from __future__ import annotations

import pytest
import torch

from kernels.linear_bias_gelu import linear_bias_gelu, linear_bias_gelu_ref
from tests.helpers import assert_within_torch_error

# Small absolute slack per dtype (the rule's main term is 2× PyTorch's own error).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(x_shape, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g)
    x.view(-1, k)[0] = 0.0  # a fully padded (zeroed) token row: output must be gelu(bias), finite
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    dy = torch.randn(*x_shape[:-1], n, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)], dy.to(device=device, dtype=dtype)


BACKENDS = ["triton", "cublas"]


def _run(fn, inputs, dy, approximate, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, approximate, **kw)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def _check(x_shape, n, dtype, device, approximate, backend="triton"):
    inputs, dy = _inputs(x_shape, n, dtype, device)
    y, grads = _run(linear_bias_gelu, inputs, dy, approximate, backend=backend)
    y_t, grads_t = _run(linear_bias_gelu_ref, inputs, dy, approximate)  # PyTorch in the same dtype
    y64, grads64 = _run(linear_bias_gelu_ref, [t.double() for t in inputs], dy.double(), approximate)
    assert y.dtype == dtype
    atol = ATOL[dtype]
    assert_within_torch_error(y, y64, y_t, atol=atol, name="y")
    for name, g, g64, gt in zip(("dx", "dW", "db"), grads, grads64, grads_t, strict=True):
        assert g.dtype == dtype
        assert_within_torch_error(g, g64, gt, atol=atol, name=name)


SHAPES = [((2, 37, 96), 129), ((37, 160), 1), ((3, 5, 33), 37)]  # K = 33: not a multiple of BLOCK_K


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape,n", SHAPES)
def test_forward_backward(x_shape, n, dtype, approximate, backend, device):
    _check(x_shape, n, dtype, device, approximate, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("x_shape,n", SHAPES + [((4, 128, 768), 3072), ((3, 77, 1024), 1023)])
def test_forward_backward_gpu(x_shape, n, dtype, approximate, backend):
    _check(x_shape, n, dtype, "cuda", approximate, backend)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_strided_inputs(backend, approximate, device):
    """Inference path (no pre-activation saved; cuBLASLt's GELU epilogue for tanh on the cuBLAS path) and
    non-contiguous x / weight give the same result."""
    (x, w, b), _ = _inputs((37, 40), 21, torch.float32, device, seed=1)
    ref = linear_bias_gelu_ref(x.double(), w.double(), b.double(), approximate)
    x_t = x.t().contiguous().t()  # same values, column-major
    w_t = w.t().contiguous().t()
    with torch.no_grad():
        y = linear_bias_gelu(x_t, w_t, b, approximate, backend=backend)
    assert_within_torch_error(y, ref, linear_bias_gelu_ref(x, w, b, approximate), atol=1e-5)
    y1 = linear_bias_gelu(x[0], w, b, approximate, backend=backend)  # 1-D x: [K] -> [N]
    assert y1.shape == (21,)
    assert_within_torch_error(y1, ref[0], linear_bias_gelu_ref(x[0], w, b, approximate), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    (x, w, b), dy = _inputs((2, 9, 24), 19, torch.float32, device, seed=2)
    fn = lambda x, w, b, approximate: linear_bias_gelu(x, w, b, approximate, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y_c, grads_c = _run(compiled, [x, w, b], dy, "tanh")
    y_e, grads_e = _run(fn, [x, w, b], dy, "tanh")
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-6, atol=1e-6)


def _bad_args():
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    return [
        ((x.numpy(), w, b), "x must be a torch.Tensor"),
        ((torch.randn(()), w, b), "at least 1 dimension"),
        ((x, torch.randn(48), b), "weight must have 2 dimensions"),
        ((x, w, b[None]), "bias must have 1 dimensions"),
        ((torch.randn(4, 7), w, b), "last dimension"),
        ((x, w, torch.randn(5)), "bias has 5 entries"),
        ((x.long(), w, b), "x must have dtype"),
        ((x.double(), w.double(), b.double()), "x must have dtype"),
        ((x, w.half(), b), "share one dtype"),
        ((x, w, b.half()), "share one dtype"),
        ((x, w.to("meta"), b), "weight is on meta"),
        ((x, w, b, "erf"), "approximate must be one of"),
        ((x, w, b, "none", "cutlass"), "backend must be one of"),
    ]


@pytest.mark.parametrize("args,match", _bad_args())
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        linear_bias_gelu(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 fallback concerns the CPU interpreter")
def test_bf16_cpu_falls_back_to_reference():
    (x, w, b), _ = _inputs((5, 24), 7, torch.bfloat16, "cpu", seed=3)
    with pytest.warns(UserWarning, match="bf16 GEMM under Triton's interpreter"):
        y = linear_bias_gelu(x, w, b, backend="triton")
    torch.testing.assert_close(y, linear_bias_gelu_ref(x, w, b), rtol=0, atol=0)


def test_bf16_cpu_cublas_path_runs_the_epilogue(device):
    """The cuBLAS path's GELU epilogue is elementwise, so bf16 runs it (in the interpreter on CPU too)."""
    (x, w, b), dy = _inputs((2, 7, 24), 19, torch.bfloat16, device, seed=4)
    y, grads = _run(linear_bias_gelu, [x, w, b], dy, "none", backend="cublas")
    y_t, grads_t = _run(linear_bias_gelu_ref, [x, w, b], dy, "none")
    y64, grads64 = _run(linear_bias_gelu_ref, [t.double() for t in (x, w, b)], dy.double(), "none")
    assert_within_torch_error(y, y64, y_t, atol=ATOL[torch.bfloat16], name="y")
    for name, g, g64, gt in zip(("dx", "dW", "db"), grads, grads64, grads_t, strict=True):
        assert_within_torch_error(g, g64, gt, atol=ATOL[torch.bfloat16], name=name)
