"""The one call a session with a lent GPU makes: GPU tests, headline benchmarks, pass/fail against DESIGN.md.

    PYTHONPATH=. python benchmarks/gpu_check.py            # or: make gpu-check
    PYTHONPATH=. python benchmarks/gpu_check.py --budget-s 300 --stages attention train-base128

Stages run one after another, each in its own process with its own time limit, so a hang, a crash or a
CUDA fault loses that stage only; when the wall-clock budget (default 480 s) runs short the remaining
stages are skipped and said so. Order: device ceilings, attention, GPU-marked tests, the base/128 training
step, the kernels at BERT-base size, base/512, all kernel tests compiled, the kernels at BERT-large size.

Output goes under $OUT when set, else benchmarks/results/ (at most 8 files, as the device tool returns):
gpu_check.log (everything printed), summary.json (stages, rows, targets), tests.log (pytest output) and
the appended attention.csv, kernels.csv, train_step.csv. A short table of stages and targets is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Attention shapes of the DESIGN.md anchors and the kernels' token count (N = 256 × 128).
BENCH = [sys.executable, "-m", "fastbert.bench", "--rounds", "3", "--progress"]
FUSED_VS_SDPA = ["--candidates", "fastbert", "fastbert-varlen", "eager", "sdpa", "--no-compile"]
TRAIN_CANDIDATES = ["--candidates", "fastbert", "hf-sdpa", "hf-sdpa-compile"]
# The ops with DESIGN.md targets first: a stage cut short by its limit keeps the cases it finished.
KERNEL_CANDIDATES = ["--candidates", "fastbert", "eager", "compile", "--ops", "bias_dropout_add_layernorm",
                     "mlm_cross_entropy", "linear_bias_gelu", "qkv_projection", "softmax_dropout"]


@dataclass
class Stage:
    name: str
    limit_s: int  # the stage is killed after this long
    min_s: int  # not started with less budget left than this
    argv: list[str]  # benchmark stages get --ceilings-json, --json and --csv-dir appended
    what: str


STAGES = [
    Stage("ceilings", 60, 15, BENCH + ["--ceilings-only"],
          "bf16 matmul TFLOP/s and copy GB/s of this card"),
    Stage("attention", 120, 40, BENCH + ["--family", "attention", "--op-shapes", "base/128/256", "base/512/32",
                                         "--modes", "fwd+bwd", *FUSED_VS_SDPA],
          "attention fwd+bwd B=256,T=128 and B=32,T=512, h=12 d=64 bf16, padded, p=0.1"),
    Stage("tests-gpu", 120, 40, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests",
                                 "-p", "no:cacheprovider", "--durations=10"],
          "pytest -m gpu tests/ (bf16 and compiled-only tests)"),
    Stage("train-base128", 210, 90, BENCH + ["--family", "train", "--train-cases", "base/128/256",
                                             "base/128/256/padded", *TRAIN_CANDIDATES],
          "training step base/128/256 full and padded vs transformers SDPA (+compile)"),
    Stage("kernels-base", 150, 60, BENCH + ["--family", "kernels", "--op-shapes", "base/128/256",
                                            *KERNEL_CANDIDATES],
          "encoder kernels fwd/bwd/fwd+bwd at N=256x128 tokens, BERT-base"),
    Stage("train-base512", 150, 80, BENCH + ["--family", "train", "--train-cases", "base/512/32",
                                             *TRAIN_CANDIDATES],
          "training step base/512/32 vs transformers SDPA (+compile)"),
    Stage("tests-kernels", 180, 45, [sys.executable, "-m", "pytest", "-q", "tests/kernels", "-m", "not gpu",
                                     "-p", "no:cacheprovider", "--durations=10"],
          "every kernel test compiled on CUDA (the gpu-marked ones ran above)"),
    Stage("kernels-large", 150, 60, BENCH + ["--family", "kernels", "--op-shapes", "large/128/256",
                                             *KERNEL_CANDIDATES],
          "encoder kernels at N=256x128 tokens, BERT-large"),
]


class Log:
    """Print and keep a copy in the log file, flushed line by line (a killed run keeps what it printed)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def run_stage(stage: Stage, argv: list[str], timeout_s: float, log: Log, tests_log, tmp: Path) -> tuple[str, float]:
    """Run one stage in its own process group, echoing its output as it comes; returns (status, seconds).

    The output goes through a file, not a pipe: a grandchild that outlives a killed stage (a compile
    worker, say) cannot keep this loop waiting for the pipe to close."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out_path = tmp / f"{stage.name}.out"
    t0 = time.time()
    with open(out_path, "w") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    timed_out = False
    pending = ""
    with open(out_path, encoding="utf-8", errors="replace") as src:
        while True:
            rc = proc.poll()
            if rc is None and time.time() - t0 > timeout_s:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group only
                except ProcessLookupError:
                    pass
                rc = proc.wait()
            pending += src.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                log(f"  [{stage.name}] {line}")
                if tests_log is not None and stage.name.startswith("tests"):
                    tests_log.write(line + "\n")
                    tests_log.flush()
            if rc is not None:
                if pending:
                    log(f"  [{stage.name}] {pending}")
                break
            time.sleep(0.5)
    dt = time.time() - t0
    if timed_out:
        return f"timed out after {timeout_s:.0f} s", dt
    if rc == 0:
        return "ok", dt
    if stage.name.startswith("tests") and rc == 5:
        return "no tests collected", dt
    return f"failed (exit {rc})", dt


# ---------------------------------------------------------------------------------------------- targets


def _find(rows, family, candidate, mode, *, case=None, size=None, shape_prefix=None):
    for r in rows:
        if r["family"] != family or r["candidate"] != candidate or r["mode"] != mode or r.get("ms") in (None, ""):
            continue
        if case is not None and r["case"] != case:
            continue
        if size is not None and r["size"] != size:
            continue
        if shape_prefix is not None and not r["shape"].startswith(shape_prefix):
            continue
        return r
    return None


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return float(a[key]) / float(b[key])


def targets(rows: list[dict], ceil_gbps: float | None) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured value, how it reads, passed) for each DESIGN.md target."""
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
    fb = _find(rows, "train", "fastbert", "step", case=case)
    add("train base/128/256 seq/s vs HF SDPA+compile", _ratio(fb, _find(rows, "train", "hf-sdpa-compile", "step",
                                                                        case=case), "seq_per_s"), ">=", 1.5, "{:.2f}x")
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
                         f"MFU {mfu:>6}  peak {peak:>8}  warm {float(r['warm_s'] or 0):.0f} s")
    return lines


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all stages")
    ap.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmark stages (smoke run)")
    ap.add_argument("--allow-cpu", action="store_true", help="run even without CUDA (to test this script)")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ceil_path = tmp / "ceilings.json"
    log(f"gpu_check: budget {args.budget_s:.0f} s, results in {out}")
    try:
        import torch

        if not torch.cuda.is_available() and not args.allow_cpu:
            log("no CUDA device here: the stages would measure a CPU. Nothing to do (run it on a GPU machine).")
            return 1
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (--allow-cpu)"
        log(f"device: {gpu}; torch {torch.__version__}")
    except Exception as e:  # torch itself broken: say so, stop
        log(f"cannot import torch: {e}")
        return 1

    statuses: list[tuple[str, str, float, str]] = []
    tests_log = open(out / "tests.log", "a", encoding="utf-8")
    for stage in STAGES:
        if args.stages and stage.name not in args.stages:
            continue
        left = deadline - time.time()
        if left < stage.min_s:
            statuses.append((stage.name, f"skipped: {left:.0f} s left < {stage.min_s} s needed", 0.0, stage.what))
            log(f"== {stage.name}: skipped (budget: {left:.0f} s left, needs {stage.min_s} s)")
            continue
        argv = list(stage.argv)
        if argv[:3] == BENCH[:3]:
            argv += ["--ceilings-json", str(ceil_path), "--json", str(tmp / f"{stage.name}.json"),
                      "--csv-dir", str(out)]
            if args.quick:
                argv.append("--quick")
        timeout = min(stage.limit_s, left)
        log(f"== {stage.name} (limit {timeout:.0f} s): {stage.what}")
        try:
            status, dt = run_stage(stage, argv, timeout, log, tests_log, tmp)
        except Exception as e:  # could not even start it
            status, dt = f"error: {e}", 0.0
        statuses.append((stage.name, status, dt, stage.what))
        log(f"== {stage.name}: {status} in {dt:.0f} s")
    tests_log.close()

    rows, ceil = [], {}
    for stage in STAGES:
        p = tmp / f"{stage.name}.json"
        if p.exists():
            try:
                d = json.loads(p.read_text())
                rows += d["rows"]
                ceil = ceil or {k: d.get(k) for k in ("gpu", "ceil_tflops", "ceil_gbps", "versions", "commit")}
            except (OSError, ValueError, KeyError) as e:
                log(f"warning: could not read {p.name}: {e}")
    tg = targets(rows, ceil.get("ceil_gbps"))
    summary = {"ceilings": ceil, "stages": [dict(name=n, status=s, seconds=round(t, 1)) for n, s, t, _ in statuses],
               "targets": [dict(target=n, value=v, reading=r, passed=p) for n, v, r, p in tg], "rows": rows,
               "wall_s": round(time.time() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    log("\n================ gpu_check summary ================")
    if ceil:
        log(f"{ceil.get('gpu')}: bf16 matmul {ceil.get('ceil_tflops') or 0:.0f} TFLOP/s, "
            f"copy {ceil.get('ceil_gbps') or 0:.0f} GB/s; commit {ceil.get('commit')}")
    for name, status, dt, _ in statuses:
        log(f"  stage {name:<15} {status:<40} {dt:5.0f} s")
    tl = train_lines(rows)
    if tl:
        log("training step:")
        for line in tl:
            log(line)
    log("targets (DESIGN.md):")
    for name, _, reading, passed in tg:
        mark = "n/a " if passed is None else "PASS" if passed else "FAIL"
        log(f"  {mark}  {name:<50} {reading}")
    log(f"total {time.time() - t_start:.0f} s; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
