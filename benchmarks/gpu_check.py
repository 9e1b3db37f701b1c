"""The one call a session with a lent GPU makes: what only a GPU can tell, most valuable first, each stage in its
own process under a wall-clock budget that fits one window, every row written as it is measured.

    python3 benchmarks/gpu_check.py                  # on the GPU machine, from the working tree (make gpu-check)
    python3 benchmarks/gpu_check.py --dry-run        # on a CPU: the plan and its estimates, imports, arguments
    OUT=/tmp/rehearsal python3 benchmarks/gpu_check.py --allow-cpu --quick --budget-s 240   # the CPU rehearsal

Before the call, on the CPU machine: `make gpu-wheels` (Liger-Kernel's wheel, and the commit in
`.gpu-wheels/COMMIT`: the GPU machine may get the tree without `.git`). The folder is ignored by git: name it in
the device tool's `carry`. `gpu_check` installs the wheels with `pip install --no-deps --no-index --target <tmp>`
and puts that folder first on every stage's path; without them the Liger candidates are skipped with the reason.

Stages, in order of value (`STAGES`; limits are shares of the default 540-s budget, scaled with `--budget-s`):
  compile         every Triton compile the planned stages ask for, recorded (their kernels are not run) and
                  compiled across all cores into one TRITON_CACHE_DIR kept for the whole run (fastbert.bench.precompile)
  ceilings        bf16 matmul TFLOP/s and copy GB/s of this card
  tests-gpu       the correctness pass: the GPU-marked kernel tests (bf16/fp16 against the references), then the
                  model ones; `-v`, each result written as it happens; a failure flags its op's rows below
  train-base128   the base/128/256 training step, full and padded: fastbert against transformers SDPA
  attention       fwd+bwd at B=256,T=128 and B=32,T=512 against SDPA (mask, flash, cuDNN), FA2 varlen if importable
  train-compile   the same training step against transformers SDPA + torch.compile (a cold compile: minutes)
  kernels-base    the encoder's kernels at BERT-base size with their peers (Liger, cuBLASLt)
then as time allows: memcheck (compute-sanitizer over a few kernel tests), inference (whatever the inference family
offers), train-optimize, train-base512, tests-gpu-rest (the inductor tests), train-large128, kernels-large.

Guaranteed stages get their whole limit (their limits add up to no more than the budget less a reserve); the
optional ones run on what is left. A stage over its limit gets SIGTERM (pytest: SIGINT, which makes it print its
summary) and GRACE_S seconds before SIGKILL; a crash or a CUDA fault loses that stage only, and rows measured before
it stay. First-window mode (default while benchmarks/results/ holds no CUDA row; `--first-window` / `--full-tuning`
to choose) sets FASTBERT_AUTOTUNE_TOP=3 for every stage: each autotune list cut to the 3 configs the compile-time
data ranks best (see fastbert/bench/precompile.py).

Output under $OUT (else benchmarks/results/), at most 8 files, no folder (the device tool returns 8 files of up to
16 MiB, 2 folders deep): gpu_check.log (everything printed), tests.log (the pytest stages, streamed), summary.json
(rewritten after every stage: stages, tests, rows, targets, flags) and the family CSVs attention.csv, kernels.csv,
train_step.csv, inference.csv, appended row by row as measured. With $OUT set the CUDA rows are also appended to
benchmarks/results/*.csv of this working tree. The last lines printed are the stage table, the training-step
figures, fastbert against the baseline and the best peer per case, and the DESIGN.md targets.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"  # `make gpu-wheels`; ignored by git, carried to the GPU machine
RESULTS = ROOT / "benchmarks" / "results"
CSV_NAMES = ("attention.csv", "kernels.csv", "train_step.csv", "inference.csv")
OUT_FILES = ("gpu_check.log", "tests.log", "summary.json", *CSV_NAMES)  # all that is written under $OUT
MAX_OUT_FILES, MAX_OUT_BYTES = 8, 16 * 2**20  # what the device tool brings back
FAMILIES = ("kernels", "attention", "train", "inference")  # fastbert.bench's --family values

# The budget: the device tool runs one command for at most 600 s (a window is ~15 minutes of device time, the
# machine's start included); 60 s of it stay for Python's start, the wheels, the last stage's grace and the summary.
DEFAULT_BUDGET_S = 540.0
GRACE_S = 5.0  # between the polite signal and SIGKILL
END_RESERVE_S = GRACE_S + 5.0  # kept free at the end of the budget: a last grace period and the summary
FIRST_WINDOW_TOP = 3  # configs per autotune list in first-window mode
MIN_LIMIT_S = 20.0  # the smallest stage limit a scaled-down budget gives

PY = sys.executable
BENCH = [PY, "-m", "fastbert.bench", "--rounds", "3", "--progress"]
PYTEST_PLUGINS = ["-p", "no:cacheprovider", "-p", "tests.precompile_plugin"]  # the plugin: narrowing, recording
PYTEST = [PY, "-m", "pytest", "-v", "-rA", "--tb=short", *PYTEST_PLUGINS]
# The correctness pass: kernel tests first (one op per file; the gaps file has bf16 varlen, fp16, deterministic and
# packed-QKV attention and the bf16 model with dropout), the compile-heavy GEMM tests last; then every other
# GPU-marked test (pytest collects a path named twice once). The inductor tests compile for minutes: later stage.
FIRST_TESTS = ["tests/kernels/test_gpu_gaps.py", "tests/kernels/test_attention.py",
               "tests/kernels/test_bias_dropout_add_layernorm.py", "tests/kernels/test_softmax_dropout.py",
               "tests/kernels/test_mlm_cross_entropy.py", "tests/fastbert/test_fused.py",
               "tests/fastbert/test_autocast.py", "tests/kernels/test_qkv_projection.py",
               "tests/kernels/test_linear_bias_gelu.py", "tests"]
# Under compute-sanitizer (each kernel ~10-100x slower): the d=128 one-pass backward (transposed dQ atomics), the
# bias+GELU epilogue (its bias load), varlen and LayerNorm — the places a missing mask would read or write out of
# bounds.
MEMCHECK_TESTS = ["tests/kernels/test_attention.py", "tests/kernels/test_linear_bias_gelu.py",
                  "tests/kernels/test_bias_dropout_add_layernorm.py", "-k",
                  "(test_gpu_matches_reference and 333) or test_gpu_varlen_matches_padded_bf16 or "
                  "(test_forward_backward_gpu and 1023 and dtype0 and none and cublas) or "
                  "(test_bf16_on_gpu and full-96)"]
ATTENTION_CANDIDATES = ["fastbert", "fastbert-varlen", "fastbert-varlen-deterministic", "sdpa", "sdpa-cudnn",
                        "sdpa-flash", "sdpa-flash-varlen", "flash-attn-varlen", "eager"]
# The ops with DESIGN.md targets first: a stage cut short by its limit keeps the cases it finished.
KERNEL_ARGS = ["--candidates", "fastbert", "eager", "liger", "cublaslt", "--no-compile", "--ops",
               "bias_dropout_add_layernorm", "mlm_cross_entropy", "linear_bias_gelu", "qkv_projection",
               "softmax_dropout"]
BASE128 = ["--train-cases", "base/128/256", "base/128/256/padded"]


@dataclass
class Stage:
    name: str
    kind: str  # "bench" (python -m fastbert.bench), "pytest", "memcheck" (pytest under compute-sanitizer), "compile"
    args: list[str]  # bench / pytest arguments (the compile stage builds its own)
    limit_s: float  # at the default budget; killed after this long
    estimate_s: float  # expected on an H200 (benchmarks/README.md says how each was estimated)
    what: str
    optional: bool = False  # run only on the time the guaranteed stages left
    cuda_only: bool = False  # nothing to rehearse on a CPU

    @property
    def polite_signal(self) -> int:
        return signal.SIGINT if self.kind in ("pytest", "memcheck") else signal.SIGTERM


STAGES = [
    Stage("compile", "compile", [], 70, 45, "record every Triton compile of the planned stages, compile them on all "
          "cores into the run's TRITON_CACHE_DIR"),
    Stage("ceilings", "bench", ["--ceilings-only"], 25, 8, "bf16 matmul TFLOP/s and copy GB/s of this card"),
    Stage("tests-gpu", "pytest", ["-m", "gpu", "-k", "not inductor", *FIRST_TESTS, "--durations=10"], 80, 60,
          "correctness pass: GPU kernel tests in bf16/fp16 against the references, then the model tests"),
    Stage("train-base128", "bench", ["--family", "train", *BASE128, "--candidates", "fastbert", "hf-sdpa"], 80, 28,
          "training step base/128/256 full and padded: fastbert vs transformers SDPA"),
    Stage("attention", "bench", ["--family", "attention", "--op-shapes", "base/128/256", "base/512/32", "--modes",
                                 "fwd+bwd", "--candidates", *ATTENTION_CANDIDATES, "--no-compile"], 60, 25,
          "attention fwd+bwd B=256,T=128 and B=32,T=512, h=12 d=64 bf16, padding, p=0.1: SDPA (mask, flash, cuDNN), "
          "FA2 varlen"),
    Stage("train-compile", "bench", ["--family", "train", *BASE128, "--candidates", "fastbert", "hf-sdpa",
                                     "hf-sdpa-compile"], 110, 80,
          "training step base/128/256: fastbert vs transformers SDPA + torch.compile (cold compile)", cuda_only=True),
    Stage("kernels-base", "bench", ["--family", "kernels", "--op-shapes", "base/128/256", *KERNEL_ARGS], 60, 35,
          "encoder kernels fwd/bwd/fwd+bwd at N=256x128 tokens, BERT-base, with Liger and cuBLASLt"),
    Stage("memcheck", "memcheck", ["-m", "gpu", *MEMCHECK_TESTS], 60, 40,
          "compute-sanitizer memcheck over a few kernel tests (out-of-bounds loads, stores, atomics)",
          optional=True, cuda_only=True),
    Stage("inference", "bench", ["--family", "inference"], 60, 40,
          "encoding throughput, every candidate of the inference family (sentence-transformers, optimize())",
          optional=True),
    Stage("train-optimize", "bench", ["--family", "train", *BASE128, "--candidates", "hf-sdpa", "hf-sdpa+optimize"],
          50, 30, "training step base/128/256: transformers SDPA with fastbert.optimize() vs without", optional=True),
    Stage("train-base512", "bench", ["--family", "train", "--train-cases", "base/512/32", "--candidates", "fastbert",
                                     "hf-sdpa"], 50, 25, "training step base/512/32 vs transformers SDPA",
          optional=True),
    Stage("tests-gpu-rest", "pytest", ["-m", "gpu", "-k", "inductor", "tests"], 90, 70,
          "the GPU tests left: torch.compile with inductor (compiles for minutes)", optional=True),
    Stage("train-large128", "bench", ["--family", "train", "--train-cases", "large/128/128", "--candidates",
                                      "fastbert", "hf-sdpa"], 50, 30,
          "training step large/128/128 vs transformers SDPA", optional=True),
    Stage("kernels-large", "bench", ["--family", "kernels", "--op-shapes", "large/128/256", *KERNEL_ARGS], 50, 35,
          "encoder kernels at N=256x128 tokens, BERT-large, with the peers", optional=True),
]


# ---------------------------------------------------------------------------------------------- the plan


def cpu_args(args: list[str]) -> list[str]:
    """A benchmark stage's arguments for the CPU rehearsal: tiny shapes, and the reference model beside fastbert
    in the training step (on a CPU the fused model is the reference one)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a in ("--op-shapes", "--train-cases"):
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            out += [a, "tiny/32/4"] + (["tiny/32/4/padded"] if a == "--train-cases" else [])
            i = j
            continue
        out.append(a)
        if a == "--candidates" and "train" in args and "fastbert" in args:
            out.append("fastbert-ref")
        i += 1
    return out


