"""`fastbert-bench`: the plan of a run (families, shapes, candidates), running it, and the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._atomic import write_text_atomic
from ..config import PRESETS, BertConfig
from .attention import attention_case
from .cases import (
    CPU_TRAIN_SHAPES,
    CPU_TRAIN_SHAPES_QUICK,
    GPU_TRAIN_SHAPES,
    GPU_TRAIN_SHAPES_QUICK,
    MODES,
    run_op_case,
)
from .data import describe_data_family, run_data_family
from .inference import (
    CPU_INFERENCE_CASES,
    CPU_MAX_LEN,
    GPU_INFERENCE_CASES,
    InferenceCase,
    inference_candidates,
    run_inference_cases,
)
from .kernel_cases import KERNEL_OPS, kernel_cases
from .peers import LIGER
from .results import DEFAULT_FAMILIES, FAMILIES, Row, format_table, row_sink, write_csvs
from .timing import BenchEnv, git_commit, load_or_measure_ceilings, make_env, versions
from .train_step import TrainCase, family_train_cases, run_train_cases, train_candidates

# ---------------------------------------------------------------------------------------------- suites


@dataclass
class Plan:
    """What one run measures."""

    families: Sequence[str] = DEFAULT_FAMILIES
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
    inference_cases: Sequence[InferenceCase] | None = None


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
    return cases + family_train_cases(env.cuda, plan.quick, plan.sizes)


def default_inference_cases(env: BenchEnv, plan: Plan) -> list[InferenceCase]:
    if plan.inference_cases:
        return list(plan.inference_cases)
    if env.cuda:
        specs = [c.replace("/128", "/32") for c in GPU_INFERENCE_CASES] if plan.quick else GPU_INFERENCE_CASES
        return [InferenceCase.parse(c) for c in specs]
    specs = [c.rsplit("/", 1)[0] + "/4" for c in CPU_INFERENCE_CASES] if plan.quick else CPU_INFERENCE_CASES
    return [InferenceCase.parse(c, max_len=64 if plan.quick else CPU_MAX_LEN) for c in specs]


def gpu_only_cases(plan: Plan) -> list[str]:
    """What a CUDA run would measure, for the 'skipped' section of a CPU run."""
    shapes = GPU_TRAIN_SHAPES_QUICK if plan.quick else GPU_TRAIN_SHAPES
    txt = ", ".join(f"{s}/{t}/{b}" for s, t, b in shapes)
    out = []
    if "attention" in plan.families:
        out.append(f"attention bf16 fwd/bwd/fwd+bwd at {txt} (eager, SDPA, compile, fused padded and varlen, "
                   "peers sdpa-flash, sdpa-cudnn, sdpa-flash-varlen, flash-attn-varlen)")
    if "kernels" in plan.families:
        out.append(f"kernels bf16 at {txt} tokens (fused vs eager vs torch.compile, peers liger and cublaslt)")
    if "train" in plan.families:
        family = ", ".join(c.label for c in family_train_cases(True, plan.quick))
        out.append(f"training step (bf16 autocast, fused AdamW) at {txt}, full and padded, and {family}, vs "
                   "transformers (SDPA, compile, flash_attention_2, attn_implementation='fastbert', optimize())")
    if "inference" in plan.families:
        out.append(f"inference bf16 {', '.join(GPU_INFERENCE_CASES)} (fused model vs transformers SDPA, compile, "
                   "optimize(), sentence-transformers)")
    return out


def describe_plan(env: BenchEnv, plan: Plan, runnable: set[str] | None = None) -> list[str]:
    """The cases and candidates a run of `plan` on `env` would measure, and the skipped ones with their reason,
    without making a tensor (the dry run: every case builder runs, so every import and argument is checked).
    `runnable`, when given, receives the names of the candidates that would run."""
    lines: list[str] = []
    known: set[str] = set()

    def add(label: str, names: Sequence[str], skipped: dict[str, str]) -> None:
        known.update(names, skipped)
        if runnable is not None:
            runnable.update(names)
        lines.append(f"  {label}: {', '.join(names) or '-'}")
        lines.extend(f"    skipped {n}: {why}" for n, why in skipped.items())

    def add_case(case) -> None:
        keep = plan.candidates
        add(case.label, [n for n in case.candidates if keep is None or n in keep or n == case.baseline],
            {k: v for k, v in case.skipped.items() if keep is None or k in keep})

    shapes = op_shapes(env, plan)
    if "attention" in plan.families:
        for size, T, B in shapes:
            cfg = BertConfig.from_preset(size)
            add_case(attention_case(env, size, B, T, cfg.num_attention_heads, cfg.head_dim,
                                    allow_compile=plan.allow_compile))
    if "kernels" in plan.families:
        for size, T, B in shapes:
            for case in kernel_cases(env, size, B, T, allow_compile=plan.allow_compile, ops=plan.kernel_ops):
                add_case(case)
    if "train" in plan.families:
        cases = list(plan.train_cases) if plan.train_cases else default_train_cases(env, plan)
        for arch in dict.fromkeys(c.arch for c in cases):  # candidates depend on the architecture
            names, skipped = train_candidates(env, allow_compile=plan.allow_compile, allow_hf=plan.allow_hf,
                                              only=plan.candidates, arch=arch)
            add(", ".join(c.label for c in cases if c.arch == arch), names, skipped)
    if "inference" in plan.families:
        cases = default_inference_cases(env, plan)
        for arch in dict.fromkeys(c.arch for c in cases):
            names, skipped = inference_candidates(env, allow_compile=plan.allow_compile, allow_hf=plan.allow_hf,
                                                  only=plan.candidates, arch=arch)
            add(", ".join(c.label for c in cases if c.arch == arch), names, skipped)
    unknown = sorted(set(plan.candidates or ()) - known)
    if unknown:
        raise ValueError(f"--candidates {' '.join(unknown)}: no such candidate in families {list(plan.families)}")
    if "data" in plan.families:
        lines += describe_data_family(plan.quick)
    return lines


def run_plan(env: BenchEnv, plan: Plan, *, log: Callable[[str], None] = print,
             on_rows: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Run every case of the plan; `on_rows` gets rows as soon as a family reports them (`report_rows`: a case's
    skipped candidates, each mode of a kernel or attention case, each training, inference or data case), so a run
    killed at its time limit keeps every row measured before."""
    with row_sink(on_rows) if on_rows is not None else contextlib.nullcontext():
        return _run_families(env, plan, log)


