"""Triton ahead of the timing: record what a run will compile, compile it across the host's cores into Triton's
cache, and (for a first GPU window) cut each autotune list to the few configs the compile-time data ranks best.

    FASTBERT_TRITON_RECORD=specs.jsonl fastbert-bench ...   # record every Triton compile the run asks for; no
                                                            # kernel is compiled or run (outputs stay garbage)
    python -m fastbert.bench.precompile --specs specs.jsonl  # compile them, all cores, into TRITON_CACHE_DIR
    python -m fastbert.bench.precompile --record '["python3", "-m", "fastbert.bench", ...]' ...
                                       # run recording commands and compile what they record as it arrives
    python -m fastbert.bench.precompile --aot [--top 3]      # no GPU: compile for sm_90 what the headline cases use
    FASTBERT_AUTOTUNE_TOP=3 fastbert-bench ...               # the first-window narrowing
    pytest -p tests.precompile_plugin ...                    # both variables inside a test run

Recording uses Triton 3.6's `knobs.runtime.jit_cache_hook`: called with the kernel's specialization (signature,
constexprs, alignment attributes, options: what `JITFunction.preload` reads) before every compile, it records it and
returns True, which makes the launch return without compiling or launching anything. Autotuners "benchmark" each
config by that one skipped call, so every config a launch can use is recorded. What is recorded is exactly what the
run's launchers ask for (their real arguments specialised by Triton's own binder), so compiling it with
`triton.compile` gives the same cache keys: the timed run then finds every kernel in `TRITON_CACHE_DIR` (shared by
every process of a run) instead of compiling one config after another while the host's cores wait.

Narrowing (`FASTBERT_AUTOTUNE_TOP=K`) wraps the `early_config_prune` of every autotuned kernel of `kernels/` (the
table of `kernels.aot_check`) so that, after the kernel's own pruning (dtype, head dim, epilogue), only the K configs
ranked best by `benchmarks/results/aot_sm90.csv` (`FASTBERT_AUTOTUNE_RANKING` to use another file) are tried. The
ranking, compile-time evidence only: first the configs that compiled clean (no spill bytes, no ptxas warning such as
C7515 serialised wgmma, no duplicated warpgroup work, no `mma.sync` in a 16-bit kernel), then the fewest SASS
main-loop instructions per unit of work a thread does in one iteration (loop instructions ÷ (product of the
config's BLOCK_* sizes ÷ threads): PERF.md's issue budget), then the fewest registers. A config without a row ranks
last; the rows of the launch's dtype are used, those agreeing with most of the launch's switches (BLOCK_D, VARLEN,
HAS_MASK, ...) first, the worst of them counting.

Caution: a recorded run computes nothing: never time or check anything in it. Recording needs the CUDA driver (the
specialization is taken on the device's tensors); `--aot` does not, but Triton specialises the runtime arguments
(divisibility of sizes and strides) in ways `kernels.aot_check` can only approximate, so its compiles measure the
compile cost and may or may not be cache hits later. Narrowing trades tuning for time: the full lists are for later
windows.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_ENV = "FASTBERT_TRITON_RECORD"
TOP_ENV = "FASTBERT_AUTOTUNE_TOP"
RANKING_ENV = "FASTBERT_AUTOTUNE_RANKING"
RANKING_CSV = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "aot_sm90.csv"
DTYPE_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


# ---------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class CompiledConfig:
    """One row of the compile-time table (`kernels.aot_check --csv`): a kernel variant compiled for sm_90."""

    kernel: str
    dtype: str  # activation dtype
    constexprs: dict[str, str]  # every constexpr of the variant, values as the CSV writes them
    num_warps: int
    num_stages: int
    clean: bool
    loop_instructions: int | None
    registers: int | None

    def cost(self, blocks: dict[str, int]) -> tuple[int, float, int]:
        """(0 if clean else 1, SASS loop instructions per unit of work per thread, registers): lower is better."""
        work = math.prod(v for k, v in blocks.items() if k.startswith("BLOCK_")) / (32 * self.num_warps)
        per_work = self.loop_instructions / work if self.loop_instructions and work else math.inf
        return (0 if self.clean else 1, per_work, self.registers or 0)


def _int(text: str) -> int | None:
    return int(text) if text not in ("", "None") else None


def load_ranking(path: str | os.PathLike) -> dict[tuple[str, str], list[CompiledConfig]]:
    """(kernel, activation dtype) → its compiled variants, from a CSV written by `kernels.aot_check --csv`."""
    table: dict[tuple[str, str], list[CompiledConfig]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["ok"] != "1":
                continue
            words = r["variant"].split(" [")[0].split()
            constexprs = dict(w.split("=", 1) for w in words if "=" in w)
            act = r["dtype"].split("/")[0]
            clean = (r["spill_bytes"] == "0" and r["ptxas_warnings"] == "0" and r["warpgroup_dup"] == "0"
                     and (act == "fp32" or r["mma_sync"] == "0"))
            table.setdefault((r["kernel"], act), []).append(CompiledConfig(
                r["kernel"], act, constexprs, int(r["num_warps"]), int(r["num_stages"]), clean,
                _int(r["sass_loop_instructions"]), _int(r["registers"])))
    return table


def _csv_value(v: Any) -> str:
    return {True: "1", False: "0"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def _has_config(r: CompiledConfig, config) -> bool:
    return (r.num_warps == config.num_warps and r.num_stages == config.num_stages
            and all(r.constexprs.get(k) == _csv_value(v) for k, v in config.kwargs.items()))


def rank_configs(configs: list, rows: list[CompiledConfig], launch: dict[str, Any]) -> list:
    """`configs` (triton.Config) best first by their compiled cost (`CompiledConfig.cost`), read from the rows of one
    switch set (the non-tile constexprs of a row) so that every config is judged alike: the set that has the most
    of the configs, then the one agreeing with most of the `launch` constexprs. Configs without a row go last;
    ties keep the autotuner's order."""
    if not configs:
        return []
    tile_keys = set(configs[0].kwargs)
    sets: dict[frozenset, list[CompiledConfig]] = {}
    for r in rows:
        sets.setdefault(frozenset((k, v) for k, v in r.constexprs.items() if k not in tile_keys), []).append(r)
    if not sets:
        return list(configs)

    def preference(switches: frozenset) -> tuple[int, int]:
        have = sum(any(_has_config(r, c) for r in sets[switches]) for c in configs)
        agree = sum(dict(switches).get(k) == _csv_value(v) for k, v in launch.items() if k in dict(switches))
        return have, agree

    chosen = sets[max(sets, key=preference)]

    def cost(c) -> tuple[int, float, int]:
        return min((r.cost(dict(c.kwargs)) for r in chosen if _has_config(r, c)), default=(2, math.inf, 0))

    return sorted(configs, key=cost)