def scaled(stages: list[Stage], budget_s: float) -> list[Stage]:
    """The stages with their limits scaled to the budget (shares of the default budget), none under MIN_LIMIT_S
    (a process's start alone takes seconds)."""
    k = budget_s / DEFAULT_BUDGET_S
    return [replace(s, limit_s=max(min(MIN_LIMIT_S, s.limit_s), round(s.limit_s * k, 1))) for s in stages]


def guaranteed_s(stages: list[Stage]) -> float:
    return sum(s.limit_s for s in stages if not s.optional)


def earlier_gpu_results() -> bool:
    """Whether benchmarks/results/ holds a row measured on CUDA (then full tuning is the default)."""
    for name in CSV_NAMES:
        path = RESULTS / name
        if path.exists():
            with open(path, encoding="utf-8", newline="") as f:
                if any(r.get("device") == "cuda" for r in csv.DictReader(f)):
                    return True
    return False


# ---------------------------------------------------------------------------------------------- environment


def install_wheels(folder: Path, target: Path, log) -> tuple[str, list[str]]:
    """Install every wheel of `folder` into `target` (no index, no dependencies: the image has them) and put
    `target` first on this process's path; returns (status, wheel names). A missing or empty folder is not an
    error: the peers that need its packages are then skipped, each with its reason."""
    wheels = sorted(glob.glob(str(folder / "*.whl")))
    if not wheels:
        return f"no wheels in {folder.name}/ (run `make gpu-wheels` where there is network, carry the folder)", []
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
           "--disable-pip-version-check", "--target", str(target), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    names = [Path(w).name for w in wheels]
    if proc.returncode != 0:
        log(proc.stdout + proc.stderr)
        return f"pip install failed (exit {proc.returncode})", names
    sys.path.insert(0, str(target))
    return "ok", names


