"""Tests for kernels.attention: fused (padded) and varlen flash attention with key padding and dropout.

Forward and dq/dk/dv are compared with a float64 reference fed the kernel's own keep-mask
(`attention_dropout_mask`), under the rule of tests/helpers.py: kernel error ≤ 2 × the error of the same
computation done by PyTorch in the kernel's dtype, + a small atol. On CPU the kernels run through
Triton's interpreter (fp32 / fp16, small odd shapes); bf16 and torch.compile with inductor are GPU tests.
"""

from __future__ import annotations

import pytest
import torch

import kernels._common as common
from kernels.attention import (
    attention_dropout_mask,
    attention_dropout_mask_varlen,
    attention_ref,
    attention_varlen_ref,
    fused_attention,
    fused_attention_varlen,
    pad_input,
    unpad_input,
)
from kernels.softmax_dropout import scaled_masked_softmax_dropout
from tests.helpers import assert_within_torch_error, pad_mask

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


def _qkv(B, Tq, Tk, H, D, dtype, device, packed):
    """q, k, v leaves; `packed`: views into one [B, T, 3, h, d] buffer (non-trivial strides, no copy)."""
    if packed:
        assert Tq == Tk
        qkv = torch.randn(B, Tq, 3, H, D, device=device, dtype=dtype, requires_grad=True)
        return qkv, qkv.unbind(2)
    q = torch.randn(B, Tq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Tk, H, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Tk, H, D, device=device, dtype=dtype, requires_grad=True)
    return (q, k, v), (q, k, v)


def _check_against_reference(B, Tq, Tk, H, D, dtype, dropout_p, lengths, packed, device, seed=1234):
    torch.manual_seed(seed)
    leaves, (q, k, v) = _qkv(B, Tq, Tk, H, D, dtype, device, packed)
    leaves = leaves if isinstance(leaves, tuple) else (leaves,)
    mask = pad_mask(lengths, Tk, device) if lengths is not None else None
    out = fused_attention(q, k, v, mask, dropout_p, seed=seed)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == (B, Tq, H, D)
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)

    keep = attention_dropout_mask(seed, B, H, Tq, Tk, dropout_p, device)
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    qkv64 = leaves64[0].unbind(2) if packed else leaves64
    ref64 = attention_ref(*qkv64, mask, dropout_p, dropout_mask=keep)
    grads64 = _grads(ref64, leaves64, dout)
    leaves_t = tuple(t.detach().clone().requires_grad_() for t in leaves)
    qkv_t = leaves_t[0].unbind(2) if packed else leaves_t
    ref_t = attention_ref(*qkv_t, mask, dropout_p, dropout_mask=keep, upcast=False)
    grads_t = _grads(ref_t, leaves_t, dout)

    atol = ATOL[dtype]
    assert_within_torch_error(out, ref64, ref_t, atol=atol, name="out")
    names = ("dqkv",) if packed else ("dq", "dk", "dv")
    for name, g, g64, gt in zip(names, grads, grads64, grads_t, strict=True):
        assert_within_torch_error(g, g64, gt, atol=atol, name=name)
    if lengths is not None and 0 in lengths:  # the fully padded batch row gives zeros, not NaN
        b = lengths.index(0)
        assert out[b].abs().max().item() == 0.0
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "B, Tq, Tk, H, D, dtype, dropout_p, lengths, packed",
    [
        (2, 37, 37, 2, 16, torch.float32, 0.0, [37, 0], True),  # QKV views, fully padded row
        (3, 37, 37, 2, 32, torch.float16, 0.2, [37, 11, 0], False),
        (2, 129, 129, 1, 64, torch.float16, 0.1, [100, 0], True),  # several blocks each way, tails
        (2, 1, 1, 2, 64, torch.float32, 0.1, [1, 0], False),  # T = 1
        (2, 23, 40, 2, 48, torch.float32, 0.0, None, False),  # cross lengths, head dim padded to 64, no mask
    ],
)
def test_fused_attention_matches_reference(B, Tq, Tk, H, D, dtype, dropout_p, lengths, packed, device):
    _check_against_reference(B, Tq, Tk, H, D, dtype, dropout_p, lengths, packed, device)