def _launch_dtype(named_args: dict[str, Any]) -> str | None:
    """The activation dtype of a launch: the dtype of its first tensor argument (a TMA descriptor's base)."""
    for v in named_args.values():
        t = getattr(v, "base", v)
        if hasattr(t, "dtype") and hasattr(t, "data_ptr"):
            return DTYPE_NAMES.get(str(t.dtype))
    return None


def _autotuners() -> Iterator[tuple[str, Any]]:
    """(name, Autotuner) of every autotuned kernel in `kernels/` (the table of `kernels.aot_check`)."""
    from kernels.aot_check import KERNELS

    for name, spec in KERNELS.items():
        obj = getattr(importlib.import_module(spec.module), spec.name)
        if hasattr(obj, "configs") and hasattr(obj, "prune_configs"):
            yield name, obj


def narrow_autotuning(top: int, ranking: str | os.PathLike | None = None) -> list[str]:
    """Cut every autotune list of `kernels/` to the `top` configs ranked best (module docstring); returns the
    kernels narrowed. Idempotent (a second call replaces the first's cut)."""
    if top < 1:
        raise ValueError(f"{TOP_ENV} must be a positive integer, got {top}")
    path = Path(ranking or os.environ.get(RANKING_ENV) or RANKING_CSV)
    if not path.is_file():
        raise FileNotFoundError(f"{TOP_ENV}: no compile-time data at {path} to rank the configs by (write it with "
                                f"`python -m kernels.aot_check --csv {path}`, or point {RANKING_ENV} at one)")
    table = load_ranking(path)
    narrowed = []
    for name, tuner in _autotuners():
        original = getattr(tuner.early_config_prune, "_fastbert_original", tuner.early_config_prune)

        def prune(configs, named_args, *, _name=name, _original=original, **kwargs):
            kept = _original(configs, named_args, **kwargs) if _original is not None else list(configs)
            rows = table.get((_name, _launch_dtype(named_args) or ""), [])
            return rank_configs(list(kept), rows, kwargs)[:top]

        prune._fastbert_original = original
        tuner.early_config_prune = prune
        narrowed.append(name)
    return narrowed