def stage_env(site: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    parts = [str(site)] if site is not None else []
    parts += [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


class Log:
    """Print and keep a copy in the log file, flushed line by line (a killed run keeps what it printed); the file
    stops growing below the device tool's size limit."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")
        self.room = MAX_OUT_BYTES - 2**20 - (path.stat().st_size if path.exists() else 0)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.room > 0:
            self.room -= len(line.encode("utf-8", "replace")) + 1
            self.f.write(line + "\n")
            self.f.flush()


def _die_with_parent() -> None:
    """In a stage's process before exec: SIGKILL when gpu_check dies (Linux prctl PR_SET_PDEATHSIG), so a killed
    check leaves no stage running on."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def run_stage(stage: Stage, argv: list[str], timeout_s: float, log: Log, tests_log, tmp: Path,
              env: dict[str, str]) -> tuple[str, float, str]:
    """Run one stage in its own process group, echoing its output as it comes; returns (status, seconds, output).

    The output goes through a file, not a pipe: a grandchild that outlives a killed stage (a compile worker, say)
    cannot keep this loop waiting for the pipe to close. Over its limit the stage gets its polite signal, then
    SIGKILL after GRACE_S."""
    out_path = tmp / f"{stage.name}.out"
    t0 = time.time()
    with open(out_path, "w") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    timed_out, killed_at = False, None
    pending, text = "", []
    with open(out_path, encoding="utf-8", errors="replace") as src:
        while True:
            rc = proc.poll()
            now = time.time()
            if rc is None and not timed_out and now - t0 > timeout_s:
                timed_out, killed_at = True, now
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, stage.polite_signal)  # the stage's own process group only
            if rc is None and killed_at is not None and now - killed_at > GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            pending += src.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                text.append(line)
                log(f"  [{stage.name}] {line}")
                if tests_log is not None and stage.kind in ("pytest", "memcheck"):
                    tests_log.write(line + "\n")
                    tests_log.flush()
            if rc is not None:
                if pending:
                    text.append(pending)
                    log(f"  [{stage.name}] {pending}")
                break
            time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group (compile workers) go with it
        os.killpg(proc.pid, signal.SIGKILL)
    dt = time.time() - t0
    output = "\n".join(text)
    if timed_out:
        return f"timed out after {timeout_s:.0f} s", dt, output
    if rc == 0:
        return "ok", dt, output
    if stage.kind == "pytest" and rc == 5:
        return "no tests collected", dt, output
    return f"failed (exit {rc})", dt, output


