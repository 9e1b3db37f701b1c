"""fastbert-bench: time fastbert's kernels, attention, training step and inference against PyTorch eager, SDPA,
torch.compile, Hugging Face `transformers` and the peer kernels a user would pick instead (Liger-Kernel, cuBLASLt's
bias+GELU epilogue, SDPA's flash backend, FlashAttention's varlen kernel, sentence-transformers), in one run, and
print a table (``fastbert-bench``, ``python -m fastbert.bench``).

This package holds every piece of measuring code (the pytest-benchmark suite in ``benchmarks/`` and
``benchmarks/gpu_check.py`` import it; it imports nothing from there), one module per concern:

    timing.py        environment (GPU, versions, commit), timers, interleaving, peak memory, device ceilings
    results.py       the CSV layout, speed-ups against the baseline and the best peer, the printed tables
    cases.py         shapes, FLOP formulas, `OpCase`, and `run_op_case` (the attention and kernel families)
    peers.py         the peer candidates: where each comes from and why it is skipped when it cannot run
    precompile.py    Triton ahead of the timing: record a run's compiles, compile them on all cores, narrow autotuning
    attention.py     the attention family
    kernel_cases.py  the encoder's other kernels
    train_step.py    the training-step family
    inference.py     the inference family (forward-only encoding, real length distributions: lengths.py)
    data.py          the data family (CPU): the pretraining loader and fastbert-prepare (train/, imported late)
    cli.py           the plan of a run, `--dry-run`, and the command line

How it measures:

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
- CSV rows (one file per family, header written once) with GPU name, versions, dtype, shape, commit, time, each
  group written as soon as it is measured: families hand their rows to ``report_rows`` (``row_sink`` receives them).
  The ratio to the best peer (``x peer``) is derived from the rows of the same run: in the tables and the
  JSON, not a CSV column (the layout is fixed).

Without CUDA the CPU cases run (small sizes, fp32): the public kernel functions — which take their plain
PyTorch reference path on a CPU — against torch eager, and the reference BERT against `transformers`. GPU
cases, torch.compile baselines and the CUDA-only peers are listed under "skipped" with the reason; no GPU
figure is printed unless it was measured in this run.

Caution: attention TFLOP/s use the padded shape's FLOPs (``4·B·h·T²·d`` forward, 2.5× that backward) for
every candidate, the varlen ones included, so they compare like the times do (and like the H200 anchors).
torch.compile runs with its default mode (no max-autotune). Under ``TRITON_INTERPRET=1`` the fused
kernels run in Triton's interpreter, whose timings mean nothing: they are skipped.
"""

from .attention import attention_case, attention_eager, attention_sdpa
from .cases import (
    BWD_FLOP_FACTOR,
    CPU_TRAIN_SHAPES,
    CPU_TRAIN_SHAPES_QUICK,
    GEMM_FLOP_FACTOR,
    GPU_TRAIN_SHAPES,
    GPU_TRAIN_SHAPES_QUICK,
    IGNORE_INDEX,
    MLM_FRACTION,
    MODES,
    OpCase,
    attention_flops,
    run_op_case,
    train_flops,
)
from .cli import (
    Plan,
    default_inference_cases,
    default_train_cases,
    describe_plan,
    gpu_only_cases,
    main,
    op_shapes,
    run_plan,
)
from .inference import InferenceCase, inference_candidates, run_inference_cases
from .kernel_cases import KERNEL_OPS, kernel_cases
from .peers import PEERS, is_peer
from .results import (
    CSV_COLUMNS,
    CSV_FILES,
    DEFAULT_FAMILIES,
    FAMILIES,
    Row,
    append_csv,
    best_peers,
    finish_rows,
    format_table,
    report_rows,
    row_sink,
    write_csvs,
)
from .timing import (
    BenchEnv,
    extra_bytes,
    first_call_s,
    free_memory,
    git_commit,
    interleaved_ms,
    interpreter_on,
    load_or_measure_ceilings,
    make_env,
    measure_ceilings,
    sync,
    time_ms,
    versions,
)
from .train_step import TrainCase, hf_config, hf_pretraining_model, make_batch, run_train_cases, train_candidates

__all__ = [
    "BWD_FLOP_FACTOR", "CPU_TRAIN_SHAPES", "CPU_TRAIN_SHAPES_QUICK", "CSV_COLUMNS", "CSV_FILES", "DEFAULT_FAMILIES",
    "FAMILIES", "GEMM_FLOP_FACTOR", "GPU_TRAIN_SHAPES", "GPU_TRAIN_SHAPES_QUICK", "IGNORE_INDEX", "KERNEL_OPS",
    "MLM_FRACTION", "MODES", "PEERS", "BenchEnv", "InferenceCase", "OpCase", "Plan", "Row", "TrainCase",
    "append_csv", "attention_case", "attention_eager", "attention_flops", "attention_sdpa", "best_peers",
    "default_inference_cases", "default_train_cases", "describe_plan", "extra_bytes", "finish_rows",
    "first_call_s", "format_table", "free_memory", "git_commit", "gpu_only_cases", "hf_config",
    "hf_pretraining_model", "inference_candidates", "interleaved_ms", "interpreter_on", "is_peer", "kernel_cases",
    "load_or_measure_ceilings", "main", "make_batch", "make_env", "measure_ceilings", "op_shapes", "report_rows",
    "row_sink", "run_inference_cases", "run_op_case", "run_plan", "run_train_cases", "sync", "time_ms",
    "train_candidates", "train_flops", "versions", "write_csvs",
]
