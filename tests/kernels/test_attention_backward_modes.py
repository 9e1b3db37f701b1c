"""The two attention backward paths of kernels.attention: the default one-pass kernel (dQ added with fp32
atomics, 5 products per block pair) and `deterministic=True` (a dK/dV pass and a dQ pass, no atomics).

Both against a float64 reference fed the kernel's keep-mask (kernel error ≤ 2 × same-dtype PyTorch error + atol,
tests/helpers.py), on odd shapes with padding and a fully padded row, padded and varlen layouts; the deterministic
path bitwise repeatable; the switch (argument, torch.use_deterministic_algorithms, environment) and the autotune
reset of the atomic dQ buffer. Interpreter on CPU (fp32 / fp16).
"""

from __future__ import annotations

import pytest
import torch

import kernels.attention as attn
from kernels.attention import (
    attention_dropout_mask,
    attention_dropout_mask_varlen,
    attention_ref,
    attention_varlen_ref,
    fused_attention,
    fused_attention_varlen,
    unpad_input,
)
from tests.helpers import assert_within_torch_error, pad_mask

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


def _check_padded_grads(grads, qkv, mask, p, keep, dout, what: str) -> None:
    """dq, dk, dv of the kernel against the float64 reference fed the kernel's keep-mask (tolerance rule of
    tests/helpers.py: the same-dtype PyTorch reference sets the error allowed)."""
    x64 = [t.detach().double().requires_grad_() for t in qkv]
    g64 = _grads(attention_ref(*x64, mask, p, dropout_mask=keep), x64, dout)
    xt = [t.detach().clone().requires_grad_() for t in qkv]
    gt = _grads(attention_ref(*xt, mask, p, dropout_mask=keep, upcast=False), xt, dout)
    for name, g, r64, rt in zip(("dq", "dk", "dv"), grads, g64, gt, strict=True):
        assert torch.isfinite(g).all(), name
        assert_within_torch_error(g, r64, rt, atol=ATOL[qkv[0].dtype], name=f"{name} ({what})")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "B, Tq, Tk, H, D, dtype, p, lengths",
    [
        (3, 37, 37, 2, 32, torch.float16, 0.2, [37, 11, 0]),  # fully padded batch row
        (2, 23, 70, 1, 16, torch.float32, 0.1, [70, 33]),  # cross lengths, several key blocks, tails
    ],
)
def test_padded_backward_matches_reference(B, Tq, Tk, H, D, dtype, p, lengths, deterministic, device):
    torch.manual_seed(11)
    q = torch.randn(B, Tq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Tk, H, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Tk, H, D, device=device, dtype=dtype, requires_grad=True)
    mask = pad_mask(lengths, Tk, device)
    out = fused_attention(q, k, v, mask, p, seed=5, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    keep = attention_dropout_mask(5, B, H, Tq, Tk, p, device)
    _check_padded_grads(grads, (q, k, v), mask, p, keep, dout, f"deterministic={deterministic}")
    if 0 in lengths:
        assert grads[0][lengths.index(0)].abs().max().item() == 0.0  # no real key: dq = 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_backward_matches_reference(deterministic, device):
    B, T, H, D, dtype, p, seed = 3, 29, 2, 32, torch.float16, 0.3, 4
    torch.manual_seed(2)
    x = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)
    mask = pad_mask([29, 0, 17], T, device)
    packed, _, cu, max_len = unpad_input(x * mask[:, :, None, None, None], mask)
    xv = packed.detach().requires_grad_()
    out = fused_attention_varlen(*xv.unbind(1), cu, max_len, p, seed=seed, deterministic=deterministic)
    dout = torch.randn_like(out)
    (g,) = _grads(out, (xv,), dout)
    keep = attention_dropout_mask_varlen(seed, cu, H, max_len, p)
    x64 = packed.detach().double().requires_grad_()
    (g64,) = _grads(attention_varlen_ref(*x64.unbind(1), cu, max_len, p, dropout_mask=keep), (x64,), dout)
    xt = packed.detach().clone().requires_grad_()
    (gt,) = _grads(attention_varlen_ref(*xt.unbind(1), cu, max_len, p, dropout_mask=keep, upcast=False), (xt,), dout)
    assert_within_torch_error(g, g64, gt, atol=ATOL[dtype], name=f"varlen dqkv (deterministic={deterministic})")