# ---------------------------------------------------------------------------------------------- the commands


def bench_argv(stage: Stage, cuda: bool, tmp: Path, out: Path, quick: bool) -> list[str]:
    args = stage.args if cuda else cpu_args(stage.args)
    argv = BENCH + args + ["--ceilings-json", str(tmp / "ceilings.json"), "--json", str(tmp / f"{stage.name}.json"),
                           "--csv-dir", str(out)]
    return argv + (["--quick"] if quick else [])


def compute_sanitizer() -> str | None:
    """compute-sanitizer's path: on PATH, under $CUDA_HOME/bin or /usr/local/cuda/bin; None when absent."""
    for path in (shutil.which("compute-sanitizer"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                 "bin", "compute-sanitizer")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def memcheck_argv(stage: Stage, sanitizer: str) -> list[str]:
    return [sanitizer, "--tool", "memcheck", "--error-exitcode", "97", "--print-limit", "20",
            "--target-processes", "all", *PYTEST, *stage.args]


def compile_argv(planned: list[Stage], cuda: bool, quick: bool, top: int | None, tmp: Path,
                 limit_s: float) -> list[str]:
    """The compile stage: on CUDA, record the planned benchmark stages and the correctness pass and compile what
    they ask for (recorders still running after 60% of the stage's limit are stopped, so that what they recorded is
    compiled in time); on a CPU (rehearsal), compile for sm_90 what the headline cases use (kernels.aot_check's
    variants; `--quick`: the first 6)."""
    argv = [PY, "-m", "fastbert.bench.precompile", "--jobs", str(os.cpu_count() or 1)]
    if not cuda:
        return argv + ["--aot"] + (["--top", str(top)] if top else []) + (["--limit", "6"] if quick else [])
    sys.path.insert(0, str(ROOT))
    from fastbert.bench.cli import runs_triton

    argv += ["--record-dir", str(tmp / "record"), "--record-timeout", f"{0.6 * limit_s:.0f}"]
    seen = set()
    for s in planned:
        if s.kind == "bench" and s.name != "ceilings":
            # one recorder per distinct Triton work: train-compile's fastbert is train-base128's
            key = tuple(a for a in s.args if a.startswith("-") or "/" in a or a in FAMILIES or runs_triton(a))
            if key not in seen:
                seen.add(key)
                argv += ["--record", json.dumps(BENCH + s.args + ["--csv-dir", ""] + (["--quick"] if quick else []))]
        elif s.name == "tests-gpu":
            argv += ["--record", json.dumps([PY, "-m", "pytest", "-q", "--tb=no", *PYTEST_PLUGINS, *s.args])]
    return argv


# ---------------------------------------------------------------------------------------------- test results

_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+::\S+)")


def test_outcomes(output: str) -> dict[str, str]:
    """nodeid → outcome, from pytest's `-v` lines and its `-rA` summary (whichever a killed run got to print)."""
    got: dict[str, str] = {}
    for line in output.splitlines():
        line = re.sub(r"^\s*\[[\w-]+\]\s", "", line).strip()
        if m := _TEST_LINE.match(line):
            got[m.group(1)] = m.group(2)
        elif m := _SUMMARY_LINE.match(line):
            got.setdefault(m.group(2), m.group(1))
    return got


def op_of(nodeid: str) -> str:
    """The op a GPU test checks: the kernel of its file (test_<op>.py), "attention" for the attention files and the
    attention gaps, "model" for the model and everything else."""
    sys.path.insert(0, str(ROOT))
    from fastbert.bench.kernel_cases import KERNEL_OPS

    path, _, test = nodeid.partition("::")
    stem = Path(path).stem.removeprefix("test_")
    if stem.startswith("attention") or (stem == "gpu_gaps" and "model" not in test):
        return "attention"
    if path.startswith("tests/kernels/") and stem in KERNEL_OPS:
        return stem
    return "model"


