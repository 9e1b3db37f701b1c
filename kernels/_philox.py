"""Triton's Philox random stream in plain PyTorch: `philox_uniform(seed, offsets)` == `tl.rand(seed, offsets)`,
`philox4x32(seed, c0, c1, c2, c3, n_rounds)` == `tl.philox(seed, c0, c1, c2, c3, n_rounds)`.

The dropout kernels never store a keep-mask; they regenerate it from (seed, position). This module rebuilds
the very same uniforms on any device with int64 tensor arithmetic, so tests can compare a kernel's mask bit
for bit and the PyTorch reference paths drop exactly what the kernels drop.

Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a 128-bit counter
(c0, c1, c2, c3) and a 64-bit key (k0, k1), all 32-bit words, go through 10 rounds of

    c0, c1, c2, c3 = hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0)
    k0, k1         = k0 + KEY_A,  k1 + KEY_B                                    (mod 2**32)

with hi/lo the high/low 32-bit words of a 64-bit product. How Triton 3.x fills the words:

    tl.rand(seed, offsets)          = uint_to_uniform_float(c0 after 10 rounds) of
    tl.philox(seed, lo, hi, 0, 0)   with lo = offsets' low 32 bits, hi = offsets >> 32 (0 for int32 offsets)
    key: k0 = seed & 0xFFFFFFFF,  k1 = (seed >> 32) & 0xFFFFFFFF       (seed read as a 64-bit integer)

and `uint_to_uniform_float` bit-casts the uint32 word to int32 `x` and returns
`(x if x >= 0 else -x - 1) · 4.6566127342e-10` in float32, a value in [0, 1).

The callers:

- bias-dropout-add-LayerNorm: `tl.philox(seed, lo32(offset), hi32(offset), 0, 0)` for int64 offsets,
  i.e. key = (seed, 0), counter = (low word, high word, 0, 0) — what `tl.rand` does with int64 offsets;
- attention dropout (`kernels._attention_dropout`) uses all four output words of a 7-round call, through
  `philox4x32`: key = (seed, b·h + head), counter = (key-column group, query row, 0, 0).

Caution: offsets must be non-negative (for negative int32 offsets Triton's high counter word is 0, while the
int64 split here would give 0xFFFFFFFF); seeds are 64-bit values in [0, 2**63). Materialises int64
temporaries of the broadcast shape (about ten of them): meant for tests and reference paths, not for
large tensors.
"""

from __future__ import annotations

import torch

# Philox-4x32 constants, as Triton's `philox_impl` uses them for 32-bit counter words.
_KEY_A = 0x9E3779B9  # key increments (golden ratio, sqrt(3) - 1)
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53  # round multipliers
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10  # tl.rand's default
_MASK32 = 0xFFFFFFFF
# Triton's uint -> float scale: the largest with (2**31 - 1) · scale < 1 in float32.
_UINT_TO_UNIFORM = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a·b, for a constant a < 2**32 and int64 b in
    [0, 2**32). b is split into 16-bit halves so that every partial product fits a signed int64."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(
    seed: int | torch.Tensor,
    c0: torch.Tensor,
    c1: torch.Tensor | int = 0,
    c2: torch.Tensor | int = 0,
    c3: torch.Tensor | int = 0,
    n_rounds: int = _N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four uint32 output words (as int64 tensors in [0, 2**32)) of Triton's
    `tl.philox(seed, c0, c1, c2, c3, n_rounds)`: counter words c0..c3 (integers in [0, 2**32)), key
    k0 = seed & 0xFFFFFFFF, k1 = (seed >> 32) & 0xFFFFFFFF. Everything broadcasts."""
    if isinstance(c0, torch.Tensor):
        device = c0.device
    else:
        raise ValueError("c0 must be an integer tensor")
    words = []
    for name, c in (("c0", c0), ("c1", c1), ("c2", c2), ("c3", c3)):
        if isinstance(c, torch.Tensor):
            if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {c.dtype}")
            words.append(c.to(device=device, dtype=torch.int64) & _MASK32)
        else:
            words.append(torch.tensor(int(c) & _MASK32, dtype=torch.int64, device=device))
    c0, c1, c2, c3 = torch.broadcast_tensors(*words)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit-identical to Triton's `tl.rand(seed, offsets)` (10 rounds).

    `seed` is the 64-bit key Triton receives: a Python int, or an integer tensor that broadcasts against
    `offsets` (e.g. one key per attention matrix); a tensor is moved to `offsets`' device. `offsets` is a
    non-negative integer tensor; values of 2**32 and above use the second counter word, exactly as
    `tl.rand` does for int64 offsets. The result has the broadcast shape of `seed` and `offsets`."""
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"offsets must be an integer tensor, got {offsets.dtype}")
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64)
        offsets = offsets.expand(torch.broadcast_shapes(offsets.shape, seed.shape))
    c0, _, _, _ = philox4x32(seed, offsets & _MASK32, offsets >> 32)
    # Bit-cast to int32 and fold negatives x to -x - 1: for the uint32 word u >= 2**31 that is 2**32 - 1 - u.
    folded = torch.where(c0 >= 2**31, _MASK32 - c0, c0)
    return folded.to(torch.float32) * torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32, device=c0.device)
