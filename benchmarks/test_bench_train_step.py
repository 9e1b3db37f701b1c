"""The whole BertForPreTraining training step: fastbert (fused; and its reference encoder) vs transformers
eager / SDPA / SDPA + torch.compile. CUDA: forward + backward + fused AdamW under bf16 autocast, seq/s, MFU
and peak memory; CPU: the reference model vs transformers, forward + backward, fp32."""

from __future__ import annotations

import pytest

from fastbert.bench import TrainCase, run_train_cases


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_train_step(padded, bench_shape, bench_env, bench_opts, record):
    size, T, B = bench_shape
    callables: dict = {}
    rows = run_train_cases([TrainCase(size, T, B, padded)], bench_env, rounds=bench_opts.rounds,
                           callables=callables)
    baseline = "hf-sdpa" if any(r.candidate == "hf-sdpa" and r.ms for r in rows) else "fastbert-ref"
    record(rows, callables, baseline)
