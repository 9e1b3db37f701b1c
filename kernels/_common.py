"""Helpers shared by every op in `kernels/`: dispatch, argument checks, dropout seeds.

Dispatch rule (the same for every public function): CUDA tensors run the Triton kernels; CPU tensors run
them through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported (that
is how the CPU test-suite exercises the kernel source), and the plain-PyTorch ``*_ref`` otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernels (see the module docstring)."""
    if not tensors:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_on() and all(t.device.type == "cpu" for t in tensors)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raise a ValueError naming `name` when `t` is not a tensor of the expected rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"inputs must share one dtype, got {dtypes}")


def check_dropout_p(p: float) -> float:
    if not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def draw_seed(seed: int | None) -> torch.Tensor:
    """The dropout seed a call uses, as a 1-element int64 CPU tensor: `seed` itself, or one drawn from
    torch's default CPU generator so that `torch.manual_seed` makes runs repeatable.

    A tensor (not a Python int) so that `torch.compile` traces the draw instead of breaking the graph on
    `.item()`; the custom ops read it with `seed_value` inside their opaque launchers. Kept below 2**31 so it
    fits Triton's int32 argument."""
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**31):
        raise ValueError(f"seed must be an int in [0, 2**31) or None, got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64)


def seed_value(seed: torch.Tensor) -> int:
    """The Python int a launcher passes to Triton (the tensor lives on the CPU: no device sync)."""
    return int(seed.reshape(-1)[0].item())
