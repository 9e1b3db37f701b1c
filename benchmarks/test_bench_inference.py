"""Forward-only encoding throughput (sequences/s) on batches with the token lengths of real text (Rotten Tomatoes
snippets, Wikipedia paragraphs): fastbert vs transformers SDPA (+ torch.compile, + optimize()) and
sentence-transformers. CUDA: MiniLM and BERT-base, batch 128, bf16; CPU: the tiny preset, fp32."""

from __future__ import annotations

import pytest

from fastbert.bench import InferenceCase, run_inference_cases
from fastbert.bench.inference import CPU_INFERENCE_CASES, CPU_MAX_LEN, GPU_INFERENCE_CASES

CASES = [pytest.param(("cpu", c), id=f"cpu-{c.replace('/', '-')}") for c in CPU_INFERENCE_CASES] + [
    pytest.param(("cuda", c), marks=pytest.mark.gpu, id=f"cuda-{c.replace('/', '-')}") for c in GPU_INFERENCE_CASES
]


@pytest.mark.parametrize("slot", CASES)
def test_inference(slot, bench_env, bench_opts, record):
    kind, spec = slot
    if (kind == "cuda") != bench_env.cuda:
        pytest.skip(f"{kind} case: this run is on {bench_env.device.type}")
    case = InferenceCase.parse(spec, max_len=512 if bench_env.cuda else CPU_MAX_LEN)
    callables: dict = {}
    rows = run_inference_cases([case], bench_env, rounds=bench_opts.rounds, callables=callables)
    record(rows, callables, "hf-sdpa")
