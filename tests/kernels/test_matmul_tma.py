"""The TMA + persistent Triton GEMM (`kernels.matmul._gemm_tma_persistent_kernel`) through Triton's interpreter:
bias, GELU and the stored pre-activation against float64, within 2× PyTorch's same-dtype error.

The interpreter runs host TensorDescriptors in numpy, so this checks the kernel's source (tiles, tails in M, N
and K, the persistent tile walk); its compiled form (wgmma + TMA on sm_90) is checked at compile time only, and a
GPU run of these tests is still to come.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.matmul as mm
from tests.helpers import assert_within_torch_error

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}
ACTS = {mm.ACT_NONE: None, mm.ACT_GELU_ERF: "none", mm.ACT_GELU_TANH: "tanh"}


def _ref(x, w, b, act):
    z = F.linear(x, w, b)
    return z, z if ACTS[act] is None else F.gelu(z, approximate=ACTS[act])


# Shapes: M odd (tail tile), K a multiple of 8 (16-byte rows for fp16) but not of BLOCK_K, N not a tile multiple;
# M = 150 with 32-row tiles gives more tiles than the interpreter's 4 persistent programs.
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(150, 40, 72), (7, 96, 24)])
def test_tma_gemm_epilogue(M, K, N, dtype, act, device):
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g)
    x[0] = 0.0  # a padded (zeroed) token row
    w, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    x, w, b = (t.to(device=device, dtype=dtype) for t in (x, w, b))
    y, pre = torch.empty(M, N, dtype=dtype, device=device), torch.empty(M, N, dtype=dtype, device=device)
    assert mm.tma_supported(x, w, y, pre)
    store_pre = act != mm.ACT_NONE
    mm.gemm_bias_act(x, w, b, y, activation=act, pre=pre if store_pre else None, tma=True)
    z64, y64 = _ref(x.double(), w.double(), b.double(), act)
    z_t, y_t = _ref(x, w, b, act)
    assert_within_torch_error(y, y64, y_t, atol=ATOL[dtype], name="y")
    if store_pre:
        assert_within_torch_error(pre, z64, z_t, atol=ATOL[dtype], name="pre-activation")


def test_tma_fixed_table_and_refusals(monkeypatch, device):
    monkeypatch.setenv("FASTBERT_GEMM_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(37, 32, generator=g), torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    x, w, b = (t.to(device) for t in (x, w, b))
    y = torch.empty(37, 24, device=device)
    mm.gemm_bias_act(x, w, b, y, activation=mm.ACT_GELU_TANH, tma=True)
    torch.testing.assert_close(y, F.gelu(x @ w.t() + b, approximate="tanh"), rtol=1e-5, atol=1e-5)
    odd = torch.randn(37, 33, device=device)  # 132-byte rows: no TMA descriptor
    assert not mm.tma_supported(odd, torch.randn(24, 33, device=device), y, None)
    with pytest.raises(ValueError, match="TMA kernel needs"):
        mm.gemm_bias_act(odd, torch.randn(24, 33, device=device), b, y, tma=True)
    thirds = tuple(torch.empty(37, 8, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="TMA kernel needs"):
        mm.gemm_bias_act(x, w, b, thirds, tma=True)
