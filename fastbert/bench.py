"""fastbert-bench: time fastbert's kernels and training step against PyTorch eager, SDPA, torch.compile and
Hugging Face `transformers`, in one run, and print a table (``fastbert-bench``, ``python -m fastbert.bench``).

This module holds every piece of measuring code (the pytest-benchmark suite in ``benchmarks/`` and
``benchmarks/gpu_check.py`` import it; it imports nothing from there):

- timing: on CUDA ``triton.testing.do_bench`` (CUDA events, median, L2 flushed between calls; CUDA-event
  loop if Triton is missing), on CPU a ``time.perf_counter`` median. Candidates are interleaved (A, B, C,
  C, B, A, …: one median per round, the median of the rounds reported), so drifting clocks hit them alike.
  The first call of each candidate — Triton autotuning, ``torch.compile`` — is timed apart (``warm_s``).
- ceilings of the device measured first: bf16 (CPU: fp32) matmul TFLOP/s and copy GB/s (read + write).
- FLOP / byte formulas per op, MFU of the training step with the useful-FLOP formula of DESIGN.md
  (``fastbert.flops``):
  ``F = 72·L·H² + 12·L·T·H + 6·H·V·f`` per real token (f = 0.15), summed over the real tokens of every
  sequence (so a padded batch is credited with its real tokens only, each with its own length T).
- peak memory: ``torch.cuda.max_memory_allocated`` after a reset, for one call made alone; reported as
  ``extra_GB`` (what the call allocates on top of what was resident) and ``peak_GB`` (its own inputs or
  model + optimizer state, plus that extra) so candidates held at the same time do not count each other.
- CSV rows (one file per family, header written once) with GPU name, versions, dtype, shape, commit, time.

Without CUDA the CPU cases run (small sizes, fp32): the public kernel functions — which take their plain
PyTorch reference path on a CPU — against torch eager, and the reference BERT against `transformers`. GPU
cases and torch.compile baselines are listed under "skipped" with the reason; no GPU figure is printed
unless it was measured in this run.

Caution: attention TFLOP/s use the padded shape's FLOPs (``4·B·h·T²·d`` forward, 2.5× that backward) for
every candidate, the varlen one included, so they compare like the times do (and like the H200 anchors).
torch.compile runs with its default mode (no max-autotune). Under ``TRITON_INTERPRET=1`` the fused
kernels run in Triton's interpreter, whose timings mean nothing: they are skipped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import PRESETS, BertConfig
from .flops import train_flops_per_token

IGNORE_INDEX = -100
MLM_FRACTION = 0.15  # f in the useful-FLOP formula: share of tokens the MLM head scores
MODES = ("fwd", "bwd", "fwd+bwd")
FAMILIES = ("kernels", "attention", "train")
CSV_FILES = {"kernels": "kernels.csv", "attention": "attention.csv", "train": "train_step.csv"}
CSV_COLUMNS = (
    "run_id", "timestamp", "commit", "device", "gpu", "torch", "triton", "transformers",
    "family", "case", "size", "candidate", "mode", "dtype", "shape",
    "ms", "speedup", "baseline", "tflops", "gbps", "pct_ceiling", "seq_per_s", "mfu",
    "peak_GB", "extra_GB", "warm_s", "parity", "ceil_tflops", "ceil_gbps", "note",
)

# GPU batches from the issue: (preset, T, B) full and with --quick.
GPU_TRAIN_SHAPES = (("base", 128, 256), ("base", 512, 32), ("large", 128, 128), ("large", 512, 32))
GPU_TRAIN_SHAPES_QUICK = (("base", 128, 64), ("base", 512, 8), ("large", 128, 32), ("large", 512, 8))
# CPU: small enough for two cores, big enough to mean something (mini, T=64, B=8; --quick: tiny).
CPU_TRAIN_SHAPES = (("mini", 64, 8),)
CPU_TRAIN_SHAPES_QUICK = (("tiny", 32, 4),)

# ---------------------------------------------------------------------------------------------- environment


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "triton": "-", "transformers": "-"}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed (triton on non-Linux, transformers outside the dev extra)
            pass
    return out


def git_commit() -> str:
    """Short commit of the working tree ("+dirty" with uncommitted changes); FASTBERT_COMMIT overrides."""
    if os.environ.get("FASTBERT_COMMIT"):
        return os.environ["FASTBERT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


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


# ---------------------------------------------------------------------------------------------- formulas


def attention_flops(B: int, T: int, h: int, d: int) -> float:
    """Forward FLOPs of attention on the padded shape: QKᵀ and P·V, 2·T·T·d each per head."""
    return 4.0 * B * h * T * T * d


BWD_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # attention backward = 2.5 × forward
GEMM_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}  # a linear layer's backward = 2 GEMMs


def train_flops(cfg: BertConfig, lengths: Sequence[int], f: float = MLM_FRACTION) -> float:
    """Useful FLOPs of one training step: every sequence's real tokens, each at its own length."""
    return float(sum(n * train_flops_per_token(cfg, n, f) for n in lengths))


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    family: str
    case: str
    size: str
    candidate: str
    mode: str
    dtype: str
    shape: str
    ms: float | None = None
    speedup: float | None = None
    baseline: str = ""
    tflops: float | None = None
    gbps: float | None = None
    pct_ceiling: float | None = None
    seq_per_s: float | None = None
    mfu: float | None = None
    peak_GB: float | None = None
    extra_GB: float | None = None
    warm_s: float | None = None
    parity: str = ""
    note: str = ""

    def to_dict(self, env: BenchEnv | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if env is not None:
            d.update(run_id=env.run_id, commit=env.commit, device=env.device.type, gpu=env.gpu,
                     ceil_tflops=env.ceil_tflops, ceil_gbps=env.ceil_gbps, **env.versions)
        return d


def append_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Append rows to a CSV with `CSV_COLUMNS`, writing the header only when the file is new. A file whose
    header differs (written by another version) is left alone: the rows go to `<stem>-<columns hash>.csv`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(CSV_COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        with open(path, encoding="utf-8", newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != header:
            path = path.with_name(f"{path.stem}-{abs(hash(tuple(header))) % 10**6:06d}{path.suffix}")
            print(f"warning: {path.name}: existing CSV has other columns; writing to {path}", file=sys.stderr)
            return append_csv(path, rows)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in header})
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def finish_rows(rows: list[Row], env: BenchEnv, baseline: str) -> list[Row]:
    """Speed-ups against `baseline` (same case and mode) and the fraction of the ceiling."""
    base = {(r.case, r.mode): r.ms for r in rows if r.candidate == baseline and r.ms}
    for r in rows:
        b = base.get((r.case, r.mode))
        if r.ms and b:
            r.speedup, r.baseline = b / r.ms, baseline
        if r.family == "train":  # the training step's fraction of the ceiling is its MFU column
            continue
        if r.tflops is not None and env.ceil_tflops:
            r.pct_ceiling = 100.0 * r.tflops / env.ceil_tflops
        elif r.gbps is not None and env.ceil_gbps:
            r.pct_ceiling = 100.0 * r.gbps / env.ceil_gbps
    return rows


# ---------------------------------------------------------------------------------------------- op cases

Fn = Callable[[dict[str, Any], float], tuple[torch.Tensor, ...]]


@dataclass
class OpCase:
    """One op at one shape: inputs, candidates (name → fn(inputs, dropout_p) → outputs), cost model."""

    family: str
    name: str  # op name, e.g. "bias_dropout_add_layernorm"
    size: str  # model size label, e.g. "base"
    shape: str
    dtype: torch.dtype
    make: Callable[[], dict[str, Any]]  # inputs; key "leaves" → tensors that get gradients, per candidate
    candidates: dict[str, Fn]
    skipped: dict[str, str]  # candidate → reason it does not run
    baseline: str
    dropout_p: float = 0.0
    flops: float | None = None  # forward FLOPs (backward by BWD/GEMM factor)
    flop_factor: dict[str, float] = field(default_factory=lambda: dict(GEMM_FLOP_FACTOR))
    bytes: dict[str, float] | None = None  # mode → bytes a fused implementation must move
    real: Callable[[str, tuple[torch.Tensor, ...], dict[str, Any]], torch.Tensor] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.size} {self.shape}"


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, g, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(grad)