def failed_ops(tests: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """op → the failing tests (FAILED or ERROR) of every pytest stage."""
    out: dict[str, list[str]] = {}
    for outcomes in tests.values():
        for nodeid, outcome in outcomes.items():
            if outcome in ("FAILED", "ERROR"):
                out.setdefault(op_of(nodeid), []).append(nodeid)
    return out


def flag_of(row: dict, failed: dict[str, list[str]]) -> str:
    """Why a row's figure is not backed by a passing GPU test: its op's tests failed (fastbert's candidates only;
    a model-level row by any failure, since the model uses every kernel)."""
    cand = row.get("candidate", "")
    if not (cand.startswith("fastbert") or "optimize" in cand) or not failed:
        return ""
    fam = row.get("family")
    ops = sorted(failed) if fam in ("train", "inference") else [
        op for op in failed if (fam == "attention" and op == "attention") or (fam == "kernels" and op == row["case"])]
    return f"UNVERIFIED: GPU tests failed for {', '.join(ops)}" if ops else ""


# ---------------------------------------------------------------------------------------------- targets


def _find(rows, family, candidate, mode, *, case=None, size=None, shape_prefix=None, run_id=None):
    for r in rows:
        if r["family"] != family or r["candidate"] != candidate or r["mode"] != mode or r.get("ms") in (None, ""):
            continue
        if case is not None and r["case"] != case:
            continue
        if size is not None and r["size"] != size:
            continue
        if shape_prefix is not None and not r["shape"].startswith(shape_prefix):
            continue
        if run_id is not None and r.get("run_id") != run_id:
            continue
        return r
    return None


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return float(a[key]) / float(b[key])


def targets(rows: list[dict], ceil_gbps: float | None) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured value, how it reads, passed) for each DESIGN.md target; a ratio is taken within one run
    (one stage) where the rows allow it."""
    out = []

    def add(name, value, op, limit, fmt):
        passed = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append((name, value, f"{fmt.format(value) if value is not None else 'n/a'} (need {op} {limit})", passed))

    for B, T in ((256, 128), (32, 512)):
        sdpa = _find(rows, "attention", "sdpa", "fwd+bwd", shape_prefix=f"B={B} T={T} ")
        fused = _find(rows, "attention", "fastbert", "fwd+bwd", shape_prefix=f"B={B} T={T} ")
        varlen = _find(rows, "attention", "fastbert-varlen", "fwd+bwd", shape_prefix=f"B={B} T={T} ")
        add(f"attention fused / SDPA-mask time, B={B} T={T}", _ratio(fused, sdpa, "ms"), "<=", 0.9, "{:.2f}x")
        add(f"attention varlen / SDPA-mask time, B={B} T={T}", _ratio(varlen, sdpa, "ms"), "<=", 0.6, "{:.2f}x")
    ln = "bias_dropout_add_layernorm"
    ln_f = _find(rows, "kernels", "fastbert", "fwd", case=ln, size="base")
    bw = float(ln_f["gbps"]) / ceil_gbps if ln_f and ln_f.get("gbps") and ceil_gbps else None
    add("LayerNorm fwd bandwidth / copy ceiling (base)", bw, ">=", 0.8, "{:.0%}")
    add("LayerNorm fwd+bwd speed-up vs eager (base)",
        _ratio(_find(rows, "kernels", "eager", "fwd+bwd", case=ln, size="base"),
               _find(rows, "kernels", "fastbert", "fwd+bwd", case=ln, size="base"), "ms"), ">=", 2.0, "{:.2f}x")
    mlm_e = _find(rows, "kernels", "eager", "fwd+bwd", case="mlm_cross_entropy", size="base")
    mlm_f = _find(rows, "kernels", "fastbert", "fwd+bwd", case="mlm_cross_entropy", size="base")
    add("MLM CE fwd+bwd speed-up vs eager (base)", _ratio(mlm_e, mlm_f, "ms"), ">=", 2.0, "{:.2f}x")
    add("MLM CE memory: eager extra / fused extra (base)", _ratio(mlm_e, mlm_f, "extra_GB"), ">=", 4.0, "{:.1f}x")
    case = "train base/128/256"
    comp = _find(rows, "train", "hf-sdpa-compile", "step", case=case)
    fb = (comp and _find(rows, "train", "fastbert", "step", case=case, run_id=comp.get("run_id"))) or _find(
        rows, "train", "fastbert", "step", case=case)
    add("train base/128/256 seq/s vs HF SDPA+compile", _ratio(fb, comp, "seq_per_s"), ">=", 1.5, "{:.2f}x")
    add("train base/128/256 peak memory / HF SDPA", _ratio(fb, _find(rows, "train", "hf-sdpa", "step", case=case),
                                                           "peak_GB"), "<=", 0.6, "{:.2f}x")
    return out


def train_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["family"] == "train" and r.get("ms") not in (None, ""):
            mfu = f"{100 * float(r['mfu']):.1f}%" if r.get("mfu") else "-"
            peak = f"{float(r['peak_GB']):.1f} GB" if r.get("peak_GB") else "-"
            lines.append(f"  {r['case']:<28} {r['candidate']:<16} {float(r['seq_per_s']):>8.0f} seq/s  "
                         f"MFU {mfu:>6}  peak {peak:>8}  warm {float(r['warm_s'] or 0):.0f} s"
                         + (f"  {r['flag']}" if r.get("flag") else ""))
    return lines


def peer_lines(rows: list[dict]) -> list[str]:
    """fastbert against the baseline and the best peer, per measured case (the headline modes only)."""
    sys.path.insert(0, str(ROOT))
    from fastbert.bench.peers import is_peer

    lines, seen = [], set()
    for r in rows:
        if r.get("ms") in (None, "") or not r["candidate"].startswith("fastbert") or r["candidate"] == "fastbert-ref":
            continue
        if r["mode"] not in ("fwd+bwd", "step") and not (r["family"] == "inference" and r["mode"] == "fwd"):
            continue
        same = [x for x in rows if x["family"] == r["family"] and x["case"] == r["case"] and x["size"] == r["size"]
                and x["mode"] == r["mode"] and x.get("ms") not in (None, "")]
        peers = [x for x in same if is_peer(x["family"], x["candidate"])]
        best = min(peers, key=lambda x: float(x["ms"])) if peers else None
        key = (r["family"], r["case"], r["size"], r["candidate"])
        if key in seen:
            continue
        seen.add(key)
        base = f"{float(r['speedup']):.2f}x {r['baseline']}" if r.get("speedup") else "-"
        peer = f"{float(best['ms']) / float(r['ms']):.2f}x {best['candidate']}" if best else "no peer measured"
        case = r["case"] if r["family"] in ("train", "inference") else f"{r['case']} {r['size']}"
        lines.append(f"  {case:<40} {r['candidate']:<16} {float(r['ms']):9.3f} ms  vs base {base:<26} "
                     f"vs best peer {peer}" + (f"  {r['flag']}" if r.get("flag") else ""))
    return lines


# ---------------------------------------------------------------------------------------------- results


def append_results(out: Path, log) -> None:
    """$OUT's CSV rows measured on CUDA appended to benchmarks/results/ of this working tree (header once), when
    the two folders differ (a --allow-cpu run's rows stay under $OUT: CPU figures are no results)."""
    if out.resolve() == RESULTS.resolve():
        return
    sys.path.insert(0, str(ROOT))
    from fastbert.bench import append_csv

    for name in CSV_NAMES:
        src = out / name
        if src.exists():
            with open(src, encoding="utf-8", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("device") == "cuda"]
            if rows:
                log(f"appended {len(rows)} rows to {append_csv(RESULTS / name, rows)}")


@dataclass
class Run:
    """What the run has gathered so far: written to summary.json after every stage."""

    out: Path
    tmp: Path
    meta: dict
    stages: list[dict] = field(default_factory=list)
    tests: dict[str, dict[str, str]] = field(default_factory=dict)  # pytest stage → nodeid → outcome

    def rows(self) -> tuple[list[dict], dict]:
        rows, ceil = [], {}
        for s in STAGES:
            p = self.tmp / f"{s.name}.json"
            if p.exists():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    d = json.loads(p.read_text())
                    rows += d["rows"]
                    if d.get("ceil_tflops"):
                        ceil = ceil or {k: d.get(k) for k in ("gpu", "ceil_tflops", "ceil_gbps", "versions", "commit")}
        failed = failed_ops(self.tests)
        for r in rows:
            r["flag"] = flag_of(r, failed)
        return rows, ceil

    def write_summary(self) -> dict:
        sys.path.insert(0, str(ROOT))
        from fastbert._atomic import write_text_atomic

        rows, ceil = self.rows()
        tests = {name: {"counts": {k: sum(v == k for v in o.values()) for k in sorted(set(o.values()))},
                        "failed": sorted(n for n, v in o.items() if v in ("FAILED", "ERROR"))}
                 for name, o in self.tests.items()}
        summary = {**self.meta, "ceilings": ceil, "stages": self.stages, "tests": tests,
                   "failed_ops": failed_ops(self.tests),
                   "targets": [dict(target=n, value=v, reading=r, passed=p) for n, v, r, p in
                               targets(rows, ceil.get("ceil_gbps"))], "rows": rows}
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary


def print_summary(summary: dict, log) -> None:
    ceil, rows = summary["ceilings"], summary["rows"]
    log("\n================ gpu_check summary ================")
    if ceil:
        vers = ", ".join(f"{k} {v}" for k, v in (ceil.get("versions") or {}).items())
        log(f"{ceil.get('gpu')}: bf16 matmul {ceil.get('ceil_tflops') or 0:.0f} TFLOP/s, "
            f"copy {ceil.get('ceil_gbps') or 0:.0f} GB/s; {vers}; commit {summary['commit']}")
    log(f"autotuning: {summary['autotuning']}; compile cache: {summary['triton_cache']}")
    for line in summary.get("compile", []):
        log(f"  {line}")
    for s in summary["stages"]:
        log(f"  stage {s['name']:<15} {s['status']:<44} {s['seconds']:5.0f} s")
    for name, t in summary["tests"].items():
        log(f"  {name}: " + ", ".join(f"{v} {k.lower()}" for k, v in t["counts"].items()))
        for nodeid in t["failed"]:
            log(f"    FAILED {nodeid}")
    if tl := train_lines(rows):
        log("training step:")
        for line in tl:
            log(line)
    if pl := peer_lines(rows):
        log("fastbert vs baseline and best peer (time ratio: > 1 = fastbert faster):")
        for line in pl:
            log(line)
    log("targets (DESIGN.md):")
    for t in summary["targets"]:
        mark = "n/a " if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        log(f"  {mark}  {t['target']:<50} {t['reading']}")


def check_outputs(out: Path, log) -> None:
    """Say whether $OUT fits what the device tool returns (8 files of 16 MiB, no deeper than 2 folders)."""
    files = [p for p in out.rglob("*") if p.is_file()]
    big = [p.name for p in files if p.stat().st_size > MAX_OUT_BYTES]
    log(f"files in {out}: {len(files)} (" + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in files)
        + ")" + (f"; WARNING: more than {MAX_OUT_FILES}" if len(files) > MAX_OUT_FILES else "")
        + (f"; WARNING: over 16 MiB: {big}" if big else ""))