def test_deterministic_is_repeatable_and_agrees_with_atomic(device):
    torch.manual_seed(3)
    B, T, H, D = 2, 45, 2, 16
    q, k, v = (torch.randn(B, T, H, D, device=device, requires_grad=True) for _ in range(3))
    mask = pad_mask([45, 20], T, device)
    dout = torch.randn(B, T, H, D, device=device)

    def grads(deterministic):
        return _grads(fused_attention(q, k, v, mask, 0.25, seed=9, deterministic=deterministic), (q, k, v), dout)

    first, second = grads(True), grads(True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # bitwise
    for a, b in zip(first, grads(False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same math, dQ summed in another order


class _Spy:
    """Stands in for a Triton kernel object: records launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _backward_kernels_used(monkeypatch, device, **kwargs) -> tuple[int, int]:
    atomic, two_pass = _Spy(attn._attn_bwd_kernel), _Spy(attn._attn_bwd_dkdv_kernel)
    monkeypatch.setattr(attn, "_attn_bwd_kernel", atomic)
    monkeypatch.setattr(attn, "_attn_bwd_dkdv_kernel", two_pass)
    q = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    fused_attention(q, q, q, None, 0.1, seed=1, **kwargs).sum().backward()
    return atomic.launches, two_pass.launches


def test_switches_select_the_backward(monkeypatch, device):
    assert _backward_kernels_used(monkeypatch, device) == (1, 0)  # default: atomic one-pass
    assert _backward_kernels_used(monkeypatch, device, deterministic=True) == (0, 1)
    monkeypatch.setattr(attn, "_DETERMINISTIC_ENV", True)  # FASTBERT_DETERMINISTIC_ATTENTION=1 at import
    assert _backward_kernels_used(monkeypatch, device) == (0, 1)
    assert _backward_kernels_used(monkeypatch, device, deterministic=False) == (1, 0)  # the argument wins
    monkeypatch.setattr(attn, "_DETERMINISTIC_ENV", False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _backward_kernels_used(monkeypatch, device) == (0, 1)
    finally:
        torch.use_deterministic_algorithms(previous)
    with pytest.raises(ValueError, match="deterministic"):
        fused_attention(torch.randn(1, 3, 1, 16, device=device), *(torch.randn(1, 3, 1, 16, device=device),) * 2,
                        deterministic=1)  # fmt: skip


@pytest.mark.no_kernel("inspects the autotuner set-up")
def test_atomic_dq_buffer_is_zeroed_for_every_autotune_trial():
    # Autotuning re-runs the kernel once per config: with dQ accumulated by atomics each trial must start from 0.
    assert attn._attn_bwd_kernel.reset_to_zero == ["DQ"]
    assert not getattr(attn._attn_bwd_dkdv_kernel, "reset_to_zero", None)  # the deterministic passes store


# 16-bit one-pass backward with query blocks under 64 rows (the head-dim-128 tiles): dQ is computed transposed,
# dQᵀ = Kᵀ·dSᵀ, and added through transposed pointers; fp32 keeps dS·K. The interpreter's own tile has 64-row
# query blocks, so these tests swap in a 16-row one (3 query blocks and 2 key blocks at T = 37, both with tails)
# and, under the interpreter, record the shape of every dot the kernel makes, to show which dQ form ran.
_SMALL_M_TILE = (16, 32, 4, 1)


@pytest.fixture
def small_query_blocks(monkeypatch):
    """(dot output shapes recorded, launch counter of the one-pass backward kernel)."""
    tuner = attn._attn_bwd_kernel
    monkeypatch.setattr(tuner, "configs", [attn._config(_SMALL_M_TILE)])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(attn, "_INTERPRETER_TILE", _SMALL_M_TILE)
    spy = _Spy(tuner)
    monkeypatch.setattr(attn, "_attn_bwd_kernel", spy)
    shapes = []
    if attn.interpreter_on():  # the interpreter runs the kernel as Python: `_dot` is looked up at each call
        dot = attn._dot

        def recording_dot(a, b, IEEE):
            out = dot(a, b, IEEE)
            shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(attn, "_dot", recording_dot)
    return shapes, spy


def _check_dq_form(small_query_blocks, dtype, D):
    shapes, spy = small_query_blocks
    assert spy.launches == 1  # the one-pass backward ran, not the two-pass one
    if not attn.interpreter_on():  # compiled: no dot is recorded
        return
    block_m, block_d = _SMALL_M_TILE[0], max(16, 1 << (D - 1).bit_length())
    assert ((block_d, block_m) in shapes) == (dtype != torch.float32), shapes  # dQᵀ = Kᵀ·dSᵀ
    assert ((block_m, block_d) in shapes) == (dtype == torch.float32), shapes  # dQ = dS·K


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_query_blocks_padded_backward(dtype, p, small_query_blocks, device):
    B, T, H, D, seed = 3, 37, 2, 64, 6
    torch.manual_seed(21)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = pad_mask([37, 0, 19], T, device)  # one fully padded batch row
    out = fused_attention(q, k, v, mask, p, seed=seed)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    _check_dq_form(small_query_blocks, dtype, D)
    keep = attention_dropout_mask(seed, B, H, T, T, p, device) if p else None
    _check_padded_grads(grads, (q, k, v), mask, p, keep, dout, f"16-row query blocks, p={p}")
    assert grads[0][1].abs().max().item() == 0.0  # no real key: dq = 0


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_query_blocks_varlen_backward(dtype, p, small_query_blocks, device):
    B, T, H, D, seed = 3, 37, 2, 64, 8
    torch.manual_seed(22)
    x = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)
    mask = pad_mask([37, 0, 21], T, device)
    packed, _, cu, max_len = unpad_input(x * mask[:, :, None, None, None], mask)
    xv = packed.detach().requires_grad_()
    out = fused_attention_varlen(*xv.unbind(1), cu, max_len, p, seed=seed)
    dout = torch.randn_like(out)
    (g,) = _grads(out, (xv,), dout)
    _check_dq_form(small_query_blocks, dtype, D)
    keep = attention_dropout_mask_varlen(seed, cu, H, max_len, p) if p else None
    x64 = packed.detach().double().requires_grad_()
    (g64,) = _grads(attention_varlen_ref(*x64.unbind(1), cu, max_len, p, dropout_mask=keep), (x64,), dout)
    xt = packed.detach().clone().requires_grad_()
    (gt,) = _grads(attention_varlen_ref(*xt.unbind(1), cu, max_len, p, dropout_mask=keep, upcast=False), (xt,), dout)
    assert_within_torch_error(g, g64, gt, atol=ATOL[dtype], name=f"varlen dqkv (16-row query blocks, p={p})")
