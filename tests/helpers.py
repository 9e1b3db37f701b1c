"""Shared test helpers: the tolerance rule and seeded inputs.

Tolerance rule (STYLE.md): a kernel's error against a float64 reference must be at most `k` times the
error of the same computation done by PyTorch in the kernel's dtype, plus a small absolute slack.
"""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    *,
    k: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """`out` (kernel) is within k × (PyTorch-in-same-dtype error) + atol of the float64 reference."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    kernel_err = max_err(out, ref64)
    torch_err = max_err(torch_same_dtype, ref64)
    bound = k * torch_err + atol
    assert kernel_err <= bound, (
        f"{name}: kernel error {kernel_err:.3e} > {k} × torch error {torch_err:.3e} + {atol:.1e}"
    )


def pad_mask(lengths: list[int], T: int, device="cpu") -> torch.Tensor:
    """Bool [B, T] key-padding mask, True = real token."""
    ar = torch.arange(T, device=device)
    return ar[None, :] < torch.tensor(lengths, device=device)[:, None]