# ---------------------------------------------------------------------------------------------- recording


def _one_call(kernel_call: Callable[[], Any], quantiles: Iterable[float] = ()) -> list[float]:
    """An autotuner's benchmark while recording: the (skipped) launch once, every config equal."""
    kernel_call()
    return [0.0] * max(1, len(tuple(quantiles)))


def record_compiles(path: str | os.PathLike) -> None:
    """From now on in this process every Triton compile request is appended to `path` (one JSON line: the target
    and the specialization as `JITFunction.preload` reads it) and skipped: nothing is compiled or launched."""
    from triton import knobs
    from triton.runtime import driver

    out = open(path, "a", encoding="utf-8")  # kept open for the life of the process; one flushed line per request
    target: list[Any] = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        if not target:
            t = driver.active.get_current_target()
            target.extend([t.backend, t.arch, t.warp_size])
        out.write(json.dumps({"target": target, "spec": compile["specialization_data"]}) + "\n")
        out.flush()
        return True  # skip the compile and the launch

    knobs.runtime.jit_cache_hook = hook
    for _, tuner in _autotuners():
        tuner.__dict__["do_bench"] = _one_call  # shadows the autotuner's cached `do_bench` property


def apply_from_env(log: Callable[[str], None] = print) -> None:
    """The switches of the environment (`FASTBERT_AUTOTUNE_TOP`, `FASTBERT_TRITON_RECORD`), said out loud."""
    if os.environ.get(TOP_ENV):
        top = int(os.environ[TOP_ENV])
        names = narrow_autotuning(top)
        log(f"first-window mode ({TOP_ENV}={top}): autotune lists cut to the {top} configs ranked best by "
            f"compile-time data, for {len(names)} kernels")
    if os.environ.get(RECORD_ENV):
        record_compiles(os.environ[RECORD_ENV])
        log(f"recording Triton compiles to {os.environ[RECORD_ENV]} ({RECORD_ENV}): no kernel is compiled or run, "
            "every figure of this process is meaningless")


# ---------------------------------------------------------------------------------------------- compiling


def _jit_function(full_name: str):
    """The JITFunction named "package.module.kernel" (an autotuner or heuristics wrapper unwrapped)."""
    module, _, attr = full_name.rpartition(".")
    fn = getattr(importlib.import_module(module), attr)
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _tuple(v: Any) -> Any:
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v


