"""The Triton GEMM's autotuning: bucketed row counts (no re-tuning storm) and the fixed table for several ranks.

The interpreter has one config, so the autotuner never benchmarks there; these tests give it two interpreter-sized
configs, replace its benchmarking with a counting stub and the kernel launch with a recording stub, and drive the
public launchers (`qkv_projection`, `linear_bias_gelu` on the Triton GEMM path) with many row counts.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import triton

import kernels.matmul as mm
from kernels.linear_bias_gelu import linear_bias_gelu
from kernels.qkv_projection import qkv_projection

TWO_TILES = [(64, 64, 64, 4, 3), (32, 32, 32, 4, 3)]
# 60 distinct row counts from 1 to 40 000 (log-spaced, odd and even): what unpadded batches of varying length give.
ROW_COUNTS = sorted({int(m) for m in np.geomspace(1, 40_000, 75)})


class _Recorder:
    """Stands in for the JITFunction under the autotuner: records each launch's block sizes, runs nothing."""

    def __init__(self):
        self.launches: list[tuple[int, int]] = []

    def run(self, *args, **kwargs):
        self.launches.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, **kwargs)


@pytest.fixture
def tuner(monkeypatch):
    """The GEMM autotuner with two configs, an empty cache, a counting `_bench` and a recording launch."""
    kernel = mm._gemm_bias_act_kernel
    benches: collections.Counter = collections.Counter()

    def bench(*args, config, **meta):
        key = (meta["ACTIVATION"], meta["STORE_PRE"], meta["SPLIT"], str(args[0].dtype))
        benches[key] += 1
        return [float(config.kwargs["BLOCK_M"])] * 3  # the smaller tile "wins": a deterministic choice

    recorder = _Recorder()
    monkeypatch.setattr(mm, "gemm_tiles", lambda dtype, precision, activation: TWO_TILES)
    monkeypatch.setattr(kernel, "configs", [mm._config(t) for t in TWO_TILES])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    monkeypatch.setattr(kernel, "fn", recorder)
    monkeypatch.delenv("FASTBERT_GEMM_AUTOTUNE", raising=False)
    return kernel, benches, recorder


def _drive(dtype: torch.dtype) -> None:
    K, H, heads = 16, 16, 2
    w_up, b_up = torch.randn(24, K, dtype=dtype), torch.randn(24, dtype=dtype)
    w_qkv, b_qkv = torch.randn(3 * H, H, dtype=dtype), torch.randn(3 * H, dtype=dtype)
    for M in ROW_COUNTS:
        x = torch.randn(M, K, dtype=dtype, requires_grad=True)
        linear_bias_gelu(x, w_up, b_up, backend="triton")  # training: GELU + stored pre-activation
        qkv_projection(x, w_qkv, b_qkv, heads, backend="triton")  # 3-way split, no activation


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
def test_m_bucket_is_bounded():
    buckets = {mm.m_bucket(m) for m in range(1, 70_000, 7)}
    assert buckets == {64, 128, 256, 512, 1024, 2048, 4096, 8192}
    assert mm.m_bucket(0) == 64 and mm.m_bucket(4097) == 8192 and mm.m_bucket(10**7) == 8192


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_at_most_eight_tunings_per_kernel_and_dtype(tuner, dtype):
    kernel, benches, recorder = tuner
    assert len(ROW_COUNTS) >= 50
    _drive(dtype)
    assert len(recorder.launches) == 2 * len(ROW_COUNTS)  # every call launched once
    assert set(benches) == {(1, True, False, str(dtype)), (0, False, True, str(dtype))}
    for key, n_bench in benches.items():
        tunings = n_bench // len(TWO_TILES)  # each tuning benchmarks every config once
        assert n_bench % len(TWO_TILES) == 0
        assert tunings <= 8, f"{key}: {tunings} tunings for {len(ROW_COUNTS)} row counts"
    # The key holds the bucket, never M: one cache entry per (epilogue, bucket), and the same M again is free.
    assert len(kernel.cache) == sum(benches.values()) // len(TWO_TILES)
    before = sum(benches.values())
    _drive(dtype)
    assert sum(benches.values()) == before


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
def test_fixed_table_under_several_ranks_never_tunes(tuner, monkeypatch):
    """With torch.distributed initialised on more than one rank, every launch takes `fixed_tile` (the same on
    every rank by construction) and the autotuner never benchmarks."""
    _, benches, recorder = tuner
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    _drive(torch.float16)
    assert sum(benches.values()) == 0
    want = []
    for M in ROW_COUNTS:
        for act in (mm.ACT_GELU_ERF, mm.ACT_NONE):
            bm, bn, *_ = mm.fixed_tile(torch.float16, "tf32", act, M)
            want.append((bm, bn))
    assert recorder.launches == want


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
def test_fixed_tile_depends_on_the_bucket_only():
    for dtype, precision in ((torch.float16, "tf32"), (torch.bfloat16, "tf32"), (torch.float32, "ieee")):
        for act in (mm.ACT_NONE, mm.ACT_GELU_ERF):
            for m in ROW_COUNTS:
                tile = mm.fixed_tile(dtype, precision, act, m)
                assert tile == mm.fixed_tile(dtype, precision, act, mm.m_bucket(m))
                assert tile in mm.gemm_tiles(dtype, precision, act)


