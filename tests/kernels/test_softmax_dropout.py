"""Tests for kernels.softmax_dropout: the materialised scaled + masked softmax with dropout.

Forward and dscores against a float64 reference fed the kernel's keep-mask (`attention_dropout_mask`),
under the rule of tests/helpers.py (≤ 2 × same-dtype PyTorch error + small atol). Interpreter on CPU for
fp32 / fp16; bf16 on GPU only.
"""

from __future__ import annotations

import pytest
import torch

import kernels._common as common
from kernels.softmax_dropout import (
    attention_dropout_mask,
    scaled_masked_softmax_dropout,
    scaled_masked_softmax_dropout_ref,
)
from tests.helpers import assert_within_torch_error, pad_mask

ATOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _mask(kind: str, lengths: list[int], Tk: int, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = pad_mask(lengths, Tk, device)
    if kind == "additive":  # BERT's extended mask: 0 for real tokens, -10000 for padding
        return (~mask).float()[:, None, None, :] * -10000.0
    return mask


@pytest.mark.parametrize(
    "B, H, Tq, Tk, dtype, p, kind, strided",
    [
        (2, 2, 37, 37, torch.float32, 0.0, "bool", False),
        (3, 3, 37, 37, torch.float16, 0.2, "additive", True),  # [B, T, h, T] buffer viewed as [B, h, T, T]
        (2, 2, 1, 1, torch.float32, 0.1, "bool", False),  # T = 1
        (2, 2, 129, 129, torch.float16, 0.1, "bool", False),
        (2, 2, 20, 129, torch.float32, 0.3, "none", True),
    ],
)
def test_matches_reference(B, H, Tq, Tk, dtype, p, kind, strided, device):
    torch.manual_seed(0)
    seed = 31
    lengths = [Tk] + [max(0, Tk - 13 * i) for i in range(1, B - 1)] + [0]  # last row fully padded
    mask = _mask(kind, lengths[:B], Tk, device)
    if strided:
        base = (3 * torch.randn(B, Tq, H, Tk, device=device)).to(dtype).requires_grad_()
        scores = base.permute(0, 2, 1, 3)  # (B, h, Tq, Tk), last dim contiguous only
    else:
        base = (3 * torch.randn(B, H, Tq, Tk, device=device)).to(dtype).requires_grad_()
        scores = base
    scale = 0.37
    y = scaled_masked_softmax_dropout(scores, mask, scale, p, seed=seed)
    assert y.dtype == dtype and y.shape == (B, H, Tq, Tk) and y.is_contiguous()
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, base, dy)

    keep = attention_dropout_mask(seed, B, H, Tq, Tk, p, device)
    base64 = base.detach().double().requires_grad_()
    s64 = base64.permute(0, 2, 1, 3) if strided else base64
    ref64 = scaled_masked_softmax_dropout_ref(s64, mask, scale, p, dropout_mask=keep)
    (g64,) = torch.autograd.grad(ref64, base64, dy.double())
    base_t = base.detach().clone().requires_grad_()
    s_t = base_t.permute(0, 2, 1, 3) if strided else base_t
    ref_t = scaled_masked_softmax_dropout_ref(s_t, mask, scale, p, dropout_mask=keep)
    (gt,) = torch.autograd.grad(ref_t, base_t, dy)

    assert_within_torch_error(y, ref64, ref_t, atol=ATOL[dtype], name="probs")
    assert_within_torch_error(g, g64, gt, atol=ATOL[dtype], name="dscores")
    if kind != "none":
        assert y[-1].abs().max().item() == 0.0 and g[-1].abs().max().item() == 0.0  # fully padded row


def test_dropout_pattern_rate_and_seeds(device):
    B, H, T, p = 2, 4, 48, 0.25
    torch.manual_seed(1)
    scores = torch.randn(B, H, T, T, device=device)
    y = scaled_masked_softmax_dropout(scores, None, 1.0, p, seed=4242)
    keep = attention_dropout_mask(4242, B, H, T, T, p, device)
    assert torch.equal(y != 0, keep)  # every probability is > 0 without a mask: zeros are the drops
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) <= 5 * (p * (1 - p) / keep.numel()) ** 0.5
    # kept entries are rescaled by 1 / (1 - p): rows of y sum to 1/(1-p) · (kept probability mass)
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(y, probs * keep / (1 - p), atol=1e-6, rtol=1e-5)

    assert torch.equal(y, scaled_masked_softmax_dropout(scores, None, 1.0, p, seed=4242))
    assert not torch.equal(y, scaled_masked_softmax_dropout(scores, None, 1.0, p, seed=4243))
    torch.manual_seed(9)
    a = scaled_masked_softmax_dropout(scores, None, 1.0, p)
    b = scaled_masked_softmax_dropout(scores, None, 1.0, p)
    torch.manual_seed(9)
    assert torch.equal(a, scaled_masked_softmax_dropout(scores, None, 1.0, p)) and not torch.equal(a, b)


