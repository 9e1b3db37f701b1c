"""Where a run happens and how long a call takes: environment (GPU, versions, commit), timers, the device's
measured ceilings.

CUDA: `triton.testing.do_bench` (CUDA events, median, L2 flushed between calls; a CUDA-event loop if Triton is
missing); CPU: a `time.perf_counter` median. Candidates are interleaved (A, B, C, C, B, A, ...: one median per
round, the median of the rounds reported), so drifting clocks hit them alike. The first call of each candidate
(Triton autotuning, torch.compile) is timed apart (`first_call_s`).
"""

from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------- environment


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "triton": "-", "transformers": "-"}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed (triton on non-Linux, transformers outside the dev extra)
            pass
    return out


ROOT = Path(__file__).resolve().parents[2]
COMMIT_FILE = ROOT / ".gpu-wheels" / "COMMIT"  # `make gpu-commit` writes it; it travels with the carried folder


def commit_source() -> tuple[str, str]:
    """(short commit, where it came from): FASTBERT_COMMIT; else git ("+dirty" with uncommitted changes); else, in
    a copy of the tree without .git (as on a lent GPU machine), the commit `make gpu-commit` wrote into
    `.gpu-wheels/COMMIT` before the copy; else ("unknown", why)."""
    if os.environ.get("FASTBERT_COMMIT"):
        return os.environ["FASTBERT_COMMIT"], "FASTBERT_COMMIT"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = dirty = ""
    if sha:
        return sha + ("+dirty" if dirty else ""), "git"
    if COMMIT_FILE.is_file():
        written = COMMIT_FILE.read_text(encoding="utf-8").strip()
        if written:
            return written, f"{COMMIT_FILE.relative_to(ROOT)} (no git here)"
    return "unknown", "no git, no FASTBERT_COMMIT, no .gpu-wheels/COMMIT (run `make gpu-commit` before copying)"


def git_commit() -> str:
    """The short commit of the working tree (see `commit_source`)."""
    return commit_source()[0]


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class BenchEnv:
    """Where and when a run happens, and the device's measured ceilings."""

    device: torch.device
    gpu: str
    versions: dict[str, str]
    commit: str
    run_id: str
    ceil_tflops: float | None = None  # dense matmul, bf16 on CUDA / fp32 on CPU
    ceil_gbps: float | None = None  # device copy, read + write bytes per second

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32


def make_env(device: str | torch.device | None = None) -> BenchEnv:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return BenchEnv(dev, gpu, versions(), git_commit(), now)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, rep_ms: float = 100.0, warmup_ms: float = 25.0,
            cpu_reps: int = 5, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of one call of `fn` (already warmed up by the caller).

    CUDA: `triton.testing.do_bench` (CUDA events; it flushes L2 and sets `.grad = None` on `grad_to_none`
    outside the timed region); a CUDA-event loop where Triton is missing. CPU: a perf_counter median."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, max(3, int(cpu_reps)), grad_to_none)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for _ in range(max(1, cpu_reps)):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda_events(fn, reps, grad_to_none) -> float:
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_s(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for the first call (compilation and autotuning included): reported apart, never timed."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_ms(fns: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int, rep_ms: float,
                   cpu_reps: int, grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None,
                   errors: dict[str, str] | None = None) -> dict[str, float]:
    """Median over `rounds` of each candidate's median, the candidates interleaved (order reversed on every
    other round). A candidate that raises is dropped and its error stored in `errors`."""
    per: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(1, rounds)):
        for name in names if r % 2 == 0 else names[::-1]:
            if name not in per:
                continue
            try:
                per[name].append(time_ms(fns[name], device, rep_ms=rep_ms, cpu_reps=cpu_reps,
                                         grad_to_none=(grad_to_none or {}).get(name)))
            except Exception as e:  # keep the other candidates' figures
                if errors is not None:
                    errors[name] = _short_error(e)
                del per[name]
    return {name: statistics.median(v) for name, v in per.items() if v}


def extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes one call of `fn` allocates at its peak on top of what was resident (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(env: BenchEnv, quick: bool = False) -> tuple[float, float]:
    """(matmul TFLOP/s, copy GB/s) of this device, measured now: bf16 8192³ matmul and a 1 GiB copy on
    CUDA; fp32 1024³ matmul and a 64 MiB copy on the CPU. Stored on `env`."""
    dev = env.device
    if env.cuda:
        n, nbytes = (4096, 2**28) if quick else (8192, 2**30)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        mm = lambda: torch.mm(a, b)
        first_call_s(mm, dev)
        ms = time_ms(mm, dev, rep_ms=200)
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()
        dst = torch.empty_like(src)
        cp = lambda: dst.copy_(src)
        first_call_s(cp, dev)
        ms_copy = time_ms(cp, dev, rep_ms=200)
    else:
        n, nbytes = 1024, 2**26
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm = lambda: torch.mm(a, b)
        mm()
        ms = time_ms(mm, dev, cpu_reps=7)
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        cp = lambda: dst.copy_(src)
        cp()
        ms_copy = time_ms(cp, dev, cpu_reps=7)
    env.ceil_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    env.ceil_gbps = 2 * nbytes / (ms_copy * 1e-3) / 1e9
    free_memory(dev)
    return env.ceil_tflops, env.ceil_gbps


def load_or_measure_ceilings(env: BenchEnv, path: str | None, quick: bool = False) -> None:
    """Reuse ceilings a previous process of the same run measured (gpu_check passes one file to every
    stage), else measure and, given a path, store them."""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("gpu") == env.gpu:
            env.ceil_tflops, env.ceil_gbps = d["ceil_tflops"], d["ceil_gbps"]
            return
    measure_ceilings(env, quick)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"gpu": env.gpu, "ceil_tflops": env.ceil_tflops, "ceil_gbps": env.ceil_gbps}, f)