def test_fixed_table_launch_is_correct(monkeypatch):
    """FASTBERT_GEMM_AUTOTUNE=0 takes the fixed table; the result is the same GEMM (real interpreter run)."""
    monkeypatch.setenv("FASTBERT_GEMM_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 33, generator=g), torch.randn(29, 33, generator=g), torch.randn(29, generator=g)
    y = linear_bias_gelu(x, w, b, backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x @ w.t() + b), rtol=1e-5, atol=1e-5)


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
def test_backend_switch(monkeypatch):
    assert mm.gemm_backend("qkv") == "cublas" and mm.gemm_backend("bias_gelu") == "cublas"
    assert "no GPU timing" in mm.gemm_backend_reason("qkv")
    previous = mm.set_gemm_backend("bias_gelu", "triton")
    try:
        assert previous == "cublas" and mm.gemm_backend("bias_gelu") == "triton"
        assert mm.gemm_backend_reason("bias_gelu") == "set_gemm_backend"
    finally:
        mm.set_gemm_backend("bias_gelu", previous)
    assert mm._parse_backend_env("triton") == {"qkv": "triton", "bias_gelu": "triton"}
    assert mm._parse_backend_env(" qkv=triton ") == {"qkv": "triton"}
    for bad in ("cutlass", "ffn=triton", "qkv=cudnn"):
        with pytest.raises(ValueError, match="FASTBERT_GEMM"):
            mm._parse_backend_env(bad)
    with pytest.raises(ValueError, match="kind must be one of"):
        mm.gemm_backend("attention")
    with pytest.raises(ValueError, match="backend must be one of"):
        mm.set_gemm_backend("qkv", "cutlass")
    assert triton.next_power_of_2(mm.M_BUCKET_MAX) == mm.M_BUCKET_MAX


@pytest.mark.no_kernel("autotuner bookkeeping with a stubbed benchmark and launch; no kernel runs")
def test_tma_kernel_tunes_per_bucket(monkeypatch):
    """The TMA + persistent kernel's key buckets M the same way: ≤ 8 tunings over all the row counts."""
    kernel = mm._gemm_tma_persistent_kernel
    tiles = [(32, 32, 32, 4, 3), (64, 32, 32, 4, 3)]
    benches = collections.Counter()

    def bench(*args, config, **meta):
        benches[str(args[0].base.dtype)] += 1
        return [float(config.kwargs["BLOCK_M"])] * 3

    recorder = _Recorder()
    monkeypatch.setattr(mm, "tma_tiles", lambda dtype, precision, activation: tiles)
    monkeypatch.setattr(kernel, "configs", [mm._tma_config(t) for t in tiles])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    monkeypatch.setattr(kernel, "fn", recorder)
    monkeypatch.delenv("FASTBERT_GEMM_AUTOTUNE", raising=False)
    w, b = torch.randn(24, 16), torch.randn(24)
    for M in ROW_COUNTS:
        x = torch.randn(M, 16)
        mm.gemm_bias_act(x, w, b, torch.empty(M, 24), activation=mm.ACT_GELU_ERF, pre=torch.empty(M, 24), tma=True)
    assert len(recorder.launches) == len(ROW_COUNTS)
    assert benches["torch.float32"] // len(tiles) <= 8
