"""Shared test helpers: the tolerance rule, seeded inputs, the strict switch and the Triton launch spy.

Tolerance rule (STYLE.md): a kernel's error against a float64 reference must be at most `k` times the
error of the same computation done by PyTorch in the kernel's dtype, plus a small absolute slack.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, NoReturn

import pytest
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


# ---------------------------------------------------------------------------------------------- strict switch
# CI exports FASTBERT_STRICT=1 (.ci/run): there, anything a test needs but cannot find fails the run instead
# of skipping it, and the run ends by checking that every skip is a `gpu`-marked test (tests/conftest.py).
STRICT_ENV = "FASTBERT_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0") == "1"


def missing(reason: str) -> NoReturn:
    """Skip the test for `reason` — or, under FASTBERT_STRICT=1, fail it."""
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV}=1: a missing requirement fails the run)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(name: str) -> Any:
    """What a test needs, or `missing(...)`: a Python module by import name (returns the module), or an
    offline resource of `fastbert.resources` by its name (returns its path: "minilm", "wiki_corpus", ...)."""
    from fastbert.resources import _RESOURCES, ResourceNotFound, resource_path

    try:
        return resource_path(name) if name in _RESOURCES else importlib.import_module(name)
    except ResourceNotFound as e:
        why = str(e)
    except ImportError as e:
        why = f"cannot import {name!r}: {e}"
    missing(why)


# ---------------------------------------------------------------------------------------------- launch spy
class LaunchSpy:
    """Records every Triton kernel launch ("module.kernel" per launch), compiled or interpreted.

    Installed once by tests/conftest.py on the launch entry points every `kernel[grid](...)` goes through
    (`JITFunction.run`, and `InterpretedFunction.run` under TRITON_INTERPRET=1; the autotuner and heuristics
    wrappers call these), so it proves the kernels ran without touching the kernel files."""

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.total = 0

    def reset(self) -> None:
        self.launches = []

    def record(self, fn: Any) -> None:
        self.launches.append(f"{fn.__module__}.{fn.__name__}")
        self.total += 1

    def install(self) -> None:
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run
            if getattr(original, "_launch_spy", False):
                continue
            cls.run = self._wrap(original)

    def _wrap(self, original: Any) -> Any:
        spy = self

        @functools.wraps(original)
        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                spy.record(fn_self.fn)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        run._launch_spy = True
        return run


LAUNCH_SPY = LaunchSpy()


def launched(module: str) -> list[str]:
    """Kernels of `module` (e.g. "kernels.attention") launched so far in the running test, in order."""
    return [name.rsplit(".", 1)[1] for name in LAUNCH_SPY.launches if name.rsplit(".", 1)[0] == module]
