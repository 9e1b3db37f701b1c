"""The one call a session with a lent GPU makes: GPU tests, every benchmark family with its peers, pass/fail
against DESIGN.md, all inside a 9-minute wall-clock budget.

    PYTHONPATH=. python benchmarks/gpu_check.py            # or: make gpu-check
    PYTHONPATH=. python benchmarks/gpu_check.py --budget-s 300 --stages attention train-base128
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run  # on a CPU: stages, candidates, imports, arguments

Before the stages, the wheels in `.gpu-wheels/` (`make gpu-wheels` downloads them on a machine with network:
Liger-Kernel, which the GPU image lacks) are installed with `pip install --no-deps --no-index --target <tmp>`,
and that folder is put first on every stage's path. The folder is ignored by git: it must travel with the
working tree (the device tool's `carry`), or the peers that need it are skipped with their reason.

Stages run one after another, each in its own process with its own time limit, so a hang, a crash or a
CUDA fault loses that stage only; when the wall-clock budget (default 540 s) runs short the remaining
stages are skipped and said so. Order: device ceilings, attention (every candidate, peers included), the
GPU-marked tests, the kernels at BERT-base size with their peers, the base/128/256 and base/512/32 training
steps (fastbert, HF SDPA, HF SDPA + compile, optimize()d HF), inference (MiniLM and BERT-base, batch 128),
then, if time is left, large/128/128, all kernel tests compiled and the kernels at BERT-large size.

Output goes under $OUT when set, else benchmarks/results/ (at most 8 files, as the device tool returns):
gpu_check.log (everything printed), summary.json (stages, rows, targets), tests.log (pytest output) and
the appended attention.csv, kernels.csv, train_step.csv, inference.csv (rows with GPU name, versions, commit).
With $OUT set the rows are also appended to benchmarks/results/*.csv of this working tree. A short table of
stages, peers and targets is printed last.
"""

from __future__ import annotations

import argparse
import csv
import glob
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
WHEELS = ROOT / ".gpu-wheels"  # `make gpu-wheels`; ignored by git, carried to the GPU machine
RESULTS = ROOT / "benchmarks" / "results"
CSV_NAMES = ("attention.csv", "kernels.csv", "train_step.csv", "inference.csv")

BENCH = [sys.executable, "-m", "fastbert.bench", "--rounds", "3", "--progress"]
ATTENTION_CANDIDATES = ["--candidates", "fastbert", "fastbert-varlen", "fastbert-varlen-deterministic", "eager", "sdpa",
                        "sdpa-flash", "sdpa-flash-varlen", "flash-attn-varlen", "--no-compile"]
TRAIN_CANDIDATES = ["--candidates", "fastbert", "hf-sdpa", "hf-sdpa-compile", "hf-sdpa+optimize"]
# The ops with DESIGN.md targets first: a stage cut short by its limit keeps the cases it finished.
KERNEL_CANDIDATES = ["--candidates", "fastbert", "eager", "compile", "liger", "cublaslt", "--ops",
                     "bias_dropout_add_layernorm", "mlm_cross_entropy", "linear_bias_gelu", "qkv_projection",
                     "softmax_dropout"]
INFERENCE_CANDIDATES = ["--candidates", "fastbert", "hf-sdpa", "hf-sdpa-compile", "hf-sdpa+optimize",
                        "sentence-transformers"]


@dataclass
class Stage:
    name: str
    limit_s: int  # the stage is killed after this long
    min_s: int  # not started with less budget left than this
    argv: list[str]  # benchmark stages get --ceilings-json, --json and --csv-dir appended
    what: str

    @property
    def is_bench(self) -> bool:
        return self.argv[:3] == BENCH[:3]