def _run_families(env: BenchEnv, plan: Plan, log: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    shapes = op_shapes(env, plan)
    rep_ms = 50.0 if plan.quick else 100.0
    cpu_reps = 3 if plan.quick else 5
    if "attention" in plan.families:
        for size, T, B in shapes:
            cfg = BertConfig.from_preset(size)
            case = attention_case(env, size, B, T, cfg.num_attention_heads, cfg.head_dim,
                                  allow_compile=plan.allow_compile)
            log(f"  measuring {case.label} ...")
            rows += run_op_case(case, env, modes=plan.modes, rounds=plan.rounds, rep_ms=rep_ms,
                                cpu_reps=cpu_reps, only=plan.candidates)
    if "kernels" in plan.families:
        for size, T, B in shapes:
            for case in kernel_cases(env, size, B, T, allow_compile=plan.allow_compile, ops=plan.kernel_ops):
                log(f"  measuring {case.label} ...")
                rows += run_op_case(case, env, modes=plan.modes, rounds=plan.rounds, rep_ms=rep_ms,
                                    cpu_reps=cpu_reps, only=plan.candidates)
    if "train" in plan.families:
        cases = list(plan.train_cases) if plan.train_cases else default_train_cases(env, plan)
        groups: dict[tuple[str, int, int], list[TrainCase]] = {}
        for c in cases:
            groups.setdefault((c.size, c.T, c.B), []).append(c)
        for group in groups.values():  # one group = one set of models, full and padded batch
            log(f"  measuring {', '.join(c.label for c in group)} ...")
            rows += run_train_cases(group, env, rounds=plan.rounds, rep_ms=3 * rep_ms, cpu_reps=cpu_reps,
                                    allow_compile=plan.allow_compile, allow_hf=plan.allow_hf,
                                    only=plan.candidates)
    if "inference" in plan.families:
        by_model: dict[str, list[InferenceCase]] = {}
        for c in default_inference_cases(env, plan):
            by_model.setdefault(c.model, []).append(c)
        for group in by_model.values():  # one group = one set of models; rows kept as each case finishes
            log(f"  measuring {', '.join(c.label for c in group)} ...")
            rows += run_inference_cases(group, env, rounds=plan.rounds, rep_ms=2 * rep_ms, cpu_reps=cpu_reps,
                                        allow_compile=plan.allow_compile, allow_hf=plan.allow_hf,
                                        only=plan.candidates)
    if "data" in plan.families:
        log("  measuring the data family (CPU: loader, fastbert-prepare) ...")
        rows += run_data_family(env, plan.quick, plan.rounds, log=log)  # reported case by case
    return rows


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastbert-bench",
        description="Time fastbert's kernels and training step against PyTorch eager, SDPA, torch.compile and "
                    "transformers (CUDA: bf16; CPU: small fp32 cases, GPU cases listed as skipped).")
    ap.add_argument("--quick", action="store_true", help="smaller batches (and the tiny preset on a CPU)")
    ap.add_argument("--family", nargs="+", choices=FAMILIES, default=list(DEFAULT_FAMILIES),
                    help="default: kernels attention train (inference and data only when named)")
    ap.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), help="model presets (default: base large "
                    "on CUDA, mini on CPU)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="kernel/attention modes")
    ap.add_argument("--ops", nargs="+", choices=KERNEL_OPS, help="kernel ops to run (default all)")
    ap.add_argument("--train-cases", nargs="+", metavar="SIZE/T/B[/padded]", help="e.g. base/128/256/padded")
    ap.add_argument("--op-shapes", nargs="+", metavar="SIZE/T/B", help="kernel and attention shapes, e.g. "
                    "base/128/256 (N = B·T tokens)")
    ap.add_argument("--inference-cases", nargs="+", metavar="MODEL/CORPUS/B", help="e.g. minilm/wikipedia/128 "
                    "(models: minilm or a preset; corpora: rotten_tomatoes wikipedia)")
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
    ap.add_argument("--dry-run", action="store_true", help="list the cases and candidates a run on --device "
                    "(default cuda) would measure, the skipped ones with their reason, and stop: no tensor is made")
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
        inference_cases = [InferenceCase.parse(s) for s in args.inference_cases] if args.inference_cases else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = Plan(families=args.family, sizes=args.sizes, quick=args.quick, modes=args.modes, rounds=args.rounds,
                train_cases=train_cases, kernel_ops=args.ops, op_shapes=op_shapes, candidates=args.candidates,
                allow_compile=not args.no_compile, allow_hf=not args.no_hf, inference_cases=inference_cases)
    if args.dry_run:
        env = BenchEnv(torch.device(args.device or "cuda"), f"dry run for {args.device or 'cuda'}", versions(),
                       git_commit(), "dry-run")
        print(f"fastbert-bench --dry-run: what a run on {env.device.type} would measure", flush=True)
        if args.ceilings_only:
            print("  the device ceilings only (bf16 matmul TFLOP/s, copy GB/s)")
            return 0
        try:
            lines = describe_plan(env, plan)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a time limit's SIGTERM unwinds like Ctrl-C: rows so far are kept
    env = make_env(args.device)
    if not env.cuda and args.threads:
        torch.set_num_threads(args.threads)
    vers = ", ".join(f"{k} {v}" for k, v in env.versions.items())
    print(f"fastbert-bench on {env.gpu}; {vers}; commit {env.commit}; run {env.run_id}", flush=True)
    from .precompile import RECORD_ENV, apply_from_env  # here: `python -m fastbert.bench.precompile` imports cli

    apply_from_env(lambda line: print(line, flush=True))
    if os.environ.get(RECORD_ENV):
        return _record(env, plan)
    load_or_measure_ceilings(env, args.ceilings_json, quick=args.quick)
    kind = "bf16 matmul" if env.cuda else "fp32 matmul"
    print(f"measured ceilings: {kind} {env.ceil_tflops:.3g} TFLOP/s, copy {env.ceil_gbps:.3g} GB/s", flush=True)
    if args.ceilings_only:
        _write_json(args.json, [], env)
        return 0
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

    try:
        rows = run_plan(env, plan, log=lambda s: print(s, flush=True), on_rows=on_rows)
    except KeyboardInterrupt:
        print(format_table(so_far, env))
        print(f"\nstopped by a signal: the {len(so_far)} rows above are in the CSVs and the JSON", flush=True)
        return 130
    print(format_table(rows, env))
    if not env.cuda:
        print("\nskipped: no CUDA device")
        for line in gpu_only_cases(plan):
            print(f"  {line}")
        print("  (no GPU figure above: every number was measured on this CPU, fp32, in this run)")
    for p in sorted(written):
        print(f"appended to {p}")
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def runs_triton(candidate: str) -> bool:
    """Whether a candidate launches Triton kernels of its own (fastbert's, or a peer's such as Liger's): what a
    recording run (`precompile`) runs; torch.compile's Triton kernels go through inductor, not the recorder."""
    return candidate.startswith("fastbert") or "optimize" in candidate or candidate == LIGER


def _record(env: BenchEnv, plan: Plan) -> int:
    """A recording run: the plan's candidates that launch Triton kernels, once each, nothing written."""
    runnable: set[str] = set()
    describe_plan(env, plan, runnable)
    plan.candidates = sorted(n for n in runnable if runs_triton(n))
    plan.rounds = 1
    print(f"recording the Triton compiles of {', '.join(plan.candidates) or 'no candidate'}", flush=True)
    if plan.candidates:
        run_plan(env, plan, log=lambda s: print(s, flush=True))
    return 0


def _write_json(path: str | None, rows: Sequence[Row], env: BenchEnv) -> None:
    """All rows so far, rewritten whole and atomically (a kill never leaves a torn file)."""
    if not path:
        return
    write_text_atomic(Path(path), json.dumps(
        {"gpu": env.gpu, "versions": env.versions, "commit": env.commit, "run_id": env.run_id,
         "ceil_tflops": env.ceil_tflops, "ceil_gbps": env.ceil_gbps, "rows": [r.to_dict(env) for r in rows]},
        indent=1))


if __name__ == "__main__":
    sys.exit(main())