# ---------------------------------------------------------------------------------------------- dry run


def _check_k(expression: str) -> str:
    """'' when pytest can parse the -k expression, else why not."""
    try:
        from _pytest.mark.expression import Expression
    except ImportError:  # a pytest without that module: collection will tell
        return ""
    try:
        Expression.compile(expression)
    except Exception as e:
        return f"-k {expression!r}: {e}"
    return ""


def dry_run(stages: list[Stage], budget_s: float, site: Path | None, log, collect: bool = True) -> int:
    """The plan (limits, estimates, what is guaranteed); every benchmark stage's arguments parsed and its candidates
    listed as a run on CUDA would take them (every case builder runs, so every import happens), the first one also
    through `python -m fastbert.bench` in a child with the stages' path; the recording commands parsed; the pytest
    stages' -k expressions parsed and the GPU tests collected once. Returns the number of failures."""
    sys.path.insert(0, str(ROOT))
    from fastbert.bench.cli import main as bench_main

    failures = 0
    log(f"plan for a budget of {budget_s:.0f} s: guaranteed stage limits add up to {guaranteed_s(stages):.0f} s "
        f"(+ {END_RESERVE_S:.0f} s reserve), estimates {sum(s.estimate_s for s in stages if not s.optional):.0f} s; "
        "optional stages run on what is left")
    child = next((s for s in stages if s.kind == "bench" and "liger" in s.args),
                 next((s for s in stages if s.kind == "bench"), None))
    for stage in stages:
        log(f"== {stage.name}: limit {stage.limit_s:.0f} s, estimate {stage.estimate_s:.0f} s"
            f"{' (optional)' if stage.optional else ''}: {stage.what}")
        rc = 0
        if stage.kind == "bench":
            rc = bench_main(stage.args + ["--dry-run", "--device", "cuda"])
            if rc == 0 and stage is child:
                proc = subprocess.run(BENCH + stage.args + ["--dry-run", "--device", "cuda"], cwd=ROOT,
                                      env=stage_env(site), capture_output=True, text=True, timeout=300)
                rc = proc.returncode
                log(f"  (python -m fastbert.bench in a child process: exit {rc})")
                if rc:
                    log(proc.stdout[-2000:] + proc.stderr[-2000:])
        elif stage.kind in ("pytest", "memcheck"):
            k = stage.args[stage.args.index("-k") + 1] if "-k" in stage.args else ""
            missing = [a for a in stage.args if a.startswith("tests") and not (ROOT / a).exists()]
            for why in ([_check_k(k)] if k else []) + [f"no such test path: {a}" for a in missing]:
                if why:
                    log(f"  {why}")
                    rc = 1
            if stage.kind == "memcheck":
                log(f"  compute-sanitizer here: {compute_sanitizer() or 'absent (the stage will be skipped)'}")
        elif stage.kind == "compile":
            argv = compile_argv(stages, True, False, FIRST_WINDOW_TOP, Path(tempfile.gettempdir()), stage.limit_s)
            log(f"  records {argv.count('--record')} commands (the benchmark stages and the correctness pass)")
        if rc:
            failures += 1
            log(f"  FAILED: exit {rc}")
    if not collect:
        log("pytest collection skipped (--no-collect)")
    else:
        proc = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *PYTEST_PLUGINS, "tests"],
                              cwd=ROOT, env=stage_env(site), capture_output=True, text=True, timeout=300)
        tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
        log(f"pytest --collect-only -m gpu tests: exit {proc.returncode}: {tail[0]}")
        if proc.returncode:
            failures += 1
            log(proc.stdout[-2000:] + proc.stderr[-2000:])
    return failures