def test_additive_float_mask_equals_bool_mask(device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 19, 2, 16, device=device) for _ in range(3))
    mask = pad_mask([19, 5], 19, device)
    additive = (~mask).float()[:, None, None, :] * -10000.0  # (B, 1, 1, T) BERT-style
    assert torch.equal(fused_attention(q, k, v, mask, 0.1, seed=3), fused_attention(q, k, v, additive, 0.1, seed=3))


def _varlen_batch(B, T, H, D, dtype, lengths, device):
    torch.manual_seed(7)
    x = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)
    mask = pad_mask(lengths, T, device)
    x = x * mask[:, :, None, None, None]  # padded positions hold zeros, as after pad_input
    return x, mask


def test_varlen_matches_reference_and_padded_layout(device):
    """Same batch, same seed, T == max_seqlen: varlen and padded drop the same entries and agree."""
    B, T, H, D, dtype, p, seed = 3, 37, 2, 32, torch.float16, 0.25, 99
    lengths = [37, 0, 20]  # a zero-length sequence in the middle
    x, mask = _varlen_batch(B, T, H, D, dtype, lengths, device)
    x_packed, indices, cu_seqlens, max_seqlen = unpad_input(x, mask)
    assert cu_seqlens.tolist() == [0, 37, 37, 57] and max_seqlen == 37 and cu_seqlens.dtype == torch.int32

    xv = x_packed.detach().requires_grad_()
    out_v = fused_attention_varlen(*xv.unbind(1), cu_seqlens, max_seqlen, p, seed=seed)
    assert out_v.shape == (57, H, D) and out_v.is_contiguous()
    dout_v = torch.randn_like(out_v)
    (g_v,) = _grads(out_v, (xv,), dout_v)

    keep = attention_dropout_mask_varlen(seed, cu_seqlens, H, max_seqlen, p)
    x64 = x_packed.detach().double().requires_grad_()
    ref64 = attention_varlen_ref(*x64.unbind(1), cu_seqlens, max_seqlen, p, dropout_mask=keep)
    (g64,) = _grads(ref64, (x64,), dout_v)
    xt = x_packed.detach().clone().requires_grad_()
    ref_t = attention_varlen_ref(*xt.unbind(1), cu_seqlens, max_seqlen, p, dropout_mask=keep, upcast=False)
    (gt,) = _grads(ref_t, (xt,), dout_v)
    assert_within_torch_error(out_v, ref64, ref_t, atol=ATOL[dtype], name="varlen out")
    assert_within_torch_error(g_v, g64, gt, atol=ATOL[dtype], name="varlen dqkv")

    xp = x.detach().requires_grad_()
    out_p = fused_attention(*xp.unbind(2), mask, p, seed=seed)
    (g_p,) = _grads(out_p, (xp,), pad_input(dout_v, indices, B, T))
    real = mask[:, :, None, None]
    # Same arithmetic on the real tokens (padded keys add exact zeros); slack for fp16 rounding in case
    # the two layouts run with different block configs (GPU autotuning).
    torch.testing.assert_close(pad_input(out_v, indices, B, T), out_p * real, atol=2e-3, rtol=0)
    torch.testing.assert_close(pad_input(g_v, indices, B, T), g_p * real[..., None], atol=2e-3, rtol=0)


