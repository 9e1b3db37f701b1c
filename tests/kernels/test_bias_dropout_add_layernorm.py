"""Fused bias + dropout + residual + LayerNorm: forward and every gradient against a float64 reference that
uses the kernel's own keep-mask; dropout statistics, determinism, 64-bit counters, torch.compile, bad input.

On CPU the kernels run through Triton's interpreter (tests/conftest.py); bf16 only in the GPU tests."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels._philox import philox_uniform
from kernels.bias_dropout_add_layernorm import (
    _dropout_keep,
    bias_dropout_add_layernorm,
    bias_dropout_add_layernorm_dropout_mask,
    bias_dropout_add_layernorm_ref,
)
from tests.helpers import assert_within_torch_error

# Absolute slack per dtype; the tolerance is 2 × PyTorch's own error against float64, plus this, plus one
# unit in the last place of the tensor's largest value (see `_slack`).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _slack(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """ATOL plus one ulp of the largest reference value in `dtype`: both sides end with at least one
    rounding there, and with few elements (or one dominant row, such as a zero-variance row's large dx)
    the 2x ratio of two independent roundings is otherwise a coin toss."""
    return ATOL[dtype] + torch.finfo(dtype).eps * ref64.abs().max().item()


def _inputs(N, H, dtype, device, *, bias=True, residual=True, param_dtype=None, zero_row=True, seed=0):
    """x, bias, residual, gamma, beta and dy, seeded; row N // 2 of x and residual is all zeros (a fully
    padded row: zero variance)."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    x = rnd(N, H, scale=2.0)
    r = rnd(N, H) if residual else None
    if zero_row and N > 1:
        x[N // 2] = 0
        if r is not None:
            r[N // 2] = 0
    b = rnd(H, scale=0.5, dt=param_dtype) if bias else None
    gamma = rnd(H, scale=0.2, shift=1.0, dt=param_dtype)
    beta = rnd(H, scale=0.2, dt=param_dtype)
    dy = rnd(N, H)
    return x, b, r, gamma, beta, dy


def _forward_backward(fn, tensors, dy, **kwargs):
    """Run fn on fresh leaves; return the output and the gradients (None for absent inputs)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves, **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check_against_reference(x, b, r, gamma, beta, dy, p, eps, seed, dtype):
    tensors = (x, b, r, gamma, beta)
    y, grads = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=p, eps=eps, seed=seed)
    mask = bias_dropout_add_layernorm_dropout_mask(seed, x.shape, p, x.device)
    y64, grads64 = _forward_backward(
        bias_dropout_add_layernorm_ref, [t.double() if t is not None else None for t in tensors], dy.double(),
        dropout_p=p, eps=eps, dropout_mask=mask,
    )
    y_t, grads_t = _forward_backward(
        bias_dropout_add_layernorm_ref, tensors, dy, dropout_p=p, eps=eps, dropout_mask=mask
    )
    assert y.dtype == x.dtype
    assert_within_torch_error(y, y64, y_t, atol=_slack(y64, dtype), name="y")
    for name, t, g, g64, g_t in zip(("dx", "dbias", "dresidual", "dgamma", "dbeta"), tensors, grads, grads64,
                                    grads_t, strict=True):
        if t is None:
            continue
        assert g is not None and g.dtype == t.dtype, name
        assert_within_torch_error(g, g64, g_t, atol=_slack(g64, t.dtype), name=name)


VARIANTS = {  # name: (bias, residual, dropout_p)
    "full": (True, True, 0.1),
    "no_dropout": (True, True, 0.0),
    "no_bias": (False, True, 0.2),
    "layernorm_only": (False, False, 0.0),
    "dropout_layernorm": (True, False, 0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,H", [(1, 96), (37, 160), (129, 96)])
@pytest.mark.parametrize("variant", ["full", "no_bias", "layernorm_only"])
def test_matches_float64_reference(device, dtype, N, H, variant):
    has_bias, has_res, p = VARIANTS[variant]
    x, b, r, gamma, beta, dy = _inputs(N, H, dtype, device, bias=has_bias, residual=has_res, seed=N + H)
    _check_against_reference(x, b, r, gamma, beta, dy, p, 1e-5, seed=1234 + N, dtype=dtype)


@pytest.mark.parametrize("variant", ["no_dropout", "dropout_layernorm"])
def test_other_variants(device, variant):
    has_bias, has_res, p = VARIANTS[variant]
    x, b, r, gamma, beta, dy = _inputs(37, 160, torch.float32, device, bias=has_bias, residual=has_res)
    _check_against_reference(x, b, r, gamma, beta, dy, p, 1e-12, seed=7, dtype=torch.float32)


@pytest.mark.parametrize("H", [384, 768, 1024])
def test_bert_hidden_sizes(device, H):
    x, b, r, gamma, beta, dy = _inputs(5, H, torch.float32, device, seed=H)
    _check_against_reference(x, b, r, gamma, beta, dy, 0.1, 1e-12, seed=99, dtype=torch.float32)


def test_fp32_parameters_with_fp16_activations(device):
    """Master weights in fp32 beside fp16 activations: y in fp16, parameter gradients in fp32."""
    x, b, r, gamma, beta, dy = _inputs(37, 96, torch.float16, device, param_dtype=torch.float32)
    _check_against_reference(x, b, r, gamma, beta, dy, 0.1, 1e-5, seed=5, dtype=torch.float16)


def test_fully_padded_row_is_finite_with_bert_eps(device):
    """A zero row (zero variance) with eps = 1e-12 gives y = beta and finite gradients."""
    x, b, r, gamma, beta, dy = _inputs(9, 96, torch.float32, device, bias=False)
    y, grads = _forward_backward(bias_dropout_add_layernorm, (x, None, r, gamma, beta), dy, eps=1e-12)
    torch.testing.assert_close(y[9 // 2], beta, rtol=0, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def _dropped_fraction_from_output(N, H, p, seed, device):
    """With x = 1, no bias or residual, dropped elements are exactly the negative outputs (γ = 1, β = 0)."""
    x = torch.ones(N, H, device=device)
    y = bias_dropout_add_layernorm(x, None, None, torch.ones(H, device=device), torch.zeros(H, device=device),
                                   dropout_p=p, seed=seed)
    return y < 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_and_mask_helper(device, p):
    N, H = 129, 768
    dropped = _dropped_fraction_from_output(N, H, p, seed=2024, device=device)
    mask = bias_dropout_add_layernorm_dropout_mask(2024, (N, H), p, device)
    assert torch.equal(dropped, ~mask), "the helper's mask differs from the kernel's"
    n = N * H
    frac = dropped.float().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped fraction {frac:.4f}, expected {p}"
    # Every row and every column sees dropout (no stuck counter).
    assert dropped.any(dim=1).all() and dropped.any(dim=0).float().mean() > 0.9


def test_determinism_and_seed(device):
    x, b, r, gamma, beta, dy = _inputs(37, 160, torch.float32, device)
    tensors = (x, b, r, gamma, beta)
    y1, g1 = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.2, seed=11)
    y2, g2 = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.2, seed=11)
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2, strict=True))
    y3, _ = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.2, seed=12)
    assert not torch.equal(y1, y3)
    # seed=None draws from torch's generator: torch.manual_seed makes it repeatable.
    torch.manual_seed(3)
    y4, _ = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.2)
    torch.manual_seed(3)
    y5, _ = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.2)
    assert torch.equal(y4, y5)


def test_reference_path_uses_the_same_mask(device, monkeypatch):
    """Without the interpreter, CPU tensors take the plain-PyTorch path: same seed, same dropout mask."""
    if device != "cpu":
        pytest.skip("dispatch to the reference is a CPU-only path")
    x, b, r, gamma, beta, dy = _inputs(37, 160, torch.float32, device)
    tensors = (x, b, r, gamma, beta)
    y_kernel, g_kernel = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.3, seed=8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    y_ref, g_ref = _forward_backward(bias_dropout_add_layernorm, tensors, dy, dropout_p=0.3, seed=8)
    torch.testing.assert_close(y_kernel, y_ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_kernel, g_ref, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@triton.jit
def _keep_probe_kernel(out_ptr, base_hi, base_lo, seed, p, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    offs = base_hi.to(tl.int64) * 4294967296 + base_lo + cols
    tl.store(out_ptr + cols, _dropout_keep(seed, offs, p).to(tl.int8))


def test_counters_above_2_pow_32(device):
    """Counters past 2**32 (N·H beyond int32/uint32) use the high Philox word: kernel == helper, and the
    stream differs from the low-counter one (no wrap-around)."""
    base = 2**32 + 12345
    p, seed = 0.5, 77
    out = torch.empty(256, dtype=torch.int8, device=device)
    _keep_probe_kernel[(1,)](out, base >> 32, base & 0xFFFFFFFF, seed, p, BLOCK=256)
    counters = torch.arange(base, base + 256, dtype=torch.int64, device=device)
    expected = philox_uniform(seed, counters) >= p
    assert torch.equal(out.bool(), expected)
    wrapped = philox_uniform(seed, counters - 2**32) >= p
    assert not torch.equal(expected, wrapped)


def test_torch_compile_fullgraph_matches_eager(device):
    x, b, r, gamma, beta, dy = _inputs(37, 96, torch.float32, device)

    def fn(x, b, r, gamma, beta):
        return bias_dropout_add_layernorm(x, b, r, gamma, beta, dropout_p=0.1, eps=1e-5, seed=31)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    tensors = (x, b, r, gamma, beta)
    y_c, g_c = _forward_backward(compiled, tensors, dy)
    y_e, g_e = _forward_backward(fn, tensors, dy)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, c in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _bad_calls(device):
    x, b, r, gamma, beta, _ = _inputs(4, 96, torch.float32, device)
    ok = dict(x=x, bias=b, residual=r, gamma=gamma, beta=beta)

    def call(**over):
        args = {**ok, **over}
        p = args.pop("dropout_p", 0.0)
        eps = args.pop("eps", 1e-12)
        seed = args.pop("seed", None)
        return bias_dropout_add_layernorm(**args, dropout_p=p, eps=eps, seed=seed)

    return call, x, gamma


@pytest.mark.parametrize(
    "case",
    ["x_not_tensor", "x_int", "x_scalar", "residual_shape", "residual_dtype", "bias_shape", "bias_rank",
     "gamma_shape", "beta_int", "p_negative", "p_one", "eps_zero", "eps_negative", "seed_negative",
     "seed_float", "device"],
)
@pytest.mark.no_kernel("argument checks raise before any launch")
def test_bad_arguments_raise(device, case):
    call, x, gamma = _bad_calls(device)
    bad = {
        "x_not_tensor": dict(x=[[1.0]]),
        "x_int": dict(x=x.to(torch.int32)),
        "x_scalar": dict(x=x[0, 0]),
        "residual_shape": dict(residual=x[:3]),
        "residual_dtype": dict(residual=x.double()),
        "bias_shape": dict(bias=gamma[:95]),
        "bias_rank": dict(bias=gamma[None]),
        "gamma_shape": dict(gamma=torch.ones(97, device=device)),
        "beta_int": dict(beta=torch.zeros(96, dtype=torch.int64, device=device)),
        "p_negative": dict(dropout_p=-0.1),
        "p_one": dict(dropout_p=1.0),
        "eps_zero": dict(eps=0.0),
        "eps_negative": dict(eps=-1e-5),
        "seed_negative": dict(seed=-1),
        "seed_float": dict(seed=1.5),
        "device": dict(gamma=torch.ones(96, device="meta")),
    }[case]
    with pytest.raises(ValueError):
        call(**bad)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [96, 768, 1024])
@pytest.mark.parametrize("variant", ["full", "layernorm_only"])
def test_bf16_on_gpu(H, variant):
    has_bias, has_res, p = VARIANTS[variant]
    x, b, r, gamma, beta, dy = _inputs(1000, H, torch.bfloat16, "cuda", bias=has_bias, residual=has_res)
    _check_against_reference(x, b, r, gamma, beta, dy, p, 1e-12, seed=3, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_large_rows_on_gpu():
    """Several backward programs per SM and the partial-sum reduction at a BERT-base batch."""
    x, b, r, gamma, beta, dy = _inputs(256 * 128, 768, torch.float16, "cuda", param_dtype=torch.float32)
    _check_against_reference(x, b, r, gamma, beta, dy, 0.1, 1e-12, seed=4, dtype=torch.float16)
