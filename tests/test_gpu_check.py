"""benchmarks/gpu_check.py and fastbert/bench/precompile.py on a CPU: a shortened rehearsal of the one GPU call
(rows of the training step and of attention, fastbert's and a baseline's, written as measured), the stage machinery
(polite signal then SIGKILL, no stage outliving a killed check), the plan (limits within the budget, outputs within
what the device tool returns), the reading of test results, and the Triton recording: a recorded request compiled
by the pool is a cache hit for the launcher's own call (through a stand-in driver: no GPU here)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fastbert.bench import CSV_FILES
from fastbert.bench.precompile import CompiledConfig, load_ranking, rank_configs
from tests.test_bench_peers import _load

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check():
    return _load("gpu_check")


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that compiles or runs kernels for real (not this suite's interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- the rehearsal


def test_rehearsal_writes_training_and_attention_rows_within_its_budget(tmp_path):
    out, budget = tmp_path / "out", 300
    start = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--quick", "--budget-s", str(budget),
                           "--stages", "attention", "train-base128", "--wheels", str(tmp_path / "none")],
                          env=_child_env(OUT=str(out)), cwd=ROOT, capture_output=True, text=True, timeout=budget)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - start < budget
    attention = [r for r in _rows(out / "attention.csv") if r["ms"]]
    assert {"fastbert", "fastbert-varlen", "eager"} <= {r["candidate"] for r in attention}  # eager: the CPU baseline
    train = [r for r in _rows(out / "train_step.csv") if r["ms"]]
    assert {"fastbert-ref", "hf-sdpa"} <= {r["candidate"] for r in train}  # on a CPU fastbert's model is fastbert-ref
    assert all(r["device"] == "cpu" for r in attention + train)
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("train-base128", "ok"), ("attention", "ok")]
    assert len(summary["rows"]) >= len(attention) + len(train) and summary["commit"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_check.log", "tests.log", "summary.json",
                                                            "attention.csv", "train_step.csv"])
    assert "fastbert vs baseline and best peer" in proc.stdout and "no GPU figure" in proc.stdout


# ---------------------------------------------------------------------------------------------- stage machinery


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_stage_over_its_limit_gets_the_polite_signal_then_sigkill(tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "GRACE_S", 0.5)
    stage = gc.Stage("probe", "bench", [], 1, 1, "probe")
    log = gc.Log(tmp_path / "log.txt")
    polite = _child("""
        import signal, sys, time
        def bye(*a):
            print("row written on SIGTERM", flush=True); sys.exit(3)
        signal.signal(signal.SIGTERM, bye)
        print("measuring", flush=True); time.sleep(30)
    """)
    status, dt, output = gc.run_stage(stage, polite, 0.5, log, None, tmp_path, gc.stage_env(None))
    assert status.startswith("timed out") and "measuring" in output and "row written on SIGTERM" in output
    deaf = _child("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("measuring", flush=True); time.sleep(30)
    """)
    status, dt, output = gc.run_stage(stage, deaf, 0.5, log, None, tmp_path, gc.stage_env(None))
    assert status.startswith("timed out") and "measuring" in output and 0.9 < dt < 10  # SIGKILL after the grace
    assert "[probe] measuring" in (tmp_path / "log.txt").read_text()


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_a_killed_check_leaves_no_stage_running_and_keeps_what_was_written(tmp_path):
    rows = tmp_path / "rows.csv"
    parent = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        gc = importlib.util.module_from_spec(spec); sys.modules["gpu_check"] = gc; spec.loader.exec_module(gc)
        child = [sys.executable, "-c", "import os, time; open({str(rows)!r}, 'a').write('row\\\\n'); "
                 "print('pid', os.getpid(), flush=True); time.sleep(60)"]
        stage = gc.Stage("probe", "bench", [], 60, 1, "probe")
        gc.run_stage(stage, child, 60, gc.Log(Path({str(tmp_path)!r}) / "log.txt"), None, Path({str(tmp_path)!r}),
                     gc.stage_env(None))
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=_child_env())
    line = proc.stdout.readline()
    while "pid" not in line:
        line = proc.stdout.readline()
        assert line, "the stage never started"
    pid = int(line.split("pid")[1])
    proc.send_signal(signal.SIGKILL)  # what a window that runs out does to the whole call
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while not _dead(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert _dead(pid), "the stage outlived the check"
    assert rows.read_text() == "row\n"


# ---------------------------------------------------------------------------------------------- the plan


def test_the_plan_fits_the_window_and_the_device_tools_limits(tmp_path):
    gc = _gpu_check()
    stages = gc.STAGES
    assert gc.guaranteed_s(stages) + gc.END_RESERVE_S <= gc.DEFAULT_BUDGET_S <= 600 - 60
    assert all(s.estimate_s <= s.limit_s for s in stages)
    # value order: compile ahead, ceilings, the correctness pass, then the headline benchmarks; optional ones last
    names = [s.name for s in stages]
    assert names[:7] == ["compile", "ceilings", "tests-gpu", "train-base128", "attention", "train-compile",
                         "kernels-base"]
    first_optional = next(i for i, s in enumerate(stages) if s.optional)
    assert all(s.optional for s in stages[first_optional:]) and names[first_optional] == "memcheck"
    # at most 8 files come back, none in a folder: the CSV of every family a stage runs is among them
    families = {s.args[s.args.index("--family") + 1] for s in stages if "--family" in s.args}
    assert len(gc.OUT_FILES) <= gc.MAX_OUT_FILES and {CSV_FILES[f] for f in families} <= set(gc.CSV_NAMES)
    # a smaller budget scales every limit, none below the floor; the guaranteed ones still fit a 240-s rehearsal
    small = gc.scaled(stages, 240)
    assert all(s.limit_s >= min(gc.MIN_LIMIT_S, b.limit_s) for s, b in zip(small, stages, strict=True))
    assert sum(s.limit_s for s in small if not s.optional and not s.cuda_only) + gc.END_RESERVE_S <= 240
    # the compile stage records every benchmark stage once per distinct Triton work, and the correctness pass
    argv = gc.compile_argv(stages, True, False, 3, tmp_path, 70)
    recorded = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--record"]
    benches = [s for s in stages if s.kind == "bench" and s.name != "ceilings"]
    assert len(recorded) == len(benches) and sum("pytest" in r for r in recorded) == 1  # train-compile = base128
    assert argv[argv.index("--record-timeout") + 1] == "42"
    assert gc.cpu_args(["--family", "train", "--train-cases", "base/128/256", "base/128/256/padded", "--candidates",
                        "fastbert", "hf-sdpa"]) == ["--family", "train", "--train-cases", "tiny/32/4",
                                                    "tiny/32/4/padded", "--candidates", "fastbert-ref", "fastbert",
                                                    "hf-sdpa"]


def test_test_results_are_read_from_the_stream_and_flag_their_ops():
    gc = _gpu_check()
    output = "\n".join([
        "  [tests-gpu] tests/kernels/test_attention.py::test_gpu_matches_reference[4-128] PASSED [ 10%]",
        "tests/kernels/test_bias_dropout_add_layernorm.py::test_bf16_on_gpu[full-96] FAILED [ 20%]",
        "tests/kernels/test_gpu_gaps.py::test_varlen_gradients[dtype0] ERROR [ 30%]",
        "FAILED tests/fastbert/test_fused.py::test_bf16_base_sizes_within_torch_error - AssertionError",
    ])  # fmt: skip
    outcomes = gc.test_outcomes(output)
    assert outcomes["tests/kernels/test_attention.py::test_gpu_matches_reference[4-128]"] == "PASSED"
    failed = gc.failed_ops({"tests-gpu": outcomes})
    assert sorted(failed) == ["attention", "bias_dropout_add_layernorm", "model"]
    row = dict(family="kernels", case="bias_dropout_add_layernorm", candidate="fastbert")
    assert "bias_dropout_add_layernorm" in gc.flag_of(row, failed)
    assert gc.flag_of(dict(row, case="softmax_dropout"), failed) == ""
    assert gc.flag_of(dict(row, candidate="liger"), failed) == ""  # a peer's figure is not fastbert's test
    assert "attention" in gc.flag_of(dict(family="train", case="train base/128/256", candidate="fastbert"), failed)
    refused = "========= Error: Target application terminated before first instrumented API call"
    assert gc._memcheck_status("failed (exit 1)", refused, {}).startswith("skipped: compute-sanitizer refused")
    assert gc._memcheck_status("failed (exit 97)", "", {"x": "PASSED"}).startswith("MEMCHECK ERRORS")


# ---------------------------------------------------------------------------------------------- precompile


def test_narrowing_ranks_clean_configs_by_loop_instructions_per_unit_of_work(tmp_path):
    class Config:  # triton.Config's shape, without importing Triton's compiler here
        def __init__(self, m, n, warps, stages):
            self.kwargs, self.num_warps, self.num_stages = {"BLOCK_M": m, "BLOCK_N": n}, warps, stages

    path = tmp_path / "aot.csv"
    header = ("kernel,dtype,variant,num_warps,num_stages,ok,registers,spill_bytes,shared_bytes,wgmma,mma_sync,"
              "tma_loads,ptxas_warnings,warpgroup_dup,sass_instructions,sass_loop_instructions")
    variant = "VARLEN=0 HAS_DROPOUT=1 BLOCK_D=64 BLOCK_M={} BLOCK_N={} [d=64]"
    lines = [header,
             f"k,bf16,{variant.format(128, 64)},8,3,1,168,0,1,16,0,0,0,0,1,607",  # 19 per element
             f"k,bf16,{variant.format(128, 128)},8,2,1,235,0,1,24,0,0,0,0,1,1120",  # 17.5: best
             f"k,bf16,{variant.format(64, 64)},4,3,1,130,8,1,16,0,0,0,0,1,300",  # spills: last of the compiled
             f"k,bf16,{variant.format(64, 64).replace('HAS_DROPOUT=1', 'HAS_DROPOUT=0')},4,3,1,90,0,1,16,0,0,0,0,1,9"]
    path.write_text("\n".join(lines) + "\n")
    table = load_ranking(path)
    assert isinstance(table["k", "bf16"][0], CompiledConfig)
    configs = [Config(64, 32, 4, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 2)]
    ranked = rank_configs(configs, table["k", "bf16"], {"HAS_DROPOUT": False, "BLOCK_D": 64})
    # the switch set holding most configs is read (dropout on), not the lone dropout-off row; no row: last
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in ranked] == [(128, 128), (128, 64), (64, 64), (64, 32)]