# ---------------------------------------------------------------------------------------------- main


def _stage_timeout(stage: Stage, stages: list[Stage], i: int, deadline: float, cuda: bool) -> float:
    """What a stage may use now: its limit, less what the guaranteed stages after it that run here are owed."""
    left = deadline - time.time() - END_RESERVE_S
    owed = sum(s.limit_s for s in stages[i + 1:] if not s.optional and (cuda or not s.cuda_only))
    return min(stage.limit_s, left - (owed if not stage.optional else 0.0))


def _stage_argv(stage: Stage, stages: list[Stage], cuda: bool, args, top: int | None, tmp: Path, out: Path,
                timeout_s: float) -> list[str] | str:
    """The command of a stage, or why it does not run here."""
    if stage.cuda_only and not cuda:
        return "skipped: CUDA only (nothing to rehearse on a CPU)"
    if stage.kind == "bench":
        return bench_argv(stage, cuda, tmp, out, args.quick)
    if stage.kind == "pytest":
        return PYTEST + stage.args
    if stage.kind == "memcheck":
        sanitizer = compute_sanitizer()
        return memcheck_argv(stage, sanitizer) if sanitizer else "skipped: compute-sanitizer not found"
    return compile_argv(stages, cuda, args.quick, top, tmp, timeout_s)