STAGES = [
    Stage("ceilings", 60, 15, BENCH + ["--ceilings-only"],
          "bf16 matmul TFLOP/s and copy GB/s of this card"),
    Stage("attention", 120, 40, BENCH + ["--family", "attention", "--op-shapes", "base/128/256", "base/512/32",
                                         "--modes", "fwd+bwd", *ATTENTION_CANDIDATES],
          "attention fwd+bwd B=256,T=128 and B=32,T=512, h=12 d=64 bf16, padded, p=0.1, with the peers"),
    Stage("tests-gpu", 100, 40, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests",
                                 "-p", "no:cacheprovider", "--durations=10"],
          "pytest -m gpu tests/ (bf16 and compiled-only tests)"),
    Stage("kernels-base", 120, 50, BENCH + ["--family", "kernels", "--op-shapes", "base/128/256",
                                            *KERNEL_CANDIDATES],
          "encoder kernels fwd/bwd/fwd+bwd at N=256x128 tokens, BERT-base, with Liger and cuBLASLt"),
    Stage("train-base128", 150, 80, BENCH + ["--family", "train", "--train-cases", "base/128/256",
                                             "base/128/256/padded", *TRAIN_CANDIDATES],
          "training step base/128/256 full and padded vs transformers SDPA (+compile, +optimize)"),
    Stage("train-base512", 100, 60, BENCH + ["--family", "train", "--train-cases", "base/512/32",
                                             *TRAIN_CANDIDATES],
          "training step base/512/32 vs transformers SDPA (+compile, +optimize)"),
    Stage("inference", 100, 45, BENCH + ["--family", "inference", *INFERENCE_CANDIDATES],
          "encoding throughput, MiniLM and BERT-base, batch 128, Rotten Tomatoes and Wikipedia lengths"),
    Stage("train-large128", 100, 60, BENCH + ["--family", "train", "--train-cases", "large/128/128",
                                              *TRAIN_CANDIDATES],
          "training step large/128/128 vs transformers SDPA (+compile, +optimize), if time is left"),
    Stage("tests-kernels", 120, 45, [sys.executable, "-m", "pytest", "-q", "tests/kernels", "-m", "not gpu",
                                     "-p", "no:cacheprovider", "--durations=10"],
          "every kernel test compiled on CUDA (the gpu-marked ones ran above), if time is left"),
    Stage("kernels-large", 100, 50, BENCH + ["--family", "kernels", "--op-shapes", "large/128/256",
                                             *KERNEL_CANDIDATES],
          "encoder kernels at N=256x128 tokens, BERT-large, if time is left"),
]


# ---------------------------------------------------------------------------------------------- wheels


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


