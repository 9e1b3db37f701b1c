"""kernels._philox: `philox_uniform` (the PyTorch mirror of `tl.rand` the reference paths and mask helpers use)
is bit-equal to `tl.rand` run by Triton, for int32 and int64 offsets and a seed with both key words set."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels._philox import _MASK32, _UINT_TO_UNIFORM, philox4x32, philox_uniform

BLOCK = 4096


@triton.jit
def _rand_probe_kernel(offsets_ptr, out_ptr, seed, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.rand(seed, tl.load(offsets_ptr + i)))


def _offsets(dtype: torch.dtype, device: str) -> torch.Tensor:
    """16,384 offsets: a run from 0, random ones over the dtype's non-negative range, and (int64) ones past
    2**32, where the second counter word is used."""
    g = torch.Generator().manual_seed(5)
    high = 2**31 - 1 if dtype == torch.int32 else 2**40
    parts = [torch.arange(4096), torch.randint(0, high, (8192,), generator=g)]
    if dtype == torch.int64:
        parts.append(2**32 + torch.arange(4096))
    else:
        parts.append(torch.randint(2**30, 2**31 - 1, (4096,), generator=g))
    return torch.cat(parts).to(device=device, dtype=dtype)


# 0x1234_5678_9ABC sets the high key word too
@pytest.mark.parametrize("dtype, seed", [(torch.int32, 12345), (torch.int64, 0x1234_5678_9ABC)])
def test_philox_uniform_is_bit_equal_to_tl_rand(dtype, seed, device):
    offsets = _offsets(dtype, device)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=device)
    _rand_probe_kernel[(offsets.numel() // BLOCK,)](offsets, out, seed, BLOCK=BLOCK)
    mirror = philox_uniform(seed, offsets)
    differ = (out.view(torch.int32) != mirror.view(torch.int32)).sum().item()
    assert differ == 0, f"{differ} of {out.numel()} uniforms differ from tl.rand (bitwise)"
    # The offsets are ones where the fold of negative int32 words matters: folding by 2**32 - c0 instead of
    # 2**32 - 1 - c0 moves some uniforms by one ulp, which this test must be able to see.
    c0 = philox4x32(seed, offsets.long() & _MASK32, offsets.long() >> 32)[0]
    off_by_one = torch.where(c0 >= 2**31, 2**32 - c0, c0).to(torch.float32) * _UINT_TO_UNIFORM
    assert (off_by_one != mirror).any()