def compile_record(line: str) -> tuple[str, float, str]:
    """Compile one recorded request into Triton's cache: (kernel, seconds, error or "")."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    start = time.perf_counter()
    rec = json.loads(line)
    spec = json.loads(rec["spec"])
    name = spec["name"].rpartition(".")[2]
    try:
        fn = _jit_function(spec["name"])
        constexprs = {
            tuple(k): tl.dtype(v) if tl.dtype.is_dtype(v) else
            tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v
            for k, v in zip(spec["constant_keys"], spec["constant_vals"], strict=True)
        }  # fmt: skip
        attrs = dict(zip(map(tuple, spec["attrs_keys"]), spec["attrs_vals"], strict=True))
        signature = {k: _tuple(v) for k, v in spec["signature"].items()}
        target = GPUTarget(*rec["target"])
        options = make_backend(target).parse_options({k: _tuple(v) for k, v in spec["options"].items()})
        triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # a failed compile is reported; the timed run will raise it again where it matters
        last = (str(e).strip().splitlines() or [""])[-1]  # Triton's message ends with the reason
        return name, time.perf_counter() - start, f"{type(e).__name__}: {last}"
    return name, time.perf_counter() - start, ""


def compile_aot_variant(variant: Any, arch: int = 90) -> tuple[str, float, str]:
    """Compile one `kernels.aot_check.Variant` for sm_`arch` into Triton's cache: (kernel, seconds, error or "")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.aot_check import build_source_args

    start = time.perf_counter()
    try:
        fn, signature, constexprs, attrs = build_source_args(variant)
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as e:
        return variant.kernel, time.perf_counter() - start, f"{type(e).__name__}: {e}"
    return variant.kernel, time.perf_counter() - start, ""


def headline_variants(dtype: str = "bf16", head_dim: int = 64) -> list[Any]:
    """`kernels.aot_check`'s default variants that the headline cases use: `dtype` activations (parameters in
    `dtype` or fp32), attention at `head_dim`, every kernel but the Triton GEMMs (cuBLAS is the default GEMM path).
    The autotuned kernels' configs are what their pruning keeps: after `narrow_autotuning`, the narrowed lists."""
    from kernels.aot_check import DEFAULT, _variants

    return [v for v in _variants(DEFAULT) if v.act == dtype and "_gemm_" not in v.kernel
            and (not v.shapes.startswith("d=") or v.shapes == f"d={head_dim}")]


@dataclass
class CompileReport:
    submitted: int = 0
    failed: int = 0
    compile_s: float = 0.0  # summed over the workers
    errors: list[str] | None = None


