"""The encoder's fused kernels, forward / backward / forward+backward, against eager PyTorch and
torch.compile of the same math, at N = B·T tokens of BERT-base and -large (CPU: the mini preset, fp32;
there the public functions run their plain-PyTorch reference path)."""

from __future__ import annotations

import pytest

from fastbert.bench import kernel_cases, run_op_case

OPS = ("qkv_projection", "softmax_dropout", "linear_bias_gelu", "bias_dropout_add_layernorm", "mlm_cross_entropy")


@pytest.mark.parametrize("op", OPS)
def test_kernel(op, bench_shape, bench_env, bench_opts, record, fused_cpu_ok):
    size, T, B = bench_shape
    (case,) = kernel_cases(bench_env, size, B, T, ops=[op])
    callables: dict = {}
    rows = run_op_case(case, bench_env, rounds=bench_opts.rounds, callables=callables)
    record(rows, callables, case.baseline)
