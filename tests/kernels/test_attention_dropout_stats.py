"""Statistics of the attention dropout keep-mask (kernels._attention_dropout).

One 7-round Philox-4x32 call draws 8 16-bit values for rows {i, i + 8} × 4 adjacent key columns; t =
round(65536·p) is the threshold and 1 / (1 - t/65536) the exact rescale. The tests check, on large samples of the
bit-exact PyTorch mirror (`attention_dropout_mask`) and on the kernel's own mask read back through
`fused_attention` (Triton interpreter on CPU):
- the dropped fraction is within 5σ of t / 65536 (and t / 65536 within 2**-17 of p) for p = 0.1 and 0.5;
- the rescaled mask is unbiased: E[keep · keep_scale(p)] = 1, exactly in arithmetic and within 5σ empirically;
- no correlation between elements that share a call (the word pair (i, j), (i + 8, j), adjacent columns, the
  two ends of a call) and neighbouring rows; the number dropped among a call's 8 draws is Binomial(8, p);
- different heads, batches and seeds give uncorrelated masks.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels._attention_dropout import (
    DROPOUT_LANES,
    attention_dropout_mask,
    dropout_threshold,
    effective_dropout_p,
    keep_scale,
)
from kernels.attention import fused_attention

P_VALUES = (0.1, 0.5)

# Statistics of the PyTorch mirror of the keep-mask; the mirror equals the kernel's mask bit for bit
# (test_kernel_mask_rate_and_unbiased_output), which launches the kernel.
MIRROR_ONLY = pytest.mark.no_kernel("statistics of the PyTorch mirror of the keep-mask")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 0/1 samples."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def _bound(n: int) -> float:
    """5σ for the sample correlation of n independent pairs."""
    return 5.0 / math.sqrt(n)


@pytest.fixture(scope="module")
def masks() -> dict[float, torch.Tensor]:
    # (B, h, T, T) = (2, 4, 256, 256): 524288 draws per p, 65536 Philox calls
    return {p: attention_dropout_mask(20240607, 2, 4, 256, 256, p) for p in P_VALUES}


@MIRROR_ONLY
@pytest.mark.parametrize("p", P_VALUES)
def test_dropped_fraction_within_5_sigma(masks, p):
    keep = masks[p]
    n = keep.numel()
    p_eff = effective_dropout_p(p)
    assert abs(p_eff - p) <= 2**-17 and p_eff == dropout_threshold(p) / 65536
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - p_eff) <= 5 * math.sqrt(p_eff * (1 - p_eff) / n), f"dropped {dropped} for p = {p}"


@MIRROR_ONLY
@pytest.mark.parametrize("p", (*P_VALUES, 0.3, 0.15, 1e-6, 0.999))
def test_rescale_is_the_exact_keep_probability(p):
    t = dropout_threshold(p)
    assert 0 <= t <= 65535
    # E[keep · scale] = (1 - t/65536) · 65536 / (65536 - t) = 1, in exact rational arithmetic
    assert keep_scale(p) * (65536 - t) == 65536
    assert abs((1 - effective_dropout_p(p)) * keep_scale(p) - 1.0) < 1e-15


@MIRROR_ONLY
@pytest.mark.parametrize("p", P_VALUES)
def test_rescaled_mask_is_unbiased(masks, p):
    scaled = masks[p].double() * keep_scale(p)
    n = scaled.numel()
    sd = math.sqrt(effective_dropout_p(p) / (1 - effective_dropout_p(p)))  # sd of keep · scale
    assert abs(scaled.mean().item() - 1.0) <= 5 * sd / math.sqrt(n)


@MIRROR_ONLY
@pytest.mark.parametrize("p", P_VALUES)
def test_elements_sharing_a_philox_call_are_uncorrelated(masks, p):
    keep = masks[p].reshape(-1, 2, 8, 256)  # (B·h·I, h, r, j): row 16·I + 8·h + r
    word_pair = (keep[:, 0], keep[:, 1])  # (i, j) and (i + 8, j): the two halves of one 32-bit word
    cols = keep.reshape(-1, 256 // 4, 4)  # (.., J, w): column 4·J + w; one call covers a row's 4 columns of a J
    pairs = {
        "word halves (i, j) / (i + 8, j)": word_pair,
        "adjacent columns, same word group": (cols[..., 0], cols[..., 1]),
        "first and last column of a call": (cols[..., 0], cols[..., 3]),
        "adjacent columns across calls": (cols[:, :-1, 3], cols[:, 1:, 0]),
        "adjacent rows (different calls)": (keep[:, :, :-1], keep[:, :, 1:]),
    }
    for name, (a, b) in pairs.items():
        c = _corr(a, b)
        assert abs(c) <= _bound(a.numel()), f"{name}: correlation {c:.4f} (n = {a.numel()})"


@MIRROR_ONLY
@pytest.mark.parametrize("p", P_VALUES)
def test_drops_per_call_are_binomial(masks, p):
    keep = masks[p].reshape(2, 4, 16, 2, 8, 64, 4)  # (b, head, I, h, r, J, w): row 16·I + 8·h + r, col 4·J + w
    keep = keep.permute(0, 1, 2, 4, 5, 3, 6).reshape(-1, DROPOUT_LANES)  # (calls, the 8 draws of a call)
    dropped = (~keep).sum(1)
    counts = torch.bincount(dropped, minlength=9).double()
    n = keep.shape[0]
    q = effective_dropout_p(p)
    expected = torch.tensor([math.comb(8, k) * q**k * (1 - q) ** (8 - k) for k in range(9)], dtype=torch.float64) * n
    ok = expected >= 5  # merge the sparse tail bins (p = 0.1) into one
    obs = torch.cat([counts[ok], counts[~ok].sum()[None]]) if (~ok).any() else counts
    exp = torch.cat([expected[ok], expected[~ok].sum()[None]]) if (~ok).any() else expected
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    # chi-square critical value at 1e-4 by the Wilson-Hilferty approximation
    crit = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < crit, f"drops per call not Binomial(8, {q}): chi2 = {chi2:.1f} > {crit:.1f} (df {df})"


@MIRROR_ONLY
@pytest.mark.parametrize("p", P_VALUES)
def test_heads_batches_and_seeds_are_independent(masks, p):
    keep = masks[p]
    other_seed = attention_dropout_mask(20240608, 2, 4, 256, 256, p)
    swapped = attention_dropout_mask(20240607 + 1, 2, 4, 256, 256, p)  # seed + 1 vs (b·h + 1): different keys
    pairs = {
        "heads (b, 0) / (b, 1)": (keep[:, 0], keep[:, 1]),
        "heads (b, 2) / (b, 3)": (keep[:, 2], keep[:, 3]),
        "batches (0, h) / (1, h)": (keep[0], keep[1]),
        "seed s / s + 1": (keep, other_seed),
        "(seed + 1, bh) / (seed, bh + 1)": (swapped.reshape(8, 256, 256)[:-1], keep.reshape(8, 256, 256)[1:]),
    }
    for name, (a, b) in pairs.items():
        c = _corr(a, b)
        assert abs(c) <= _bound(a.numel()), f"{name}: correlation {c:.4f}"
        assert not torch.equal(a, b), name


def _kernel_keep(seed: int, B: int, H: int, T: int, p: float, device) -> torch.Tensor:
    """The keep-mask the kernel applied, read back: q = k = 0 gives probabilities 1/T; with V = identity
    (d = T) output row i is keep[i, :] · keep_scale(p) / T."""
    q = torch.zeros(B, T, H, T, device=device)
    v = torch.eye(T, device=device)[None, :, None, :].expand(B, T, H, T).contiguous()
    out = fused_attention(q, q, v, None, p, softmax_scale=1.0, seed=seed)  # (B, T, h, T)
    scaled = (out * T).permute(0, 2, 1, 3)  # (B, h, Tq, Tk): 0 or keep_scale(p)
    keep = scaled > 0.5 * keep_scale(p)
    torch.testing.assert_close(scaled, keep.float() * keep_scale(p), atol=1e-5, rtol=0)
    return keep


@pytest.mark.parametrize("p", P_VALUES)
def test_kernel_mask_rate_and_unbiased_output(p, device):
    B, H, T, seed = 2, 3, 48, 777
    keep = _kernel_keep(seed, B, H, T, p, device)
    assert torch.equal(keep.cpu(), attention_dropout_mask(seed, B, H, T, T, p))  # the mirror, bit for bit
    n = keep.numel()
    q = effective_dropout_p(p)
    assert abs((1 - keep.double().mean().item()) - q) <= 5 * math.sqrt(q * (1 - q) / n)
    # V = ones: every output is the mean of keep · scale over the keys; its average over rows is ≈ 1
    ones = torch.ones(B, T, H, 16, device=device)
    out = fused_attention(torch.zeros_like(ones), torch.zeros_like(ones), ones, None, p, seed=seed + 1)
    sd = math.sqrt(q / (1 - q))
    assert abs(out[..., 0].double().mean().item() - 1.0) <= 5 * sd / math.sqrt(B * H * T * T)