STAND_IN_DRIVER = """
import json, os, sys
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit

class StandInDriver:  # what the launch path asks of a CUDA driver before it compiles
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(StandInDriver())
import torch
from kernels.bias_gelu import bias_gelu_launch

x, b = torch.randn(300, 768, dtype=torch.bfloat16), torch.randn(768, dtype=torch.bfloat16)
"""
# A recorder as `fastbert-bench` is one: the switches from the environment, then the launcher's own calls (twice:
# the pool compiles each request once).
RECORDER = STAND_IN_DRIVER + """
from fastbert.bench.precompile import apply_from_env
apply_from_env()
for _ in range(2):
    bias_gelu_launch(x, b, "none", torch.empty_like(x), None)
"""
# The same call later, in another process, compiled for real but not launched (no GPU): a cache hit leaves the
# cache as it was.
REPLAY = STAND_IN_DRIVER + """
cache = os.environ["TRITON_CACHE_DIR"]
before = set(os.listdir(cache))
run = jit.JITFunction.run
jit.JITFunction.run = lambda self, *a, grid, warmup, **k: run(self, *a, grid=grid, warmup=True, **k)
bias_gelu_launch(x, b, "none", torch.empty_like(x), None)
print(json.dumps({"entries": len(before), "new_entries": sorted(set(os.listdir(cache)) - before)}))
"""


def test_recorded_compiles_are_compiled_ahead_and_hit_by_the_launchers_call(tmp_path):
    env = _child_env(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    recorder = json.dumps([sys.executable, "-c", RECORDER])
    proc = subprocess.run([sys.executable, "-m", "fastbert.bench.precompile", "--jobs", "1", "--record-dir",
                           str(tmp_path / "record"), "--record", recorder], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 distinct requests" in proc.stdout and "1 compiles (0 failed)" in proc.stdout, proc.stdout
    records = (tmp_path / "record" / "record-0.jsonl").read_text().splitlines()
    assert len(records) == 2 and json.loads(json.loads(records[0])["spec"])["name"].endswith("_bias_gelu_kernel")
    proc = subprocess.run([sys.executable, "-c", REPLAY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"entries": 1, "new_entries": []}
