"""Fused attention with a custom `softmax_scale`, forward AND backward, padded and varlen, against float64.

Only the public functions (`fused_attention`, `fused_attention_varlen`) are called, and the float64 reference
is written out here (not `kernels.attention.attention_ref`), so a kernel or launcher that ignores
`softmax_scale` anywhere — the forward, the backward's recomputed probabilities, or dS's scale in dQ/dK —
fails. The scales are far from the default 1/√d (2.6× and 0.35× of it), so using 1/√d is a large error.

Also: the padded and varlen layouts of one batch (T == max_seqlen, same seed) do the same arithmetic on the
real tokens — padded keys add exact zeros to the online softmax, padded query rows get a zero dO and so add
exact zeros to dK/dV — so through the interpreter (one tile for every launch) they agree bit for bit.

Tolerance rule (tests/helpers.py): kernel error ≤ 2 × the error of the same reference run in the kernel's
dtype, + a small atol.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels._attention_dropout import attention_dropout_mask, attention_dropout_mask_varlen
from kernels._common import interpreter_on
from kernels.attention import fused_attention, fused_attention_varlen
from kernels.padding import pad_input, unpad_input
from tests.helpers import assert_within_torch_error, launched, pad_mask

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
H, D = 2, 32
LENGTHS = [37, 20, 0]  # a full row, a padded row, a fully padded row
T = 37


def attention64(q, k, v, keep_key, scale, keep=None, p=0.0):
    """softmax(q·kᵀ·scale) over real keys (rows with none: zeros), dropout with keep-mask `keep`, ·v.
    q, k, v [B, T, h, d]; keep_key bool [B, T]; keep bool [B, h, T, T]; computed in q's dtype."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, h, Tq, Tk)
    s = s.masked_fill(~keep_key[:, None, None, :], float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no real key is all -inf: NaN -> 0
    if p:
        probs = probs * keep.to(probs.dtype) / (1.0 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, Tq, h, d)


def _inputs(dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(len(LENGTHS), T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return q, k, v, dout


def _value_and_grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize(
    "dtype, scale_factor, p",
    [
        (torch.float32, 2.6, 0.0),
        (torch.float32, 0.35, 0.2),  # with dropout: backward regenerates the mask and rescales
        (torch.float16, 2.6, 0.1),
    ],
)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_custom_scale_forward_and_backward(device, dtype, scale_factor, p, layout):
    scale = scale_factor / math.sqrt(D)
    seed = 4321
    q, k, v, dout = _inputs(dtype, device, seed=int(scale_factor * 10) + len(layout))
    mask = pad_mask(LENGTHS, T, device)  # (B, T)
    B = len(LENGTHS)
    if layout == "padded":
        out, grads = _value_and_grads(lambda *t: fused_attention(*t, mask, p, softmax_scale=scale, seed=seed),
                                      (q, k, v), dout)
        keep = attention_dropout_mask(seed, B, H, T, T, p, device) if p else None
        refs = [_value_and_grads(lambda *t: attention64(*t, mask, scale, keep, p), [x.to(dt) for x in (q, k, v)],
                                 dout.to(dt)) for dt in (torch.float64, dtype)]
        real = mask[:, :, None, None]  # compare real query rows (padded rows attend over real keys too)
        pick = lambda t: t * real  # noqa: E731
    else:
        packed, indices, cu, max_seqlen = unpad_input(torch.stack([q, k, v, dout], 2), mask)  # (N, 4, h, d)
        qv, kv, vv, dout_v = packed.unbind(1)
        out, grads = _value_and_grads(
            lambda *t: fused_attention_varlen(*t, cu, max_seqlen, p, softmax_scale=scale, seed=seed),
            (qv, kv, vv), dout_v)
        keep = attention_dropout_mask_varlen(seed, cu, H, max_seqlen, p) if p else None
        # The reference in padded form on zero-padded inputs, unpadded: padded rows and keys play no part.
        pad = lambda t: pad_input(t, indices, B, max_seqlen)  # noqa: E731
        unpad = lambda t: t.reshape(B * max_seqlen, H, D).index_select(0, indices)  # noqa: E731
        refs = []
        for dt in (torch.float64, dtype):
            o, gs = _value_and_grads(lambda *t: unpad(attention64(*[pad(x) for x in t], mask, scale, keep, p)),
                                     [x.to(dt) for x in (qv, kv, vv)], dout_v.to(dt))
            refs.append((o, gs))
        pick = lambda t: t  # noqa: E731
        assert out.shape == qv.shape
    (out64, grads64), (out_t, grads_t) = refs
    assert launched("kernels.attention"), "the Triton attention kernels did not run"
    assert_within_torch_error(pick(out), pick(out64), pick(out_t), atol=ATOL[dtype], name="out")
    for name, g, g64, g_t in zip(("dq", "dk", "dv"), grads, grads64, grads_t, strict=True):
        assert torch.isfinite(g).all(), name
        assert_within_torch_error(pick(g), pick(g64), pick(g_t), atol=ATOL[dtype], name=name)
    if layout == "padded":  # the fully padded row: zeros, forward and backward
        assert out[2].abs().max().item() == 0.0
        assert all(g[2].abs().max().item() == 0.0 for g in grads)


@pytest.mark.parametrize("dtype, p", [(torch.float32, 0.0), (torch.float16, 0.15)])
def test_padded_and_varlen_layouts_agree_exactly(device, dtype, p):
    """Same batch, seed and scale, T == max_seqlen: identical arithmetic on the real tokens, forward and
    backward (see the module docstring). Bitwise through the interpreter, whose launches all use one tile;
    on a GPU the autotuner may pick other tiles per layout (another summation order): within rounding there."""
    scale, seed = 0.29, 77
    mask = pad_mask(LENGTHS, T, device)
    B = len(LENGTHS)
    q, k, v, dout = _inputs(dtype, device, seed=5)
    q, k, v, dout = (t * mask[:, :, None, None] for t in (q, k, v, dout))  # zeros at padding, as after pad_input
    packed, indices, cu, max_seqlen = unpad_input(torch.stack([q, k, v, dout], 2), mask)
    qv, kv, vv, dout_v = packed.unbind(1)
    out_p, grads_p = _value_and_grads(lambda *t: fused_attention(*t, mask, p, softmax_scale=scale, seed=seed),
                                      (q, k, v), dout)
    out_v, grads_v = _value_and_grads(
        lambda *t: fused_attention_varlen(*t, cu, max_seqlen, p, softmax_scale=scale, seed=seed), (qv, kv, vv), dout_v)
    real = mask[:, :, None, None]
    pairs = [("out", out_p, out_v)] + [(n, a, b) for n, a, b in zip(("dq", "dk", "dv"), grads_p, grads_v, strict=True)]
    for name, padded, varlen in pairs:
        as_padded = pad_input(varlen, indices, B, T)  # (B, T, h, d), zeros at padding
        if interpreter_on() and not padded.is_cuda:
            assert torch.equal(padded * real, as_padded), f"{name}: padded and varlen layouts differ"
        else:
            torch.testing.assert_close(padded * real, as_padded, rtol=0, atol=ATOL[dtype])
    # ... and the scale really mattered: the default scale gives another output.
    default = fused_attention(q, k, v, mask, p, seed=seed)
    assert (default - out_p)[mask].abs().max().item() > 1e-2
