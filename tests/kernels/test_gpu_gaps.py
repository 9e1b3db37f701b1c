"""What only a GPU can check, that the other GPU tests did not: varlen attention gradients in bf16 and fp16 at real
sizes, the deterministic (two-pass) backward compiled, the packed-QKV entry points the fused model uses (one QKV
GEMM into a [.., 3, h, d] buffer, attention on it, one dqkv buffer back), and the fused model in bf16 with dropout
against the reference fed the kernels' own keep-masks.

Every check is a helper run on CUDA in bf16 / fp16 (`gpu`-marked, skipped without CUDA) and, where the interpreter
can run it, on tiny fp32 shapes too: there it checks the test itself (a wrong reference or index would fail here,
not first in a GPU window). Tolerance rule of tests/helpers.py: the kernel's error against float64 at most k × the
error of the same computation by PyTorch in the kernel's dtype, plus a small atol; dropout compared through the
kernels' keep-mask helpers (`attention_dropout_mask`, `attention_dropout_mask_varlen`).
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import (
    attention_dropout_mask,
    attention_dropout_mask_varlen,
    attention_ref,
    attention_varlen_ref,
    fused_attention,
    fused_attention_qkvpacked,
    fused_attention_varlen,
    fused_attention_varlen_qkvpacked,
    unpad_input,
)
from kernels.qkv_projection import qkv_projection_packed, qkv_projection_packed_ref
from tests.helpers import assert_within_torch_error, pad_mask
from tests.kernels.test_attention import ATOL, _grads

GPU = pytest.mark.gpu


def _gpu(*values):
    return pytest.param(*values, marks=GPU)


def _reference_grads(fn, leaves, dout, dtype_same: bool):
    """(out, grads) of `fn` on copies of `leaves`: in float64 (dtype_same False) or in their own dtype."""
    xs = [t.detach().clone().double().requires_grad_() if not dtype_same else t.detach().clone().requires_grad_()
          for t in leaves]
    out = fn(*xs)
    return out, _grads(out, xs, dout)


def _check(name, out, grads, fn_ref, leaves, dout, dtype, k=2.0):
    """The kernel's output and gradients against `fn_ref(*leaves, upcast)` in float64 and in the kernel's dtype."""
    out64, g64 = _reference_grads(lambda *x: fn_ref(*x, True), leaves, dout, dtype_same=False)
    out_t, gt = _reference_grads(lambda *x: fn_ref(*x, False), leaves, dout, dtype_same=True)
    assert_within_torch_error(out, out64, out_t, k=k, atol=ATOL[dtype], name=f"{name} out")
    for i, (g, r64, rt) in enumerate(zip(grads, g64, gt, strict=True)):
        assert torch.isfinite(g).all(), f"{name} grad {i}"
        assert_within_torch_error(g, r64, rt, k=k, atol=ATOL[dtype], name=f"{name} grad {i}")


def _varlen(dtype, device, B, T, H, D, lengths, p, deterministic=False, seed=17):
    """Varlen attention on separate q, k, v leaves [total, h, d] against the reference fed its keep-mask; returns
    the gradients (dq, dk, dv)."""
    torch.manual_seed(seed)
    x = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)
    mask = pad_mask(lengths, T, device)
    packed, _, cu, max_len = unpad_input(x, mask)  # (total, 3, h, d)
    leaves = tuple(t.contiguous().requires_grad_() for t in packed.unbind(1))
    out = fused_attention_varlen(*leaves, cu, max_len, p, seed=seed, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    keep = attention_dropout_mask_varlen(seed, cu, H, max_len, p)
    ref = lambda q, k, v, upcast: attention_varlen_ref(q, k, v, cu, max_len, p, dropout_mask=keep, upcast=upcast)
    _check(f"varlen deterministic={deterministic}", out, grads, ref, leaves, dout, dtype)
    return grads


def _padded(dtype, device, B, T, H, D, lengths, p, deterministic=False, seed=23):
    """Padded attention with key padding against the reference fed its keep-mask; returns (dq, dk, dv)."""
    torch.manual_seed(seed)
    leaves = tuple(torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = pad_mask(lengths, T, device)
    out = fused_attention(*leaves, mask, p, seed=seed, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    keep = attention_dropout_mask(seed, B, H, T, T, p, device)
    ref = lambda q, k, v, upcast: attention_ref(q, k, v, mask, p, dropout_mask=keep, upcast=upcast)
    _check(f"padded deterministic={deterministic}", out, grads, ref, leaves, dout, dtype)
    return grads


@pytest.mark.parametrize(
    "dtype, B, T, H, D, lengths, p",
    [
        _gpu(torch.bfloat16, 4, 128, 12, 64, [128, 77, 0, 5], 0.1),  # BERT-base heads, a zero-length sequence
        _gpu(torch.bfloat16, 3, 333, 4, 128, [333, 200, 17], 0.1),  # d = 128: the transposed-dQ backward tiles
        _gpu(torch.float16, 2, 512, 12, 64, [512, 300], 0.1),
        _gpu(torch.float16, 3, 200, 4, 32, [200, 0, 99], 0.0),
        (torch.float32, 3, 13, 1, 16, [13, 0, 6], 0.25),  # the interpreter: a check of the test itself
    ],
)  # fmt: skip
def test_varlen_gradients(dtype, B, T, H, D, lengths, p, device):
    _varlen(dtype, device, B, T, H, D, lengths, p)


@pytest.mark.parametrize(
    "layout, dtype, B, T, H, D, lengths",
    [
        _gpu("padded", torch.bfloat16, 4, 128, 12, 64, [128, 90, 0, 33]),
        _gpu("varlen", torch.bfloat16, 4, 128, 12, 64, [128, 90, 0, 33]),
        _gpu("varlen", torch.float16, 2, 512, 12, 64, [512, 260]),
        ("padded", torch.float32, 2, 9, 1, 16, [9, 4]),
        ("varlen", torch.float32, 2, 9, 1, 16, [9, 4]),
    ],
)  # fmt: skip
def test_deterministic_backward_is_repeatable_and_matches_reference(layout, dtype, B, T, H, D, lengths, device):
    run = _padded if layout == "padded" else _varlen
    first = run(dtype, device, B, T, H, D, lengths, 0.1, deterministic=True)
    second = run(dtype, device, B, T, H, D, lengths, 0.1, deterministic=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "the deterministic backward must be bitwise repeatable"
    atomic = run(dtype, device, B, T, H, D, lengths, 0.1, deterministic=False)
    for a, b in zip(first, atomic, strict=True):  # same math, dQ summed in another order
        torch.testing.assert_close(a.float(), b.float(), atol=4 * ATOL[dtype], rtol=0)


def _qkv_entry(layout, dtype, device, B, T, H, D, lengths, p, seed=29):
    """The model's path: one QKV GEMM into a packed [.., 3, h, d] buffer (`qkv_projection_packed`), the packed
    attention entry point on it (`fused_attention_qkvpacked` / `fused_attention_varlen_qkvpacked`), gradients of
    x, W and b through the single dqkv buffer — against the same chain in plain PyTorch with the keep-mask."""
    torch.manual_seed(seed)
    hidden = H * D
    mask = pad_mask(lengths, T, device)
    x = torch.randn(B, T, hidden, device=device, dtype=dtype)
    if layout == "varlen":
        x, _, cu, max_len = unpad_input(x, mask)  # (N, hidden)
    leaves = (x.contiguous().requires_grad_(),
              (torch.randn(3 * hidden, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_(),
              (0.1 * torch.randn(3 * hidden, device=device)).to(dtype).requires_grad_())
    qkv = qkv_projection_packed(*leaves, H)
    if layout == "varlen":
        out = fused_attention_varlen_qkvpacked(qkv, cu, max_len, p, seed=seed)
        keep = attention_dropout_mask_varlen(seed, cu, H, max_len, p)

        def ref(x, w, b, upcast):
            return attention_varlen_ref(*qkv_projection_packed_ref(x, w, b, H).unbind(1), cu, max_len, p,
                                        dropout_mask=keep, upcast=upcast)
    else:
        out = fused_attention_qkvpacked(qkv, mask, p, seed=seed)
        keep = attention_dropout_mask(seed, B, H, T, T, p, device)

        def ref(x, w, b, upcast):
            return attention_ref(*qkv_projection_packed_ref(x, w, b, H).unbind(2), mask, p, dropout_mask=keep,
                                 upcast=upcast)
    dout = torch.randn_like(out)
    _check(f"packed qkv {layout}", out, _grads(out, leaves, dout), ref, leaves, dout, dtype, k=3.0)


@pytest.mark.parametrize(
    "layout, dtype, B, T, H, D, lengths",
    [
        _gpu("varlen", torch.bfloat16, 4, 128, 12, 64, [128, 77, 0, 5]),  # what the model runs with unpadding
        _gpu("padded", torch.bfloat16, 4, 128, 12, 64, [128, 77, 0, 5]),
        _gpu("varlen", torch.float16, 3, 200, 4, 32, [200, 0, 99]),
        ("varlen", torch.float32, 3, 13, 2, 16, [13, 0, 6]),
        ("padded", torch.float32, 2, 11, 2, 16, [11, 4]),
    ],
)  # fmt: skip
def test_packed_qkv_entry_points(layout, dtype, B, T, H, D, lengths, device):
    _qkv_entry(layout, dtype, device, B, T, H, D, lengths, 0.1)


@GPU
def test_fused_model_bf16_with_dropout_matches_reference_with_the_kernels_keep_masks(monkeypatch):
    """BERT-base width, 2 layers, bf16, dropout 0.1 everywhere: the fused model (compiled kernels, unpadded varlen
    attention, Philox dropout) against the bf16 and float64 references fed the exact keep-masks the kernels drew.
    The CPU fp32 run of the same helper is tests/fastbert/test_fused.py's dropout test."""
    from tests.fastbert.test_fused import assert_dropout_run_matches, run_with_the_kernels_keep_masks, tiny_config

    config = tiny_config(hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522,
                         max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    fused, ref, ref64, rows = run_with_the_kernels_keep_masks(monkeypatch, config, "cuda", torch.bfloat16,
                                                              lengths=[128, 77, 0, 127, 5, 64, 100, 1], T=128)
    assert_dropout_run_matches(fused, ref, ref64, rows, k=3.0, atol=1e-2, grad_atol=1e-3)
