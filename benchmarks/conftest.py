"""Set-up of the pytest-benchmark suite (`pytest benchmarks/`): options, the measured device, recording.

Every test measures one case with `fastbert.bench` (all candidates interleaved in one run, compile and
autotuning timed apart), puts the figures into pytest-benchmark's `extra_info`, appends them to the CSVs
when asked (`--bench-csv-dir`; a CUDA run writes to benchmarks/results by default) and lets
pytest-benchmark time the fastbert candidate's forward+backward once more (host timer around a
synchronised call). Cases marked `gpu` are skipped without CUDA, with the reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastbert.bench import (
    CPU_TRAIN_SHAPES,
    GPU_TRAIN_SHAPES,
    GPU_TRAIN_SHAPES_QUICK,
    BenchEnv,
    Row,
    make_env,
    measure_ceilings,
    sync,
    write_csvs,
)

RESULTS = Path(__file__).parent / "results"

# Shape slots: CPU cases (run without CUDA) and GPU cases (base/large at 128 and 512; batches resolved at
# run time, --bench-quick picks the smaller ones). A run executes the slots of its own device only.
SHAPE_SLOTS = [pytest.param(("cpu", i), id=f"cpu-{s}-T{t}") for i, (s, t, _) in enumerate(CPU_TRAIN_SHAPES)] + [
    pytest.param(("cuda", i), marks=pytest.mark.gpu, id=f"cuda-{s}-T{t}")
    for i, (s, t, _) in enumerate(GPU_TRAIN_SHAPES)
]


def pytest_addoption(parser):
    group = parser.getgroup("fastbert-bench")
    group.addoption("--bench-quick", action="store_true", help="smaller GPU batches (the CLI's --quick)")
    group.addoption("--bench-rounds", type=int, default=3, help="interleaved rounds per candidate")
    group.addoption("--bench-csv-dir", default=None,
                    help="append rows to this folder's CSVs (default: benchmarks/results on CUDA, none on CPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here): GPU benchmark case")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "shape_slot" in metafunc.fixturenames:
        metafunc.parametrize("shape_slot", SHAPE_SLOTS)


@pytest.fixture(scope="session")
def bench_env() -> BenchEnv:
    env = make_env()
    if not env.cuda:
        torch.set_num_threads(1)  # steadier timings on a shared machine
    measure_ceilings(env)
    return env


@pytest.fixture(scope="session")
def bench_opts(request, bench_env) -> SimpleNamespace:
    csv_dir = request.config.getoption("--bench-csv-dir")
    if csv_dir is None:
        csv_dir = str(RESULTS) if bench_env.cuda else ""
    return SimpleNamespace(quick=request.config.getoption("--bench-quick"),
                           rounds=request.config.getoption("--bench-rounds"), csv_dir=csv_dir)


@pytest.fixture
def bench_shape(shape_slot, bench_env, bench_opts) -> tuple[str, int, int]:
    """(size, T, B) of this test's slot; skipped when the slot is for the other kind of device."""
    kind, i = shape_slot
    if (kind == "cuda") != bench_env.cuda:
        pytest.skip(f"{kind} case: this run is on {bench_env.device.type}")
    if kind == "cpu":
        return CPU_TRAIN_SHAPES[i]
    return (GPU_TRAIN_SHAPES_QUICK if bench_opts.quick else GPU_TRAIN_SHAPES)[i]


@pytest.fixture
def fused_cpu_ok(bench_env):
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not bench_env.cuda:
        pytest.skip("TRITON_INTERPRET=1: the fused kernels would be timed in Triton's interpreter")


@pytest.fixture
def record(benchmark, bench_env, bench_opts):
    """Check and store one case's rows; time `callables[primary]` with pytest-benchmark."""

    def _record(rows: list[Row], callables: dict, baseline: str) -> None:
        measured = [r for r in rows if r.ms is not None]
        errors = [f"{r.candidate} {r.mode}: {r.note}" for r in rows if r.note.startswith("error")]
        assert not errors, "candidates failed:\n" + "\n".join(errors)
        assert any(r.candidate == baseline for r in measured), f"baseline {baseline} was not measured"
        for r in measured:
            assert math.isfinite(r.ms) and r.ms > 0, f"{r.candidate} {r.mode}: bad time {r.ms}"
            assert not r.parity.startswith(("FAIL", "error")), f"{r.candidate}: parity {r.parity}"
        benchmark.group = measured[0].case + " " + measured[0].shape
        benchmark.extra_info.update(
            device=bench_env.gpu, ceil_tflops=bench_env.ceil_tflops, ceil_gbps=bench_env.ceil_gbps,
            rows=[{k: v for k, v in r.to_dict().items() if v not in (None, "")} for r in measured])
        skipped = sorted({f"{r.candidate}: {r.note}" for r in rows if r.note.startswith("skipped")})
        if skipped:
            benchmark.extra_info["skipped"] = skipped
        if bench_opts.csv_dir:
            write_csvs(rows, bench_env, bench_opts.csv_dir)
        primary = next((n for n in callables if n.startswith("fastbert")), baseline)
        benchmark.name = f"{benchmark.name} [{primary}]"
        fn = callables[primary]

        def synced():
            fn()
            sync(bench_env.device)

        benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)

    return _record