def _memcheck_status(status: str, output: str, outcomes: dict[str, str]) -> str:
    """What a memcheck stage's exit means: a refused device (no test ran) is a skip with its reason."""
    if status.startswith("failed (exit 97"):
        return "MEMCHECK ERRORS (see tests.log)"
    if status.startswith("failed") and not outcomes:
        why = next((ln.strip() for ln in output.splitlines() if "=========" in ln and "rror" in ln),
                   "no test ran under compute-sanitizer")
        return f"skipped: compute-sanitizer refused: {why[:120]}"
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of the whole call "
                    "(default 540: the device tool's 600-s command limit less a minute)")
    ap.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmark stages (smoke run)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA: the rehearsal of this script")
    tuning = ap.add_mutually_exclusive_group()
    tuning.add_argument("--first-window", action="store_true", help=f"autotune lists cut to the {FIRST_WINDOW_TOP} "
                        "configs ranked best by compile-time data (default while no CUDA row is in results/)")
    tuning.add_argument("--full-tuning", action="store_true", help="every autotune config (default once a CUDA row "
                        "is in benchmarks/results/)")
    ap.add_argument("--dry-run", action="store_true", help="the plan, every import and argument, the wheels into a "
                    "throw-away folder; measure nothing (runs on a CPU)")
    ap.add_argument("--no-collect", action="store_true", help="with --dry-run: do not collect the GPU tests")
    ap.add_argument("--wheels", type=Path, default=WHEELS, help="folder of wheels to install first (.gpu-wheels)")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    stages = [s for s in scaled(STAGES, args.budget_s) if not args.stages or s.name in args.stages]
    out = Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log = Log(out / "gpu_check.log") if not args.dry_run else Log(tmp / "dry_run.log")
    site = tmp / "site"
    wheel_status, wheels = install_wheels(args.wheels, site, log)
    site_used = site if wheel_status == "ok" else None
    log(f"gpu_check: budget {args.budget_s:.0f} s, results in {out}; wheels: {wheel_status}"
        + (f" ({', '.join(wheels)})" if wheels else ""))
    if args.dry_run:
        failures = dry_run(stages, args.budget_s, site_used, log, collect=not args.no_collect)
        log(f"\ndry run: {len(stages)} stages, {failures} failed; {time.time() - t_start:.0f} s")
        return 1 if failures or wheel_status.startswith("pip install failed") else 0
    try:
        import torch

        cuda = torch.cuda.is_available()
        if not cuda and not args.allow_cpu:
            log("no CUDA device here: the stages would measure a CPU. Nothing to do (run it on a GPU machine).")
            return 1
        gpu = torch.cuda.get_device_name() if cuda else "CPU (--allow-cpu: a rehearsal, no GPU figure)"
        log(f"device: {gpu}; torch {torch.__version__}")
    except Exception as e:  # torch itself broken: say so, stop
        log(f"cannot import torch: {e}")
        return 1

    sys.path.insert(0, str(ROOT))
    from fastbert.bench.timing import commit_source

    commit, commit_from = commit_source()
    if commit == "unknown":
        log(f"WARNING: commit unknown: {commit_from}")
    first_window = args.first_window or (not args.full_tuning and not earlier_gpu_results())
    top = FIRST_WINDOW_TOP if first_window else None
    cache = os.environ.get("TRITON_CACHE_DIR") or str(tmp / "triton-cache")
    extra = {"TRITON_CACHE_DIR": cache, "FASTBERT_COMMIT": commit}
    if top:
        extra["FASTBERT_AUTOTUNE_TOP"] = str(top)
    env = stage_env(site_used, extra)
    tuning_note = (f"first window: each autotune list cut to the {top} configs ranked best by compile-time data"
                   if top else "full: every autotune config")
    log(f"commit {commit} ({commit_from}); autotuning {tuning_note}; TRITON_CACHE_DIR={cache}")
    run = Run(out, tmp, {"device": gpu, "commit": commit, "commit_from": commit_from, "autotuning": tuning_note,
                         "triton_cache": cache, "budget_s": args.budget_s,
                         "wheels": {"status": wheel_status, "files": wheels}})
    tests_log = open(out / "tests.log", "a", encoding="utf-8")
    for i, stage in enumerate(stages):
        timeout = _stage_timeout(stage, stages, i, deadline, cuda)
        command = _stage_argv(stage, stages, cuda, args, top, tmp, out, timeout)
        if isinstance(command, str) or timeout < min(10.0, stage.limit_s):
            status = command if isinstance(command, str) else f"skipped: {max(timeout, 0):.0f} s left"
            log(f"== {stage.name}: {status}")
            run.stages.append(dict(name=stage.name, status=status, seconds=0.0))
            continue
        log(f"== {stage.name} (limit {timeout:.0f} s): {stage.what}")
        # memcheck: every allocation its own, so compute-sanitizer sees the bounds of each tensor
        stage_environ = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1") if stage.kind == "memcheck" else env
        try:
            status, dt, output = run_stage(stage, command, timeout, log, tests_log, tmp, stage_environ)
        except Exception as e:  # could not even start it
            status, dt, output = f"error: {e}", 0.0, ""
        if stage.kind == "compile":
            run.meta["compile"] = [ln.strip() for ln in output.splitlines() if ln.startswith("precompile:")]
        if stage.kind in ("pytest", "memcheck"):
            run.tests[stage.name] = test_outcomes(output)
            if stage.kind == "memcheck":
                status = _memcheck_status(status, output, run.tests[stage.name])
        run.stages.append(dict(name=stage.name, status=status, seconds=round(dt, 1)))
        log(f"== {stage.name}: {status} in {dt:.0f} s")
        try:
            run.write_summary()
        except Exception as e:  # the rows are in the CSVs anyway
            log(f"warning: could not write summary.json: {e}")
    tests_log.close()
    run.meta["wall_s"] = round(time.time() - t_start, 1)
    summary = run.write_summary()
    if cuda:
        try:
            append_results(out, log)
        except Exception as e:  # the figures are under $OUT anyway
            log(f"warning: could not append to {RESULTS}: {e}")
    print_summary(summary, log)
    check_outputs(out, log)
    log(f"total {time.time() - t_start:.0f} s of a {args.budget_s:.0f}-s budget; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
