"""Attention forward+backward (and each alone): fastbert fused (padded and varlen) vs eager, SDPA with the
key mask, and torch.compile. Random key padding (lengths T/2..T), dropout 0.1; bf16 on CUDA, fp32 on CPU."""

from __future__ import annotations

from fastbert import BertConfig
from fastbert.bench import attention_case, run_op_case


def test_attention(bench_shape, bench_env, bench_opts, record, fused_cpu_ok):
    size, T, B = bench_shape
    cfg = BertConfig.from_preset(size)
    case = attention_case(bench_env, size, B, T, cfg.num_attention_heads, cfg.head_dim)
    callables: dict = {}
    rows = run_op_case(case, bench_env, rounds=bench_opts.rounds, callables=callables)
    record(rows, callables, case.baseline)