def test_reference_path_without_interpreter_honours_dropout(monkeypatch, device):
    if device != "cpu":
        pytest.skip("the reference path is the CPU fallback")
    torch.manual_seed(2)
    scores = torch.randn(2, 2, 9, 9)
    mask = pad_mask([9, 0], 9)
    kernel = scaled_masked_softmax_dropout(scores, mask, 0.5, 0.3, seed=6)
    monkeypatch.setattr(common, "interpreter_on", lambda: False)
    torch.testing.assert_close(scaled_masked_softmax_dropout(scores, mask, 0.5, 0.3, seed=6), kernel)


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(3)
    scores = torch.randn(2, 2, 7, 7, device=device, requires_grad=True)
    mask = pad_mask([7, 3], 7, device)

    def fn(s):
        return scaled_masked_softmax_dropout(s, mask, 0.5, 0.2, seed=17) * 3.0

    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(scores)
    (g_c,) = torch.autograd.grad(out_c.sum(), scores)
    out_e = fn(scores)
    (g_e,) = torch.autograd.grad(out_e.sum(), scores)
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)


def test_bad_arguments_raise_value_error(device):
    s = torch.randn(2, 2, 5, 5, device=device)
    ones = lambda *shape, dtype: torch.ones(*shape, dtype=dtype, device=device)
    bad = [
        ("must be a torch.Tensor", lambda: scaled_masked_softmax_dropout(s.tolist(), None, 1.0)),
        ("4 dimensions", lambda: scaled_masked_softmax_dropout(s[0], None, 1.0)),
        ("dtype", lambda: scaled_masked_softmax_dropout(s.long(), None, 1.0)),
        ("contiguous last dim", lambda: scaled_masked_softmax_dropout(s.transpose(2, 3), None, 1.0)),
        ("shape \\[B, Tk\\]", lambda: scaled_masked_softmax_dropout(s, ones(2, 4, dtype=torch.bool), 1.0)),
        ("\\[B, 1, 1, Tk\\]", lambda: scaled_masked_softmax_dropout(s, torch.zeros(2, 5, device=device), 1.0)),
        ("bool \\[B, Tk\\] or float", lambda: scaled_masked_softmax_dropout(s, ones(2, 5, dtype=torch.int64), 1.0)),
        ("scale", lambda: scaled_masked_softmax_dropout(s, None, float("nan"))),
        ("scale", lambda: scaled_masked_softmax_dropout(s, None, None)),
        ("dropout_p", lambda: scaled_masked_softmax_dropout(s, None, 1.0, 1.5)),
        ("seed", lambda: scaled_masked_softmax_dropout(s, None, 1.0, 0.1, seed=1.5)),
    ]  # fmt: skip
    if device == "cpu":
        meta_mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
        bad.append(("is on", lambda: scaled_masked_softmax_dropout(s, meta_mask, 1.0)))
    for match, call in bad:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bf16_realistic(dtype):
    B, H, T = 4, 12, 128
    mask = pad_mask([128, 77, 5, 0], T, "cuda")
    torch.manual_seed(0)
    scores = (4 * torch.randn(B, H, T, T, device="cuda")).to(dtype).requires_grad_()
    y = scaled_masked_softmax_dropout(scores, mask, 0.125, 0.1, seed=1)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, scores, dy)
    keep = attention_dropout_mask(1, B, H, T, T, 0.1, "cuda")
    s64 = scores.detach().double().requires_grad_()
    ref64 = scaled_masked_softmax_dropout_ref(s64, mask, 0.125, 0.1, dropout_mask=keep)
    (g64,) = torch.autograd.grad(ref64, s64, dy.double())
    st = scores.detach().clone().requires_grad_()
    ref_t = scaled_masked_softmax_dropout_ref(st, mask, 0.125, 0.1, dropout_mask=keep)
    (gt,) = torch.autograd.grad(ref_t, st, dy)
    assert_within_torch_error(y, ref64, ref_t, atol=ATOL[dtype], name="probs")
    assert_within_torch_error(g, g64, gt, atol=ATOL[dtype], name="dscores")
