"""Every Triton kernel compiles for sm_90 (H100/H200), checked on a machine without a GPU.

Runs `python -m kernels.aot_check --quick` in a subprocess without TRITON_INTERPRET (the interpreter's
`@triton.jit` objects cannot be compiled): every kernel, every dtype, the main constexpr combination, one
autotune config, through Triton's real pipeline and the ptxas bundled with triton; and `--gate --configs 1`:
the attention kernels' compiled code must be Hopper-clean (wgmma, no C7515, no spills, no duplicated warps).
The full check (every config, switch and head dim) is `python -m kernels.aot_check` (minutes).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot_check import ATTN_TUNED, KERNELS, toolchain_problem
from tests.helpers import missing

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    if problem := toolchain_problem(90):
        missing(f"cannot compile for CUDA here: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.aot_check", "--arch", "90", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"AOT compile check failed (exit {proc.returncode}):\n{report}"
    summary = re.search(r"(\d+) variants, (\d+) compile errors", report)
    assert summary, report
    assert int(summary.group(1)) >= len(KERNELS) and summary.group(2) == "0", report  # something really compiled


# Spills up to this many bytes (stores + loads) are tolerated: a few bytes outside the main loop cost nothing.
MAX_SPILL_BYTES = 8


@pytest.mark.slow
def test_shipped_16bit_attention_configs_lower_to_wgmma(tmp_path):
    """The first autotune config of every attention kernel (forward, one-pass backward, the two deterministic
    passes) at head dims 32 / 64 / 128, fp16, key padding + dropout, compiled for sm_90: each must use Hopper's
    wgmma (no mma.sync), get no ptxas warning (C7515: wgmma serialized), not duplicate MMA work across warps
    (warpsPerCTA vs tile) and not spill. `python -m kernels.aot_check --gate` checks every config (minutes);
    benchmarks/results/aot_sm90.csv holds the default mode's figures."""
    if problem := toolchain_problem(90):
        missing(f"cannot compile for CUDA here: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    report = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.aot_check", "--gate", "--configs", "1", "--report", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(report.read_text())["variants"]
    kernels = {r["kernel"] for r in records}
    assert kernels == set(ATTN_TUNED) and {r["shapes"] for r in records} == {"d=32", "d=64", "d=128"}
    problems = []
    for r in records:
        what = f"{r['kernel']} {r['shapes']} {r['constexprs']} w{r['num_warps']}/s{r['num_stages']}"
        if not r["ok"]:
            problems.append(f"{what}: compile error {r['error'][-300:]}")
            continue
        if r["mma_sync"] or not r["wgmma"]:
            problems.append(f"{what}: {r['wgmma']} wgmma, {r['mma_sync']} mma.sync")
        if r["ptxas_warnings"]:
            problems.append(f"{what}: ptxas warnings {r['ptxas_warnings']}")
        if r["spill_bytes"] > MAX_SPILL_BYTES:
            problems.append(f"{what}: spills {r['spill_bytes']} bytes")
        if r["warpgroup_dup"]:
            problems.append(f"{what}: duplicated MMA work {r['warpgroup_dup']}")
        if not r["sass_loop_instructions"]:
            problems.append(f"{what}: no main loop found in the SASS")
    assert not problems, "\n".join(problems)