class CompilePool:
    """Compiles into Triton's cache (TRITON_CACHE_DIR, inherited by the workers) on `jobs` spawned processes,
    each request once."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        self.futures: list[Future] = []
        self.seen: set[str] = set()

    def submit(self, fn: Callable[..., tuple[str, float, str]], item: Any, key: str) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        self.futures.append(self.pool.submit(fn, item))
        return True

    def finish(self) -> CompileReport:
        report = CompileReport(len(self.futures), errors=[])
        for f in self.futures:
            name, seconds, error = f.result()
            report.compile_s += seconds
            if error:
                report.failed += 1
                report.errors.append(f"{name}: {error}")
        self.pool.shutdown()
        return report


def _record_key(line: str) -> str:
    spec = json.loads(json.loads(line)["spec"])
    return f"{spec['name']}|{spec['key']}"


def run_recorders(commands: list[list[str]], folder: Path, pool: CompilePool, timeout_s: float = math.inf,
                  log: Callable[[str], None] = print) -> list[tuple[list[str], int]]:
    """Run each recording command at once (each with its own record file under `folder`), feed every new request to
    `pool` as it is written; returns (command, exit status) when all have ended, those still running after
    `timeout_s` killed (what they recorded is compiled all the same)."""
    deadline = time.monotonic() + timeout_s
    procs = []
    for i, cmd in enumerate(commands):
        path, log_path = folder / f"record-{i}.jsonl", folder / f"record-{i}.log"
        path.touch()
        env = dict(os.environ, **{RECORD_ENV: str(path)})
        with open(log_path, "w") as sink:  # a file, not a pipe: a chatty recorder never blocks on it
            procs.append((cmd, subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT), path, [0]))
    while True:
        running = [p for _, p, _, _ in procs if p.poll() is None]
        for _, _, path, offset in procs:
            with open(path, encoding="utf-8") as f:
                f.seek(offset[0])
                chunk = f.read()
            complete, _, _ = chunk.rpartition("\n")  # a line still being written waits for the next pass
            offset[0] += len(complete) + 1 if complete else 0
            for line in filter(None, complete.split("\n")):
                pool.submit(compile_record, line, _record_key(line))
        if not running:
            break
        if time.monotonic() > deadline:
            for p in running:
                p.kill()
            log(f"  {len(running)} recorders still running after {timeout_s:.0f} s: killed")
        time.sleep(0.2)
    out = []
    for cmd, p, path, _ in procs:
        if p.returncode:
            text = path.with_suffix(".log").read_text(encoding="utf-8", errors="replace")
            tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
            log(f"  recorder exited {p.returncode}: {' '.join(cmd[-6:])}: {' | '.join(tail)}")
        out.append((cmd, p.returncode))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastbert.bench.precompile", description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="append", default=[], metavar="ARGV_JSON",
                    help="a command (JSON list) to run with recording on; repeatable; all run at once")
    ap.add_argument("--record-dir", type=Path, default=None, help="where the recorders write (default: a new "
                    "temporary folder)")
    ap.add_argument("--record-timeout", type=float, default=math.inf, help="kill the recorders still running after "
                    "this many seconds, then compile what they recorded")
    ap.add_argument("--specs", action="append", default=[], metavar="PATH", help="recorded requests to compile")
    ap.add_argument("--aot", action="store_true", help="compile for sm_90 what the headline cases use "
                    "(kernels.aot_check's variants; no GPU needed): the compile cost without recording")
    ap.add_argument("--top", type=int, default=None, help="with --aot: each autotune list cut as FASTBERT_AUTOTUNE_TOP")
    ap.add_argument("--limit", type=int, default=0, help="with --aot: only the first N variants")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("precompile: TRITON_INTERPRET=1 is set: interpreter kernels cannot be compiled", file=sys.stderr)
        return 2
    cache = os.environ.get("TRITON_CACHE_DIR", "(Triton's default cache)")
    start = time.perf_counter()
    pool = CompilePool(args.jobs)
    if args.aot:
        if args.top:
            narrow_autotuning(args.top)
        variants = headline_variants()
        variants = variants[: args.limit] if args.limit else variants
        for v in variants:
            pool.submit(compile_aot_variant, v, f"{v.kernel}|{v.label()}|{v.num_warps}|{v.num_stages}")
        print(f"precompile: {len(variants)} aot variants for sm_90 (top {args.top or 'all'}), {args.jobs} jobs, "
              f"cache {cache}", flush=True)
    for path in args.specs:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                pool.submit(compile_record, line, _record_key(line))
    if args.record:
        commands = [json.loads(c) for c in args.record]
        folder = args.record_dir or Path(tempfile.mkdtemp(prefix="fastbert_record_"))
        folder.mkdir(parents=True, exist_ok=True)
        print(f"precompile: recording {len(commands)} commands, compiling as requests arrive, {args.jobs} jobs, "
              f"cache {cache}", flush=True)
        statuses = run_recorders(commands, folder, pool, args.record_timeout)
        print(f"precompile: recorders done in {time.perf_counter() - start:.1f} s "
              f"({sum(rc == 0 for _, rc in statuses)}/{len(statuses)} exited 0), {len(pool.seen)} distinct requests",
              flush=True)
    report = pool.finish()
    wall = time.perf_counter() - start
    for e in report.errors or []:
        print(f"  compile error: {e}")
    per = report.compile_s / report.submitted if report.submitted else 0.0
    print(f"precompile: {report.submitted} compiles ({report.failed} failed) in {wall:.1f} s wall on {args.jobs} "
          f"processes; {report.compile_s:.1f} s of compiling, {per:.2f} s per compile", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