def _padding_mask(B: int, T: int, device, g) -> torch.Tensor:
    """bool [B, T], True = real token; lengths uniform in T/2..T."""
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g, device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def _import(module: str, *names: str) -> tuple[list[Any] | None, str]:
    """The named attributes of a kernel module, or (None, reason) when it is missing or incomplete."""
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names], ""
    except Exception as e:
        return None, f"{module} unavailable ({_short_error(e)})"


def _fastbert_skip_reason(env: BenchEnv) -> str:
    if interpreter_on():
        return "TRITON_INTERPRET=1: the kernels would run in Triton's interpreter (timings meaningless)"
    return ""


def _compile_skip_reason(env: BenchEnv, allow_compile: bool) -> str:
    if not allow_compile:
        return "torch.compile baselines switched off (--no-compile)"
    if not env.cuda:
        return "torch.compile baselines run on CUDA only (CPU inductor builds take minutes and are not the target)"
    return ""


# --- attention -----------------------------------------------------------------------------------------


def attention_eager(q, k, v, mask, p: float, scale: float) -> torch.Tensor:
    """BERT's attention as Hugging Face's eager path writes it, in the input dtype. q, k, v [B, T, h, d]."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
    scores = (qt @ kt.transpose(-1, -2)) * scale  # (B, h, T, T)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=p > 0)
    return (probs @ vt).transpose(1, 2)  # (B, T, h, d)


def attention_sdpa(q, k, v, mask, p: float, scale: float) -> torch.Tensor:
    """torch SDPA with the boolean key mask (memory-efficient backend: the one that takes a mask and dropout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], dropout_p=p, scale=scale)
    return out.transpose(1, 2)  # (B, T, h, d)


def attention_case(env: BenchEnv, size: str, B: int, T: int, h: int, d: int, *, p: float = 0.1,
                   allow_compile: bool = True) -> OpCase:
    dev, dtype, scale = env.device, env.dtype, 1.0 / math.sqrt(d)
    fused, why_fused = _import("kernels.attention", "fused_attention", "fused_attention_varlen")
    padding, why_pad = _import("kernels.padding", "unpad_input")
    skipped: dict[str, str] = {}
    cands: dict[str, Fn] = {
        "eager": lambda i, p: (attention_eager(i["q"], i["k"], i["v"], i["mask"], p, scale),),
        "sdpa": lambda i, p: (attention_sdpa(i["q"], i["k"], i["v"], i["mask"], p, scale),),
    }
    why_c = _compile_skip_reason(env, allow_compile)
    if why_c:
        skipped["compile"] = why_c
    else:
        compiled = torch.compile(attention_eager)
        cands["compile"] = lambda i, p: (compiled(i["q"], i["k"], i["v"], i["mask"], p, scale),)
    why_fb = _fastbert_skip_reason(env) or why_fused
    if why_fb:
        skipped["fastbert"] = skipped["fastbert-varlen"] = why_fb
    else:
        fa, fa_varlen = fused
        cands["fastbert"] = lambda i, p: (fa(i["q"], i["k"], i["v"], key_padding_mask=i["mask"], dropout_p=p,
                                             softmax_scale=scale),)
        if why_pad:
            skipped["fastbert-varlen"] = why_pad
        else:
            cands["fastbert-varlen"] = lambda i, p: (fa_varlen(i["qp"], i["kp"], i["vp"], i["cu_seqlens"],
                                                               i["max_seqlen"], dropout_p=p, softmax_scale=scale),)

    def make() -> dict[str, Any]:
        g = _gen(dev, 1234)
        mask = _padding_mask(B, T, dev, g)
        q, k, v = (_randn((B, T, h, d), dtype, dev, g) for _ in range(3))
        inp: dict[str, Any] = dict(q=q, k=k, v=v, mask=mask)
        leaves = {name: [q, k, v] for name in ("eager", "sdpa", "compile", "fastbert")}
        if padding is not None:
            unpad = padding[0]
            qp, idx, cu, max_s = unpad(q.detach(), mask)  # (total, h, d)
            kp, vp = (unpad(t.detach(), mask)[0] for t in (k, v))
            qp, kp, vp = (t.contiguous().requires_grad_(True) for t in (qp, kp, vp))
            inp.update(qp=qp, kp=kp, vp=vp, cu_seqlens=cu, max_seqlen=max_s)
            leaves["fastbert-varlen"] = [qp, kp, vp]
        inp["leaves"] = leaves
        return inp

    def real(name: str, outs, inp) -> torch.Tensor:
        return outs[0] if name == "fastbert-varlen" else outs[0][inp["mask"]]  # (total, h, d)

    return OpCase("attention", "attention", size, f"B={B} T={T} h={h} d={d} p={p} padded T/2..T", dtype, make,
                  cands, skipped, baseline="sdpa" if env.cuda else "eager", dropout_p=p,
                  flops=attention_flops(B, T, h, d), flop_factor=dict(BWD_FLOP_FACTOR), real=real)