def stage_env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    parts = [str(site)] if site is not None else []
    parts += [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


class Log:
    """Print and keep a copy in the log file, flushed line by line (a killed run keeps what it printed)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def run_stage(stage: Stage, argv: list[str], timeout_s: float, log: Log, tests_log, tmp: Path,
              site: Path | None = None) -> tuple[str, float]:
    """Run one stage in its own process group, echoing its output as it comes; returns (status, seconds).

    The output goes through a file, not a pipe: a grandchild that outlives a killed stage (a compile
    worker, say) cannot keep this loop waiting for the pipe to close."""
    env = stage_env(site)
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


# ---------------------------------------------------------------------------------------------- peers


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
                     f"vs best peer {peer}")
    return lines


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


# ---------------------------------------------------------------------------------------------- dry run


def dry_run(stages: list[Stage], site: Path | None, log, collect: bool = True) -> int:
    """Every stage's arguments parsed and its candidates listed as a run on CUDA would take them (every case
    builder runs, so every import happens); the first benchmark stage also through `python -m fastbert.bench`
    in a child with the stages' path; the pytest stages collected. Returns the number of failures."""
    sys.path.insert(0, str(ROOT))
    from fastbert.bench.cli import main as bench_main

    failures = 0
    # The child check runs where the wheels matter most: the first stage with a Liger candidate.
    child = next((s for s in stages if s.is_bench and "liger" in s.argv), next((s for s in stages if s.is_bench), None))
    for stage in stages:
        log(f"== {stage.name}: {stage.what}")
        if stage.is_bench:
            argv = stage.argv[3:] + ["--dry-run", "--device", "cuda"]
            rc = bench_main(argv)
            if rc == 0 and stage is child:
                proc = subprocess.run(stage.argv + ["--dry-run", "--device", "cuda"], cwd=ROOT, env=stage_env(site),
                                      capture_output=True, text=True, timeout=300)
                rc = proc.returncode
                log(f"  (python -m fastbert.bench in a child process: exit {rc})")
                if rc:
                    log(proc.stdout[-2000:] + proc.stderr[-2000:])
        elif collect:
            proc = subprocess.run(stage.argv + ["--collect-only"], cwd=ROOT, env=stage_env(site),
                                  capture_output=True, text=True, timeout=300)
            rc = proc.returncode
            tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
            log(f"  pytest --collect-only: exit {rc}: {tail[0]}")
            if rc:
                log(proc.stdout[-2000:] + proc.stderr[-2000:])
        else:
            rc = 0
            log("  (pytest collection skipped: --no-collect)")
        if rc:
            failures += 1
            log(f"  FAILED: exit {rc}")
    return failures


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all stages (9 minutes)")
    ap.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmark stages (smoke run)")
    ap.add_argument("--allow-cpu", action="store_true", help="run even without CUDA (to test this script)")
    ap.add_argument("--dry-run", action="store_true", help="list the stages and candidates, check every import "
                    "and argument, install the wheels into a throw-away folder; measure nothing (runs on a CPU)")
    ap.add_argument("--no-collect", action="store_true", help="with --dry-run: do not collect the pytest stages")
    ap.add_argument("--wheels", type=Path, default=WHEELS, help="folder of wheels to install first (.gpu-wheels)")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    stages = [s for s in STAGES if not args.stages or s.name in args.stages]
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
        failures = dry_run(stages, site_used, log, collect=not args.no_collect)
        planned = sum(s.limit_s for s in stages)
        log(f"\ndry run: {len(stages)} stages, {failures} failed; stage limits add up to {planned} s against a budget "
            f"of {args.budget_s:.0f} s (later stages are skipped when it runs short); {time.time() - t_start:.0f} s")
        return 1 if failures or wheel_status.startswith("pip install failed") else 0
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
    for stage in stages:
        left = deadline - time.time()
        if left < stage.min_s:
            statuses.append((stage.name, f"skipped: {left:.0f} s left < {stage.min_s} s needed", 0.0, stage.what))
            log(f"== {stage.name}: skipped (budget: {left:.0f} s left, needs {stage.min_s} s)")
            continue
        argv = list(stage.argv)
        if stage.is_bench:
            argv += ["--ceilings-json", str(tmp / "ceilings.json"), "--json", str(tmp / f"{stage.name}.json"),
                     "--csv-dir", str(out)]
            if args.quick:
                argv.append("--quick")
        timeout = min(stage.limit_s, left)
        log(f"== {stage.name} (limit {timeout:.0f} s): {stage.what}")
        try:
            status, dt = run_stage(stage, argv, timeout, log, tests_log, tmp, site_used)
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
    summary = {"ceilings": ceil, "wheels": {"status": wheel_status, "files": wheels},
               "stages": [dict(name=n, status=s, seconds=round(t, 1)) for n, s, t, _ in statuses],
               "targets": [dict(target=n, value=v, reading=r, passed=p) for n, v, r, p in tg], "rows": rows,
               "wall_s": round(time.time() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        append_results(out, log)
    except Exception as e:  # the figures are under $OUT anyway
        log(f"warning: could not append to {RESULTS}: {e}")

    log("\n================ gpu_check summary ================")
    if ceil:
        vers = ", ".join(f"{k} {v}" for k, v in (ceil.get("versions") or {}).items())
        log(f"{ceil.get('gpu')}: bf16 matmul {ceil.get('ceil_tflops') or 0:.0f} TFLOP/s, "
            f"copy {ceil.get('ceil_gbps') or 0:.0f} GB/s; {vers}; commit {ceil.get('commit')}")
    for name, st, dt, _ in statuses:
        log(f"  stage {name:<15} {st:<40} {dt:5.0f} s")
    tl = train_lines(rows)
    if tl:
        log("training step:")
        for line in tl:
            log(line)
    pl = peer_lines(rows)
    if pl:
        log("fastbert vs baseline and best peer (time ratio: > 1 = fastbert faster):")
        for line in pl:
            log(line)
    log("targets (DESIGN.md):")
    for name, _, reading, passed in tg:
        mark = "n/a " if passed is None else "PASS" if passed else "FAIL"
        log(f"  {mark}  {name:<50} {reading}")
    log(f"total {time.time() - t_start:.0f} s; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