def test_pad_unpad_roundtrip(device):
    x = torch.randn(3, 9, 2, 4, device=device, requires_grad=True)
    mask = pad_mask([9, 0, 4], 9, device)
    packed, indices, cu, max_len = unpad_input(x, mask)
    assert packed.shape == (13, 2, 4) and cu.tolist() == [0, 9, 9, 13] and max_len == 9
    back = pad_input(packed, indices, 3, 9)
    torch.testing.assert_close(back, x * mask[:, :, None, None], atol=0, rtol=0)
    (g,) = torch.autograd.grad(back.sum(), x)
    torch.testing.assert_close(g, mask[:, :, None, None].expand_as(x).float(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="mask"):
        unpad_input(x, mask[:, :5])


def test_dropout_mask_is_exactly_the_helpers_and_rate_is_binomial(device):
    """q = k = 0 gives uniform probabilities 1/T; with V = identity (d = T) the output row i is
    keep[i, :] / ((1 - p) · T): the kernel's keep-mask, read back exactly."""
    B, H, T, p, seed = 2, 2, 32, 0.3, 2024
    q = torch.zeros(B, T, H, T, device=device)
    v = torch.eye(T, device=device)[None, :, None, :].expand(B, T, H, T).contiguous()
    out = fused_attention(q, q, v, None, p, softmax_scale=1.0, seed=seed)
    kernel_keep = (out * ((1 - p) * T)).permute(0, 2, 1, 3)  # (B, h, Tq, Tk) of 0 / 1
    keep = attention_dropout_mask(seed, B, H, T, T, p, device)
    torch.testing.assert_close(kernel_keep, keep.float(), atol=1e-5, rtol=0)
    n = keep.numel()
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) <= 5 * (p * (1 - p) / n) ** 0.5, f"dropped fraction {dropped} for p={p}, n={n}"

    big = attention_dropout_mask(5, 2, 4, 48, 48, 0.1, device)  # the helper itself, larger sample
    dropped = 1.0 - big.float().mean().item()
    assert abs(dropped - 0.1) <= 5 * (0.1 * 0.9 / big.numel()) ** 0.5
    # different (batch, head) matrices draw different masks
    assert not torch.equal(big[0, 0], big[0, 1]) and not torch.equal(big[0, 0], big[1, 0])


def test_seed_determinism_and_manual_seed(device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 17, 2, 16, device=device) for _ in range(3))
    mask = pad_mask([17, 9], 17, device)
    a = fused_attention(q, k, v, mask, 0.3, seed=11)
    assert torch.equal(a, fused_attention(q, k, v, mask, 0.3, seed=11))
    assert not torch.equal(a, fused_attention(q, k, v, mask, 0.3, seed=12))
    torch.manual_seed(5)
    r1 = fused_attention(q, k, v, mask, 0.3)
    r2 = fused_attention(q, k, v, mask, 0.3)
    torch.manual_seed(5)
    assert torch.equal(r1, fused_attention(q, k, v, mask, 0.3))
    assert not torch.equal(r1, r2)


