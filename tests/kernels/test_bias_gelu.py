"""bias_gelu (the cuBLAS path's GELU epilogue): forward and gradients against float64, with and without bias."""

from __future__ import annotations

import pytest
import torch

from kernels.bias_gelu import bias_gelu, bias_gelu_ref
from tests.helpers import assert_within_torch_error

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # elementwise: a fixed atol is the rule


def _inputs(shape, dtype, device, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g)
    x.view(-1, shape[-1])[0] = 0.0  # a fully padded (zeroed) row: output gelu(bias), finite
    b = torch.randn(shape[-1], generator=g) if with_bias else None
    dy = torch.randn(shape, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(b), cast(dy)


def _run(fn, x, b, dy, approximate):
    xl = x.detach().clone().requires_grad_()
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(xl, bl, approximate)
    y.backward(dy)
    return y.detach(), xl.grad, None if bl is None else bl.grad


# (2, 37, 1030): N above the 1024-column tile (a tail tile); (37, 1): a single column; (5, 129): odd rows/cols.
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 1030), (37, 1), (5, 129)])
def test_forward_backward(shape, dtype, with_bias, approximate, device):
    x, b, dy = _inputs(shape, dtype, device, with_bias)
    y, dx, db = _run(bias_gelu, x, b, dy, approximate)
    y_t, dx_t, db_t = _run(bias_gelu_ref, x, b, dy, approximate)
    x64, b64 = x.double(), None if b is None else b.double()
    y64, dx64, db64 = _run(bias_gelu_ref, x64, b64, dy.double(), approximate)
    assert y.dtype == dtype and dx.dtype == dtype
    # Elementwise with fp32 math: one rounding of the output; PyTorch's own error is the other yardstick.
    assert_within_torch_error(y, y64, y_t, k=1.0, atol=ATOL[dtype] * max(1.0, y64.abs().max().item()), name="y")
    assert_within_torch_error(dx, dx64, dx_t, k=1.0, atol=ATOL[dtype] * 4, name="dx")
    if with_bias:
        assert_within_torch_error(db, db64, db_t, k=2.0, atol=ATOL[dtype] * shape[0] * 4, name="db")


def test_no_grad_and_strided_input(device):
    x, b, _ = _inputs((9, 40), torch.float32, device, True, seed=1)
    x_t = x.t().contiguous().t()  # column-major: reshaped to a contiguous copy inside
    with torch.no_grad():
        y = bias_gelu(x_t, b, "none")
    torch.testing.assert_close(y, bias_gelu_ref(x, b), rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph(device):
    x, b, dy = _inputs((3, 7, 24), torch.float32, device, True, seed=2)
    compiled = torch.compile(bias_gelu, fullgraph=True, backend="aot_eager")
    for got, want in zip(_run(compiled, x, b, dy, "tanh"), _run(bias_gelu, x, b, dy, "tanh"), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8).numpy(),), "x must be a torch.Tensor"),
        ((torch.randn(()),), "at least 1 dimension"),
        ((torch.randn(4, 8), torch.randn(7)), "bias has 7 entries"),
        ((torch.randn(4, 8), torch.randn(8).half()), "share one dtype"),
        ((torch.randn(4, 8).long(),), "x must have dtype"),
        ((torch.randn(4, 8), None, "erf"), "approximate must be one of"),
    ],
)
@pytest.mark.no_kernel("argument checks raise before any launch")
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        bias_gelu(*args)