# --- the encoder's other kernels -----------------------------------------------------------------------


def _leaves_for_all(inp: dict[str, Any], names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    inp["leaves"] = {n: list(tensors) for n in names}


def _add_candidates(env: BenchEnv, cands: dict[str, Fn], skipped: dict[str, str], fused_module: str,
                    fused_names: Sequence[str], make_fused: Callable[..., Fn], eager: Fn,
                    compile_target: Callable[..., Any] | None, make_compiled: Callable[[Any], Fn],
                    allow_compile: bool) -> None:
    cands["eager"] = eager
    why_c = _compile_skip_reason(env, allow_compile) if compile_target is not None else "no compile baseline"
    if why_c:
        skipped["compile"] = why_c
    else:
        cands["compile"] = make_compiled(torch.compile(compile_target))
    objs, why = _import(fused_module, *fused_names)
    why = _fastbert_skip_reason(env) or why
    if why:
        skipped["fastbert"] = why
    else:
        cands["fastbert"] = make_fused(*objs)


def _bdaln_eager(x, bias, residual, gamma, beta, p: float, eps: float) -> torch.Tensor:
    return F.layer_norm(residual + F.dropout(x + bias, p=p, training=p > 0), (x.shape[-1],), gamma, beta, eps)


def _softmax_eager(scores, mask, scale: float, p: float) -> torch.Tensor:
    s = (scores * scale).masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.dropout(torch.softmax(s, dim=-1), p=p, training=p > 0)


def _linear_bias_gelu_eager(x, w, b) -> torch.Tensor:
    return F.gelu(F.linear(x, w, b))


def _qkv_eager(x, w, b, num_heads: int):
    H = x.shape[-1]
    q, k, v = F.linear(x, w, b).split(H, dim=-1)  # 3 × (B, T, H)
    return tuple(t.unflatten(-1, (num_heads, H // num_heads)) for t in (q, k, v))  # (B, T, h, d) views


def _mlm_rows_loss(rows, row_labels, dw, db, lw, lb, ew, eb, eps: float) -> torch.Tensor:
    """MLM head + cross-entropy on already-gathered rows (what the compiled baseline compiles)."""
    t = F.gelu(F.linear(rows, dw, db))
    u = F.layer_norm(t, (rows.shape[-1],), lw, lb, eps)
    logits = F.linear(u, ew, eb)  # (n, V)
    return F.cross_entropy(logits.float(), row_labels)


def kernel_cases(env: BenchEnv, size: str, B: int, T: int, *, allow_compile: bool = True,
                 ops: Sequence[str] | None = None) -> list[OpCase]:
    """The encoder kernels at N = B·T tokens of a model size: qkv_projection, softmax_dropout,
    linear_bias_gelu, bias_dropout_add_layernorm, mlm_cross_entropy."""
    cfg = BertConfig.from_preset(size)
    H, h, I, V = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size
    N, dev, dtype, eps, p = B * T, env.device, env.dtype, cfg.layer_norm_eps, 0.1
    s = torch.tensor([], dtype=dtype).element_size()
    names = ("fastbert", "eager", "compile")
    cases: list[OpCase] = []

    def want(op: str) -> bool:
        return ops is None or op in ops

    if want("qkv_projection"):
        c, sk = {}, {}

        def make_qkv():
            g = _gen(dev, 1)
            x = _randn((B, T, H), dtype, dev, g)
            w = _randn((3 * H, H), dtype, dev, g, scale=H**-0.5)
            b = _randn((3 * H,), dtype, dev, g, scale=0.02)
            inp = dict(x=x, w=w, b=b)
            _leaves_for_all(inp, names, [x, w, b])
            return inp

        _add_candidates(env, c, sk, "kernels.qkv_projection", ["qkv_projection"],
                        lambda f: (lambda i, p: tuple(f(i["x"], i["w"], i["b"], h))),
                        lambda i, p: _qkv_eager(i["x"], i["w"], i["b"], h), _qkv_eager,
                        lambda cf: (lambda i, p: tuple(cf(i["x"], i["w"], i["b"], h))), allow_compile)
        cases.append(OpCase("kernels", "qkv_projection", size, f"N={N} H={H} h={h}", dtype, make_qkv, c, sk,
                            "eager", flops=2.0 * N * H * 3 * H))

    if want("softmax_dropout"):
        c, sk = {}, {}
        scale = 1.0 / math.sqrt(H // h)

        def make_sm():
            g = _gen(dev, 2)
            scores = _randn((B, h, T, T), dtype, dev, g, scale=3.0)
            inp = dict(scores=scores, mask=_padding_mask(B, T, dev, g))
            _leaves_for_all(inp, names, [scores])
            return inp

        _add_candidates(env, c, sk, "kernels.softmax_dropout", ["scaled_masked_softmax_dropout"],
                        lambda f: (lambda i, p: (f(i["scores"], i["mask"], scale, p),)),
                        lambda i, p: (_softmax_eager(i["scores"], i["mask"], scale, p),), _softmax_eager,
                        lambda cf: (lambda i, p: (cf(i["scores"], i["mask"], scale, p),)), allow_compile)
        numel = B * h * T * T
        cases.append(OpCase("kernels", "softmax_dropout", size, f"B={B} h={h} T={T} p={p} padded T/2..T", dtype,
                            make_sm, c, sk, "eager", dropout_p=p,
                            bytes={"fwd": 2.0 * numel * s, "bwd": 3.0 * numel * s, "fwd+bwd": 5.0 * numel * s}))

    if want("linear_bias_gelu"):
        c, sk = {}, {}

        def make_lbg():
            g = _gen(dev, 3)
            x = _randn((N, H), dtype, dev, g)
            w = _randn((I, H), dtype, dev, g, scale=H**-0.5)
            b = _randn((I,), dtype, dev, g, scale=0.02)
            inp = dict(x=x, w=w, b=b)
            _leaves_for_all(inp, names, [x, w, b])
            return inp

        _add_candidates(env, c, sk, "kernels.linear_bias_gelu", ["linear_bias_gelu"],
                        lambda f: (lambda i, p: (f(i["x"], i["w"], i["b"], "none"),)),
                        lambda i, p: (_linear_bias_gelu_eager(i["x"], i["w"], i["b"]),), _linear_bias_gelu_eager,
                        lambda cf: (lambda i, p: (cf(i["x"], i["w"], i["b"]),)), allow_compile)
        cases.append(OpCase("kernels", "linear_bias_gelu", size, f"N={N} H={H} I={I}", dtype, make_lbg, c, sk,
                            "eager", flops=2.0 * N * H * I))

    if want("bias_dropout_add_layernorm"):
        c, sk = {}, {}

        def make_ln():
            g = _gen(dev, 4)
            x, res = _randn((N, H), dtype, dev, g), _randn((N, H), dtype, dev, g)
            bias = _randn((H,), dtype, dev, g, scale=0.02)
            gamma = (1 + _randn((H,), dtype, dev, g, scale=0.1, grad=False)).requires_grad_(True)
            beta = _randn((H,), dtype, dev, g, scale=0.1)
            inp = dict(x=x, res=res, bias=bias, gamma=gamma, beta=beta)
            _leaves_for_all(inp, names, [x, res, bias, gamma, beta])
            return inp

        def ln_args(i):
            return i["x"], i["bias"], i["res"], i["gamma"], i["beta"]

        _add_candidates(env, c, sk, "kernels.bias_dropout_add_layernorm", ["bias_dropout_add_layernorm"],
                        lambda f: (lambda i, p: (f(*ln_args(i), p, eps),)),
                        lambda i, p: (_bdaln_eager(*ln_args(i), p, eps),), _bdaln_eager,
                        lambda cf: (lambda i, p: (cf(*ln_args(i), p, eps),)), allow_compile)
        cases.append(OpCase("kernels", "bias_dropout_add_layernorm", size, f"N={N} H={H} p={p}", dtype, make_ln,
                            c, sk, "eager", dropout_p=p,
                            bytes={"fwd": 3.0 * N * H * s + 8 * N, "bwd": 5.0 * N * H * s + 8 * N,
                                   "fwd+bwd": 8.0 * N * H * s + 16 * N}))

    if want("mlm_cross_entropy"):
        c, sk = {}, {}

        def make_mlm():
            g = _gen(dev, 5)
            hidden = _randn((N, H), dtype, dev, g)
            labels = torch.randint(0, V, (N,), generator=g, device=dev)
            scored = torch.rand((N,), generator=g, device=dev) < MLM_FRACTION
            labels = labels.masked_fill(~scored, IGNORE_INDEX)
            dw, ew = _randn((H, H), dtype, dev, g, scale=H**-0.5), _randn((V, H), dtype, dev, g, scale=0.02)
            db, eb = _randn((H,), dtype, dev, g, scale=0.02), _randn((V,), dtype, dev, g, scale=0.02)
            lw = (1 + _randn((H,), dtype, dev, g, scale=0.1, grad=False)).requires_grad_(True)
            lb = _randn((H,), dtype, dev, g, scale=0.1)
            inp = dict(hidden=hidden, labels=labels, w=(dw, db, lw, lb, ew, eb), n=int(scored.sum()))
            _leaves_for_all(inp, names, [hidden, dw, db, lw, lb, ew, eb])
            return inp

        def mlm_compiled(cf):
            def run(i, p):
                flat = i["labels"]
                keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # gathered eagerly: data-dependent size
                return (cf(i["hidden"].index_select(0, keep), flat.index_select(0, keep), *i["w"], eps),)
            return run

        objs, _ = _import("kernels.mlm_cross_entropy", "mlm_cross_entropy_ref")
        eager_mlm = objs[0] if objs else None
        if eager_mlm is None:  # the module is missing: a local eager baseline still runs
            def eager_fn(i, p):
                keep = i["labels"] != IGNORE_INDEX
                return (_mlm_rows_loss(i["hidden"][keep], i["labels"][keep], *i["w"], eps),)
        else:
            def eager_fn(i, p):
                return (eager_mlm(i["hidden"], i["labels"], *i["w"], eps=eps)[0],)
        _add_candidates(env, c, sk, "kernels.mlm_cross_entropy", ["mlm_cross_entropy"],
                        lambda f: (lambda i, p: (f(i["hidden"], i["labels"], *i["w"], eps=eps)[0],)),
                        eager_fn, _mlm_rows_loss, mlm_compiled, allow_compile)
        n_est = N * MLM_FRACTION
        cases.append(OpCase("kernels", "mlm_cross_entropy", size, f"N={N} H={H} V={V} ~15% scored", dtype,
                            make_mlm, c, sk, "eager", flops=n_est * (2.0 * H * H + 2.0 * H * V)))
    if ops is not None:  # in the order asked for (gpu_check puts the ops with targets first)
        cases.sort(key=lambda c: list(ops).index(c.name))
    return cases


# --- running an op case --------------------------------------------------------------------------------


def _grads_like(outs: tuple[torch.Tensor, ...], seed: int = 7) -> list[torch.Tensor]:
    g = _gen(outs[0].device, seed)
    return [torch.ones_like(o) if o.dim() == 0 else
            torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_op_case(case: OpCase, env: BenchEnv, *, modes: Sequence[str] = MODES, rounds: int = 3,
                rep_ms: float = 100.0, cpu_reps: int = 5, only: Sequence[str] | None = None,
                callables: dict[str, Callable[[], Any]] | None = None) -> list[Row]:
    """Measure every candidate of `case` in each mode, interleaved; parity of the fastbert candidates
    against the baseline at dropout 0 (a sanity gate: the tests in tests/kernels are the real check).
    `callables`, when given, receives each working candidate's forward+backward call (inputs kept alive),
    for a caller that times one of them again (the pytest-benchmark suite)."""
    dev, dt = env.device, str(case.dtype).replace("torch.", "")
    names = [n for n in case.candidates if only is None or n in only or n == case.baseline]
    rows: list[Row] = []

    def row(name: str, mode: str, **kw) -> Row:
        return Row(case.family, case.name, case.size, name, mode, dt, case.shape, **kw)

    for name, why in case.skipped.items():
        if only is None or name in only:
            rows.append(row(name, "-", note=f"skipped: {why}"))
    try:
        inp = case.make()
    except Exception as e:
        rows.append(row("-", "-", note=f"error making inputs: {_short_error(e)}"))
        return rows
    leaves = inp["leaves"]
    fwd = {n: (lambda n=n: case.candidates[n](inp, case.dropout_p)) for n in names}
    grads: dict[str, list[torch.Tensor]] = {}
    warm: dict[str, float] = {}
    errors: dict[str, str] = {}

    def fwd_bwd(n: str):
        outs = fwd[n]()
        torch.autograd.backward(outs, grads[n])

    # First call of each candidate (forward + backward): compilation and autotuning, reported apart.
    for n in names:
        try:
            t0 = time.perf_counter()
            outs = fwd[n]()
            grads[n] = _grads_like(outs)
            torch.autograd.backward(outs, grads[n])
            sync(dev)
            warm[n] = time.perf_counter() - t0
            del outs
        except Exception as e:
            errors[n] = _short_error(e)
    live = [n for n in names if n not in errors]

    parity: dict[str, str] = {}
    if case.baseline in live:
        real = case.real or (lambda n, outs, i: torch.cat([o.reshape(-1) for o in outs]))
        tol = 1e-4 if case.dtype == torch.float32 else 3e-2
        try:
            ref = real(case.baseline, case.candidates[case.baseline](inp, 0.0), inp).detach()
            for n in live:
                if n.startswith("fastbert"):
                    err = _rel_err(real(n, case.candidates[n](inp, 0.0), inp), ref)
                    parity[n] = f"{'ok' if err <= tol else 'FAIL'} {err:.1e}"
        except Exception as e:
            for n in live:
                if n.startswith("fastbert"):
                    parity[n] = f"error {_short_error(e)}"

    for mode in modes:
        if mode == "fwd":
            fns = {n: fwd[n] for n in live}
        elif mode == "fwd+bwd":
            fns = {n: (lambda n=n: fwd_bwd(n)) for n in live}
        else:  # bwd: one forward kept alive, its backward replayed (retain_graph)
            fns = {}
            for n in live:
                try:
                    outs = fwd[n]()
                    fns[n] = (lambda outs=outs, n=n: torch.autograd.backward(outs, grads[n], retain_graph=True))
                except Exception as e:
                    errors[n] = _short_error(e)
        mode_err: dict[str, str] = {}
        ms = interleaved_ms(fns, dev, rounds=rounds, rep_ms=rep_ms, cpu_reps=cpu_reps,
                            grad_to_none={n: leaves[n] for n in fns}, errors=mode_err)
        for n in live:
            if n in mode_err or n not in ms:
                rows.append(row(n, mode, note=f"error: {mode_err.get(n, errors.get(n, 'not measured'))}"))
                continue
            r = row(n, mode, ms=ms[n], warm_s=warm.get(n), parity=parity.get(n, ""))
            if case.flops is not None:
                r.tflops = case.flops * case.flop_factor[mode] / (ms[n] * 1e-3) / 1e12
            if case.bytes is not None:
                r.gbps = case.bytes[mode] / (ms[n] * 1e-3) / 1e9
            if env.cuda:
                try:
                    for t in leaves[n]:
                        t.grad = None
                    in_bytes = sum(t.numel() * t.element_size() for t in leaves[n])
                    extra = extra_bytes(fns[n] if mode != "bwd" else (lambda n=n: fwd_bwd(n)), dev)
                    r.extra_GB, r.peak_GB = extra / 1e9, (extra + in_bytes) / 1e9
                except Exception as e:
                    r.note = f"memory: {_short_error(e)}"
            if not env.cuda and n.startswith("fastbert"):
                r.note = "CPU: the public function runs its plain-PyTorch reference path"
            rows.append(r)
        del fns
    for n, e in errors.items():
        if not any(r.candidate == n and r.note.startswith("error") for r in rows):
            rows.append(row(n, "-", note=f"error: {e}"))
    if callables is not None:
        callables.update({n: (lambda n=n: fwd_bwd(n)) for n in live if n not in errors})
    free_memory(dev)
    return finish_rows(rows, env, case.baseline)


# ---------------------------------------------------------------------------------------------- train step


@dataclass
class TrainCase:
    size: str
    T: int
    B: int
    padded: bool = False

    @property
    def label(self) -> str:
        return f"train {self.size}/{self.T}/{self.B}{' padded' if self.padded else ''}"

    @classmethod
    def parse(cls, spec: str) -> TrainCase:
        """"base/128/256" or "base/128/256/padded"."""
        parts = spec.strip().split("/")
        if len(parts) not in (3, 4) or parts[0] not in PRESETS or (len(parts) == 4 and parts[3] != "padded"):
            raise ValueError(f"train case must look like base/128/256[/padded] with a preset from "
                             f"{sorted(PRESETS)}, got {spec!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]), len(parts) == 4)


def make_batch(cfg: BertConfig, B: int, T: int, padded: bool, device: torch.device, seed: int = 0):
    """A pretraining batch: random token ids, segments A/B, 15% of the real tokens (not position 0)
    labelled, random NSP labels; padded → lengths uniform in T/2..T."""
    g = _gen(device, seed)
    lengths = (torch.randint(T // 2, T + 1, (B,), generator=g, device=device) if padded
               else torch.full((B,), T, device=device))
    pos = torch.arange(T, device=device)[None, :]
    mask = pos < lengths[:, None]  # (B, T)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g, device=device).masked_fill(~mask, 0)
    segment = ((pos >= (lengths[:, None] // 2)) & mask).long()
    chosen = (torch.rand((B, T), generator=g, device=device) < MLM_FRACTION) & mask & (pos > 0)
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    nsp = torch.randint(0, 2, (B,), generator=g, device=device)
    return dict(input_ids=ids, attention_mask=mask.long(), token_type_ids=segment, labels=labels,
                next_sentence_label=nsp), lengths.tolist()


def hf_config(cfg: BertConfig):
    import transformers

    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
    )


def hf_pretraining_model(cfg: BertConfig, attn: str) -> torch.nn.Module:
    from transformers import BertForPreTraining as HFBertForPreTraining

    hcfg = hf_config(cfg)
    try:
        return HFBertForPreTraining._from_config(hcfg, attn_implementation=attn)
    except (AttributeError, TypeError):  # an older transformers without _from_config(attn_implementation=)
        hcfg._attn_implementation = attn
        return HFBertForPreTraining(hcfg)


def train_candidates(env: BenchEnv, *, allow_compile: bool = True, allow_hf: bool = True,
                     only: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Candidate names that can run here, and the skipped ones with their reason."""
    skipped: dict[str, str] = {}
    names: list[str] = []
    if env.cuda:
        names += ["fastbert", "fastbert-ref"]
    else:
        skipped["fastbert"] = "no CUDA device: the fused model is the reference model on a CPU (see fastbert-ref)"
        names.append("fastbert-ref")
    hf_ok = allow_hf
    if allow_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf_ok = False
            for n in ("hf-eager", "hf-sdpa", "hf-sdpa-compile"):
                skipped[n] = "transformers is not installed"
    else:
        for n in ("hf-eager", "hf-sdpa", "hf-sdpa-compile"):
            skipped[n] = "transformers baselines switched off (--no-hf)"
    if hf_ok:
        names += ["hf-eager", "hf-sdpa"]
        why = _compile_skip_reason(env, allow_compile)
        if why:
            skipped["hf-sdpa-compile"] = why
        else:
            names.append("hf-sdpa-compile")
        if _optimize_fn() is None:
            skipped["hf-sdpa+optimize"] = "fastbert.optimize is not available"
        elif not env.cuda:
            skipped["hf-sdpa+optimize"] = "no CUDA device: fastbert.optimize swaps in CUDA kernels"
        else:
            names.append("hf-sdpa+optimize")
    if _fastbert_skip_reason(env) and "fastbert" in names:
        names.remove("fastbert")
        skipped["fastbert"] = _fastbert_skip_reason(env)
    if only is not None:
        names = [n for n in names if n in only]
        skipped = {k: v for k, v in skipped.items() if k in only}
    return names, skipped


def _optimize_fn() -> Callable[..., Any] | None:
    """`fastbert.optimize` (swaps the fused layers into a transformers BERT), wherever it is exported."""
    import fastbert

    fn = getattr(fastbert, "optimize", None)
    if not callable(fn):  # the submodule, or nothing: look for the function inside it
        try:
            fn = getattr(importlib.import_module("fastbert.optimize"), "optimize", None)
        except ImportError:
            fn = None
    return fn if callable(fn) else None


@dataclass
class _Trainer:
    model: torch.nn.Module
    call: torch.nn.Module  # model or its compiled wrapper
    opt: torch.optim.Optimizer | None
    fastbert_api: bool

    def static_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.model.parameters())
        n += sum(t.numel() * t.element_size() for t in self.model.buffers())
        if self.opt is not None:
            for st in self.opt.state.values():
                n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n


def _build_trainer(name: str, cfg: BertConfig, env: BenchEnv, with_optimizer: bool) -> _Trainer:
    if name in ("fastbert", "fastbert-ref"):
        from .modeling import BertForPreTraining

        model = BertForPreTraining(cfg if name == "fastbert" else cfg.with_fusions(False))
    else:
        model = hf_pretraining_model(cfg, "eager" if name == "hf-eager" else "sdpa")
        if name == "hf-sdpa+optimize":
            model = _optimize_fn()(model) or model
    model = model.to(env.device).train()
    call = torch.compile(model) if name.endswith("-compile") else model
    opt = None
    if with_optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=env.cuda)
    return _Trainer(model, call, opt, name.startswith("fastbert"))


def _step_fn(tr: _Trainer, batch: dict[str, torch.Tensor], env: BenchEnv) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        if tr.opt is not None:
            tr.opt.zero_grad(set_to_none=True)
        else:
            for p in tr.model.parameters():
                p.grad = None
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.cuda):
            if tr.fastbert_api:
                loss = tr.call(**batch, masked_only=True).loss
            else:
                loss = tr.call(**batch).loss
        loss.backward()
        if tr.opt is not None:
            tr.opt.step()
        return loss

    return step


def run_train_cases(cases: Sequence[TrainCase], env: BenchEnv, *, rounds: int = 3, rep_ms: float = 300.0,
                    cpu_reps: int = 3, allow_compile: bool = True, allow_hf: bool = True,
                    only: Sequence[str] | None = None, with_optimizer: bool | None = None,
                    callables: dict[str, Callable[[], Any]] | None = None) -> list[Row]:
    """Training steps of each case; cases sharing a (size, T, B) share their models (so a compiled model
    is compiled once for the full and the padded batch). GPU: forward + backward + fused AdamW, bf16
    autocast. CPU: forward + backward in fp32 (no optimizer), as the issue asks. `callables` receives the
    step of each working candidate of the last case (models kept alive), as in `run_op_case`."""
    with_optimizer = env.cuda if with_optimizer is None else with_optimizer
    mode = "step" if with_optimizer else "fwd+bwd"
    names, skipped = train_candidates(env, allow_compile=allow_compile, allow_hf=allow_hf, only=only)
    rows: list[Row] = []
    groups: dict[tuple[str, int, int], list[TrainCase]] = {}
    for c in cases:
        groups.setdefault((c.size, c.T, c.B), []).append(c)
    for (size, T, B), group in groups.items():
        cfg = BertConfig.from_preset(size)
        trainers: dict[str, _Trainer] = {}
        errors: dict[str, str] = {}
        for n in names:
            try:
                trainers[n] = _build_trainer(n, cfg, env, with_optimizer)
            except Exception as e:
                errors[n] = f"build: {_short_error(e)}"
        for case in sorted(group, key=lambda c: c.padded):
            shape = f"B={B} T={T} L={cfg.num_hidden_layers} H={cfg.hidden_size}" + (" padded T/2..T" if case.padded
                                                                                 else "")
            dt = "bf16-autocast" if env.cuda else "fp32"

            def row(n: str, m: str, case=case, shape=shape, dt=dt, **kw) -> Row:
                return Row("train", case.label, case.size, n, m, dt, shape, **kw)

            for n, why in skipped.items():
                rows.append(row(n, "-", note=f"skipped: {why}"))
            batch, lengths = make_batch(cfg, B, T, case.padded, env.device)
            flops = train_flops(cfg, lengths)
            steps: dict[str, Callable[[], torch.Tensor]] = {}
            warm: dict[str, float] = {}
            for n, tr in trainers.items():
                if n in errors:
                    continue
                step = _step_fn(tr, batch, env)
                try:
                    warm[n] = first_call_s(step, env.device)
                    for _ in range(2):  # optimizer state exists, allocator and autotuning settled
                        loss = step()
                    if not torch.isfinite(loss.detach()).item():
                        raise RuntimeError(f"loss is {loss.item()}")
                    steps[n] = step
                except Exception as e:
                    errors[n] = _short_error(e)
            ms = interleaved_ms(steps, env.device, rounds=rounds, rep_ms=rep_ms, cpu_reps=cpu_reps,
                                errors=errors)
            for n in names:
                if n not in ms:
                    rows.append(row(n, mode, note=f"error: {errors.get(n, 'not measured')}"))
                    continue
                sec = ms[n] * 1e-3
                r = row(n, mode, ms=ms[n], warm_s=warm.get(n), seq_per_s=B / sec, tflops=flops / sec / 1e12)
                if env.ceil_tflops:
                    r.mfu = r.tflops / env.ceil_tflops
                if n.startswith("hf"):
                    r.note = "decodes all tokens; MFU counts the useful FLOPs only"
                if env.cuda:
                    try:
                        extra = extra_bytes(steps[n], env.device)
                        own = trainers[n].static_bytes() + sum(t.numel() * t.element_size() for t in batch.values())
                        r.extra_GB, r.peak_GB = extra / 1e9, (extra + own) / 1e9
                    except Exception as e:
                        r.note = f"memory: {_short_error(e)}"
                rows.append(r)
            if callables is not None:
                callables.clear()
                callables.update(steps)
            del steps, batch
        del trainers
        free_memory(env.device)
    return finish_rows(rows, env, "hf-sdpa")


# ---------------------------------------------------------------------------------------------- suites


@dataclass
class Plan:
    """What one run measures."""

    families: Sequence[str] = FAMILIES
    sizes: Sequence[str] | None = None  # model presets; None = the defaults for the device
    quick: bool = False
    modes: Sequence[str] = MODES
    rounds: int = 3
    train_cases: Sequence[TrainCase] | None = None
    kernel_ops: Sequence[str] | None = None
    op_shapes: Sequence[tuple[str, int, int]] | None = None  # (size, T, B) for kernels and attention
    candidates: Sequence[str] | None = None
    allow_compile: bool = True
    allow_hf: bool = True


def op_shapes(env: BenchEnv, plan: Plan) -> list[tuple[str, int, int]]:
    """(size, T, B) for the kernel and attention families."""
    if plan.op_shapes:
        return list(plan.op_shapes)
    if env.cuda:
        shapes = GPU_TRAIN_SHAPES_QUICK if plan.quick else GPU_TRAIN_SHAPES
    else:
        shapes = CPU_TRAIN_SHAPES_QUICK if plan.quick else CPU_TRAIN_SHAPES
    if plan.sizes:
        shapes = [s for s in shapes if s[0] in plan.sizes] or [(z, s[1], s[2]) for z in plan.sizes
                                                             for s in shapes[:1]]
    return list(shapes)


def default_train_cases(env: BenchEnv, plan: Plan) -> list[TrainCase]:
    cases = []
    for size, T, B in op_shapes(env, plan):
        cases += [TrainCase(size, T, B), TrainCase(size, T, B, padded=True)]
    return cases


def gpu_only_cases(plan: Plan) -> list[str]:
    """What a CUDA run would measure, for the 'skipped' section of a CPU run."""
    shapes = GPU_TRAIN_SHAPES_QUICK if plan.quick else GPU_TRAIN_SHAPES
    txt = ", ".join(f"{s}/{t}/{b}" for s, t, b in shapes)
    out = []
    if "attention" in plan.families:
        out.append(f"attention bf16 fwd/bwd/fwd+bwd at {txt} (eager, SDPA, compile, fused padded and varlen)")
    if "kernels" in plan.families:
        out.append(f"kernels bf16 at {txt} tokens (fused vs eager vs torch.compile)")
    if "train" in plan.families:
        out.append(f"training step (bf16 autocast, fused AdamW) at {txt}, full and padded, vs transformers")
    return out


def run_plan(env: BenchEnv, plan: Plan, *, log: Callable[[str], None] = print,
             on_rows: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Run every case of the plan; `on_rows` gets each case's rows as soon as they exist (so a run killed
    at its time limit keeps the cases it finished)."""
    rows: list[Row] = []

    def done(new: list[Row]) -> list[Row]:
        if on_rows is not None:
            on_rows(new)
        return new

    shapes = op_shapes(env, plan)
    rep_ms = 50.0 if plan.quick else 100.0
    cpu_reps = 3 if plan.quick else 5
    if "attention" in plan.families:
        for size, T, B in shapes:
            cfg = BertConfig.from_preset(size)
            case = attention_case(env, size, B, T, cfg.num_attention_heads, cfg.head_dim,
                                  allow_compile=plan.allow_compile)
            log(f"  measuring {case.label} ...")
            rows += done(run_op_case(case, env, modes=plan.modes, rounds=plan.rounds, rep_ms=rep_ms,
                                     cpu_reps=cpu_reps, only=plan.candidates))
    if "kernels" in plan.families:
        for size, T, B in shapes:
            for case in kernel_cases(env, size, B, T, allow_compile=plan.allow_compile, ops=plan.kernel_ops):
                log(f"  measuring {case.label} ...")
                rows += done(run_op_case(case, env, modes=plan.modes, rounds=plan.rounds, rep_ms=rep_ms,
                                         cpu_reps=cpu_reps, only=plan.candidates))
    if "train" in plan.families:
        cases = list(plan.train_cases) if plan.train_cases else default_train_cases(env, plan)
        groups: dict[tuple[str, int, int], list[TrainCase]] = {}
        for c in cases:
            groups.setdefault((c.size, c.T, c.B), []).append(c)
        for group in groups.values():  # one group = one set of models, full and padded batch
            log(f"  measuring {', '.join(c.label for c in group)} ...")
            rows += done(run_train_cases(group, env, rounds=plan.rounds, rep_ms=3 * rep_ms, cpu_reps=cpu_reps,
                                         allow_compile=plan.allow_compile, allow_hf=plan.allow_hf,
                                         only=plan.candidates))
    return rows


def write_csvs(rows: Sequence[Row], env: BenchEnv, csv_dir: str | os.PathLike) -> list[Path]:
    written = []
    for fam, fname in CSV_FILES.items():
        fam_rows = [r.to_dict(env) for r in rows if r.family == fam]
        if fam_rows:
            written.append(append_csv(Path(csv_dir) / fname, fam_rows))
    return written


# ---------------------------------------------------------------------------------------------- table


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _short_shape(shape: str) -> str:
    """The sizes of a shape string, without the dropout / padding words (those are in the header)."""
    return " ".join(w for w in shape.split() if "=" in w and not w.startswith("p="))


def format_table(rows: Sequence[Row], env: BenchEnv) -> str:
    """One readable table per family; skipped candidates and errors listed under each."""
    cols = ("case", "candidate", "mode", "ms", "x base", "TFLOP/s", "GB/s", "%ceil", "seq/s", "MFU",
            "peak GB", "warm s", "check")
    out = []
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r.family == fam]
        if not fam_rows:
            continue
        measured = [r for r in fam_rows if r.ms is not None]
        base = next((r.baseline for r in measured if r.baseline), "")
        out.append(f"\n== {fam} ({env.gpu}, {measured[0].dtype if measured else '-'})"
                   + (f"; x base = {base} time / candidate time" if base else ""))
        table = [cols]
        for r in measured:
            table.append((
                r.case if fam == "train" else f"{r.case} {r.size} {_short_shape(r.shape)}", r.candidate, r.mode,
                _fmt(r.ms, ".3f"), _fmt(r.speedup, ".2f"), _fmt(r.tflops, ".3g"), _fmt(r.gbps, ".3g"),
                _fmt(r.pct_ceiling, ".1f"), _fmt(r.seq_per_s, ".1f"),
                _fmt(None if r.mfu is None else 100 * r.mfu, ".1f"), _fmt(r.peak_GB, ".2f"),
                _fmt(r.warm_s, ".2f"), r.parity))
        widths = [max(len(str(t[i])) for t in table) for i in range(len(cols))]
        for t in table:
            out.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(t, widths, strict=True))).rstrip())
        measured_notes = sorted({f"{r.candidate}: {r.note}" for r in measured if r.note})
        if measured_notes:
            out.append("  notes:")
            out += [f"    {n}" for n in measured_notes]
        notes = sorted({f"{r.candidate}: {r.note}" for r in fam_rows if r.ms is None and r.note})
        if notes:
            out.append("  not measured:")
            out += [f"    {n}" for n in notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastbert-bench",
        description="Time fastbert's kernels and training step against PyTorch eager, SDPA, torch.compile and "
                    "transformers (CUDA: bf16; CPU: small fp32 cases, GPU cases listed as skipped).")
    ap.add_argument("--quick", action="store_true", help="smaller batches (and the tiny preset on a CPU)")
    ap.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), help="model presets (default: base large "
                    "on CUDA, mini on CPU)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="kernel/attention modes")
    ap.add_argument("--ops", nargs="+", help="kernel ops to run (default all): qkv_projection softmax_dropout "
                    "linear_bias_gelu bias_dropout_add_layernorm mlm_cross_entropy")
    ap.add_argument("--train-cases", nargs="+", metavar="SIZE/T/B[/padded]", help="e.g. base/128/256/padded")
    ap.add_argument("--op-shapes", nargs="+", metavar="SIZE/T/B", help="kernel and attention shapes, e.g. "
                    "base/128/256 (N = B·T tokens)")
    ap.add_argument("--candidates", nargs="+", help="only these candidates (the family baseline always runs)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per candidate (median reported)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--csv-dir", default=None, help="append rows to <dir>/{kernels,attention,train_step}.csv "
                    "(default: benchmarks/results on CUDA when that folder exists here, none on a CPU; "
                    "'' = no CSV)")
    ap.add_argument("--json", default=None, help="also write all rows (and the environment) to this JSON file")
    ap.add_argument("--ceilings-json", default=None, help="read the ceilings from (or store them in) this file")
    ap.add_argument("--progress", action="store_true", help="print each case's table as soon as it is measured")
    ap.add_argument("--ceilings-only", action="store_true", help="measure the device ceilings and stop")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier timings on a "
                    "shared machine; 0 = torch's default)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        train_cases = [TrainCase.parse(s) for s in args.train_cases] if args.train_cases else None
        op_shapes = None
        if args.op_shapes:
            parsed = [TrainCase.parse(s) for s in args.op_shapes]
            op_shapes = [(c.size, c.T, c.B) for c in parsed]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = make_env(args.device)
    if not env.cuda and args.threads:
        torch.set_num_threads(args.threads)
    vers = ", ".join(f"{k} {v}" for k, v in env.versions.items())
    print(f"fastbert-bench on {env.gpu}; {vers}; commit {env.commit}; run {env.run_id}", flush=True)
    load_or_measure_ceilings(env, args.ceilings_json, quick=args.quick)
    kind = "bf16 matmul" if env.cuda else "fp32 matmul"
    print(f"measured ceilings: {kind} {env.ceil_tflops:.3g} TFLOP/s, copy {env.ceil_gbps:.3g} GB/s", flush=True)
    if args.ceilings_only:
        _write_json(args.json, [], env)
        return 0
    plan = Plan(families=args.family, sizes=args.sizes, quick=args.quick, modes=args.modes, rounds=args.rounds,
                train_cases=train_cases, kernel_ops=args.ops, op_shapes=op_shapes, candidates=args.candidates,
                allow_compile=not args.no_compile, allow_hf=not args.no_hf)
    csv_dir = args.csv_dir
    if csv_dir is None:  # CPU figures are smoke tests: they go to a CSV only when asked
        csv_dir = "benchmarks/results" if env.cuda and os.path.isdir("benchmarks/results") else ""
    written: set[Path] = set()
    so_far: list[Row] = []

    def on_rows(new: list[Row]) -> None:
        so_far.extend(new)
        if csv_dir:
            written.update(write_csvs(new, env, csv_dir))
        _write_json(args.json, so_far, env)
        if args.progress:
            print(format_table(new, env), flush=True)

    rows = run_plan(env, plan, log=lambda s: print(s, flush=True), on_rows=on_rows)
    print(format_table(rows, env))
    if not env.cuda:
        print("\nskipped: no CUDA device")
        for line in gpu_only_cases(plan):
            print(f"  {line}")
        print("  (no GPU figure above: every number was measured on this CPU, fp32, in this run)")
    for p in sorted(written):
        print(f"appended to {p}")
    return 0


def _write_json(path: str | None, rows: Sequence[Row], env: BenchEnv) -> None:
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"gpu": env.gpu, "versions": env.versions, "commit": env.commit, "run_id": env.run_id,
                   "ceil_tflops": env.ceil_tflops, "ceil_gbps": env.ceil_gbps,
                   "rows": [r.to_dict(env) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