def test_consistent_with_softmax_dropout(device):
    """fused_attention and the materialised softmax path drop the same entries for one seed."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 21, 2, 16, device=device) for _ in range(3))
    mask = pad_mask([21, 6], 21, device)
    fused = fused_attention(q, k, v, mask, 0.4, seed=77)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # (B, h, Tq, Tk)
    probs = scaled_masked_softmax_dropout(scores, mask, 0.25, 0.4, seed=77)
    torch.testing.assert_close(fused, torch.einsum("bhqk,bkhd->bqhd", probs, v), atol=1e-5, rtol=1e-5)


def test_reference_path_without_interpreter_honours_dropout(monkeypatch, device):
    """CPU tensors without TRITON_INTERPRET take the PyTorch reference with the same keep-mask."""
    if device != "cpu":
        pytest.skip("the reference path is the CPU fallback")
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 13, 2, 16, requires_grad=True) for _ in range(3))
    mask = pad_mask([13, 0], 13)
    kernel = fused_attention(q, k, v, mask, 0.3, seed=8)
    x = torch.randn(13, 2, 16)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    kernel_v = fused_attention_varlen(x, x, x, cu, 7, 0.3, seed=8)
    monkeypatch.setattr(common, "interpreter_on", lambda: False)
    ref_path = fused_attention(q, k, v, mask, 0.3, seed=8)
    assert ref_path.grad_fn is not None and "Flash" not in type(ref_path.grad_fn).__name__
    torch.testing.assert_close(ref_path, kernel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_attention_varlen(x, x, x, cu, 7, 0.3, seed=8), kernel_v, atol=1e-5, rtol=1e-5)


def test_bf16_on_interpreter_takes_reference_path_with_warning(device):
    if device != "cpu":
        pytest.skip("interpreter only")
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 9, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    mask = pad_mask([9, 3], 9)
    with pytest.warns(UserWarning, match="bf16"):
        out = fused_attention(q, k, v, mask, 0.2, seed=1)
    keep = attention_dropout_mask(1, 2, 2, 9, 9, 0.2)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask, 0.2, dropout_mask=keep), atol=0, rtol=0)


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 11, 2, 16, device=device, requires_grad=True) for _ in range(3))
    mask = pad_mask([11, 4], 11, device)

    def fn(q, k, v):
        return fused_attention(q, k, v, mask, 0.2, seed=21) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    out_e = fn(q, k, v)
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, atol=0, rtol=0)

    x = torch.randn(13, 3, 2, 16, device=device, requires_grad=True)  # packed QKV of lengths 6, 0, 7
    cu = torch.tensor([0, 6, 6, 13], dtype=torch.int32, device=device)

    def fn_varlen(x):
        return fused_attention_varlen(*x.unbind(1), cu, 8, 0.2)  # seed drawn from torch's generator

    torch.manual_seed(5)
    out_c = torch.compile(fn_varlen, fullgraph=True, backend="aot_eager")(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    torch.manual_seed(5)
    out_e = fn_varlen(x)
    (g_e,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)


def _bad_calls(device):
    q = torch.randn(2, 5, 2, 16, device=device)
    packed = torch.randn(7, 2, 16, device=device)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    return [
        ("must be a torch.Tensor", lambda: fused_attention(q.tolist(), q, q)),
        ("4 dimensions", lambda: fused_attention(q[0], q[0], q[0])),
        ("dtype", lambda: fused_attention(q.long(), q.long(), q.long())),
        ("share one dtype", lambda: fused_attention(q, q.half(), q.half())),
        ("contiguous last dim", lambda: fused_attention(q.transpose(1, 3).contiguous().transpose(1, 3), q, q)),
        ("same shape", lambda: fused_attention(q, q, q[:, :4])),
        ("do not match", lambda: fused_attention(q, q[:1], q[:1])),
        ("head dim 8", lambda: fused_attention(q[..., :8], q[..., :8], q[..., :8])),
        ("head dim 160", lambda: fused_attention(*(torch.randn(1, 3, 1, 160, device=device),) * 3)),
        (
            "key_padding_mask must have shape",
            lambda: fused_attention(q, q, q, torch.ones(2, 4, dtype=torch.bool, device=device)),
        ),
        ("additive key_padding_mask", lambda: fused_attention(q, q, q, torch.zeros(2, 5, device=device))),
        (
            "bool \\[B, Tk\\] or float",
            lambda: fused_attention(q, q, q, torch.ones(2, 5, dtype=torch.int32, device=device)),
        ),
        ("dropout_p", lambda: fused_attention(q, q, q, dropout_p=1.0)),
        ("dropout_p", lambda: fused_attention(q, q, q, dropout_p=-0.1)),
        ("softmax_scale", lambda: fused_attention(q, q, q, softmax_scale="x")),
        ("seed", lambda: fused_attention(q, q, q, seed=-1)),
        ("seed", lambda: fused_attention(q, q, q, seed=2**31)),
        ("3 dimensions", lambda: fused_attention_varlen(q, q, q, cu, 4)),
        ("int32", lambda: fused_attention_varlen(packed, packed, packed, cu.long(), 4)),
        ("B\\+1 >= 2", lambda: fused_attention_varlen(packed, packed, packed, cu[:1], 4)),
        ("1 dimensions", lambda: fused_attention_varlen(packed, packed, packed, cu[None], 4)),
        ("non-decreasing", lambda: fused_attention_varlen(packed, packed, packed, cu[[0, 2, 1]], 7)),
        ("cu_seqlens\\[0\\]", lambda: fused_attention_varlen(packed, packed, packed, cu + 1, 7)),
        ("number of packed tokens", lambda: fused_attention_varlen(*(packed[:6],) * 3, cu, 4)),
        ("> max_seqlen", lambda: fused_attention_varlen(packed, packed, packed, cu, 3)),
        ("max_seqlen", lambda: fused_attention_varlen(packed, packed, packed, cu, 4.0)),
        ("too long for dropout", lambda: fused_attention_varlen(packed, packed, packed, cu, 50000, 0.1)),
    ]


def test_bad_arguments_raise_value_error(device):
    for match, call in _bad_calls(device):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.no_kernel("argument checks raise before any launch")
def test_cu_seqlens_short_of_the_packed_tokens_is_refused(device):
    """cu_seqlens[-1] < total: the trailing tokens belong to no sequence, their outputs would be uninitialised
    memory. (`test_bad_arguments_raise_value_error` covers cu_seqlens[-1] > total.)"""
    packed = torch.randn(9, 2, 16, device=device)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 7 must equal the number of packed tokens 9"):
        fused_attention_varlen(packed, packed, packed, cu, 4)


def test_float_01_mask_is_refused_with_the_accepted_conventions(device):
    """A float 0/1 mask [B, 1, 1, T] (1 = real token) used to be read as additive, i.e. as "no padding"."""
    q = torch.randn(2, 5, 2, 16, device=device)
    zero_one = pad_mask([5, 2], 5, device).float()[:, None, None, :]  # (B, 1, 1, T): 1 real, 0 padding
    with pytest.raises(ValueError, match=r"0/1 float mask.*bool \[B, Tk\].*additive float \[B, 1, 1, Tk\]"):
        fused_attention(q, q, q, zero_one)
    with pytest.raises(ValueError, match="0/1 float mask"):
        scaled_masked_softmax_dropout(torch.randn(2, 2, 5, 5, device=device), zero_one, 0.25)
    additive = (zero_one - 1.0) * 10000.0  # the same padding as an additive mask: accepted, same result as bool
    mask = pad_mask([5, 2], 5, device)
    assert torch.equal(fused_attention(q, q, q, additive, 0.1, seed=2), fused_attention(q, q, q, mask, 0.1, seed=2))
    assert torch.isfinite(fused_attention(q, q, q, torch.zeros_like(zero_one))).all()  # all-zero additive: no padding


# ------------------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter cannot do bf16 tl.dot), realistic shapes, inductor
# ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, T, H, D, dtype, p",
    [
        (4, 128, 12, 64, torch.bfloat16, 0.1),
        (3, 200, 4, 32, torch.bfloat16, 0.0),
        (2, 512, 4, 128, torch.float16, 0.1),
        (3, 333, 4, 128, torch.bfloat16, 0.1),  # the one-pass backward's 16/32-row tiles (dQ transposed)
        (2, 77, 4, 80, torch.float32, 0.1),
    ],  # fmt: skip
)
def test_gpu_matches_reference(B, T, H, D, dtype, p):
    lengths = [T] + [max(0, T - 37 * i) for i in range(1, B - 1)] + [0]
    _check_against_reference(B, T, T, H, D, dtype, p, lengths[:B], True, "cuda")


@pytest.mark.gpu
def test_gpu_varlen_matches_padded_bf16():
    B, T, H, D, p = 4, 128, 12, 64, 0.1
    x, mask = _varlen_batch(B, T, H, D, torch.bfloat16, [128, 70, 0, 5], "cuda")
    x_packed, indices, cu, _ = unpad_input(x, mask)
    out_v = fused_attention_varlen(*x_packed.unbind(1), cu, T, p, seed=3)
    out_p = fused_attention(*x.unbind(2), mask, p, seed=3)
    torch.testing.assert_close(pad_input(out_v, indices, B, T), out_p * mask[:, :, None, None], atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_inductor_fullgraph():
    q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = pad_mask([64, 30], 64, "cuda")

    def fn(q, k, v):
        return fused_attention(q, k, v, mask, 0.1, seed=5).float().square().sum()

    loss_c = torch.compile(fn, fullgraph=True)(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = fn(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)
