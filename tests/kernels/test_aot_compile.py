"""Every Triton kernel compiles for sm_90 (H100/H200), checked on a machine without a GPU.

Runs `python -m kernels.aot_check --quick` in a subprocess without TRITON_INTERPRET (the interpreter's
`@triton.jit` objects cannot be compiled): every kernel, every dtype, the main constexpr combination, one
autotune config, through Triton's real pipeline and the ptxas bundled with triton; and `--gate --configs 1`
(`--family attention` / `gemm`): the attention kernels' and the two GEMM kernels' compiled code must be
Hopper-clean (wgmma, no C7515, no spills, no duplicated warps; the TMA GEMM loads through TMA).
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
def _gate(tmp_path, family: str) -> list[dict]:
    """`aot_check --gate --family FAMILY --configs 1` in a subprocess (no interpreter): its JSON records."""
    if problem := toolchain_problem(90):
        missing(f"cannot compile for CUDA here: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    report = tmp_path / f"gate_{family}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.aot_check", "--gate", "--family", family, "--configs", "1",
         "--report", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(report.read_text())["variants"]


def _hopper_problems(r: dict) -> list[str]:
    """Why a gate record is not Hopper-clean (empty when it is)."""
    what = f"{r['kernel']} {r['shapes']} {r['constexprs']} w{r['num_warps']}/s{r['num_stages']}"
    if not r["ok"]:
        return [f"{what}: compile error {r['error'][-300:]}"]
    problems = []
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
    return problems


@pytest.mark.slow
def test_shipped_16bit_gemm_configs_lower_to_wgmma_and_tma(tmp_path):
    """The first autotune config and the fixed per-bucket tiles (`fixed_tile`; the TMA launch's first and last)
    of both GEMM kernels, fp16, for the QKV launch (no activation) and the training FFN-up launch (erf GELU +
    stored pre-activation), compiled for sm_90: each must use wgmma (no mma.sync), draw no ptxas warning (C7515),
    not spill, not duplicate MMA work; the TMA + persistent kernel must load and store through TMA
    (cp.async.bulk.tensor) with no cp.async left. `python -m kernels.aot_check --gate --family gemm` checks every
    config and launch combination."""
    from kernels.matmul import _TILES, _TMA_TILES

    records = _gate(tmp_path, "gemm")
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_gemm_bias_act_kernel", "_gemm_tma_persistent_kernel"}, kernels
    tiles = {(r["kernel"], r["constexprs"]["ACTIVATION"]): set() for r in records}
    for r in records:
        c = r["constexprs"]
        tiles[r["kernel"], c["ACTIVATION"]].add((c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], r["num_warps"],
                                                 r["num_stages"]))  # fmt: skip
    for act in (0, 1):  # the tiles a launch without autotuning takes must be among those gated
        cp_list, tma_list = _TILES["16bit", act != 0], _TMA_TILES["16bit", act != 0]
        cp_fixed = {cp_list[0], next(t for t in cp_list if t[0] == 64)}
        assert cp_fixed <= tiles["_gemm_bias_act_kernel", act], (act, tiles)
        assert {tma_list[0], tma_list[-1]} <= tiles["_gemm_tma_persistent_kernel", act], (act, tiles)
    problems = [p for r in records for p in _hopper_problems(r)]
    for r in records:
        if r["kernel"] == "_gemm_tma_persistent_kernel" and r["ok"]:
            if not r["tma_loads"] or not r["tma_stores"] or r["cp_async"]:
                problems.append(f"{r['kernel']} {r['constexprs']}: {r['tma_loads']} TMA loads, {r['tma_stores']} "
                                f"TMA stores, {r['cp_async']} cp.async")  # fmt: skip
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_shipped_16bit_attention_configs_lower_to_wgmma(tmp_path):
    """The first autotune config of every attention kernel (forward, one-pass backward, the two deterministic
    passes) at head dims 32 / 64 / 128, fp16, key padding + dropout, compiled for sm_90: each must use Hopper's
    wgmma (no mma.sync), get no ptxas warning (C7515: wgmma serialized), not duplicate MMA work across warps
    (warpsPerCTA vs tile) and not spill. `python -m kernels.aot_check --gate` checks every config (minutes);
    benchmarks/results/aot_sm90.csv holds the default mode's figures."""
    records = _gate(tmp_path, "attention")
    kernels = {r["kernel"] for r in records}
    assert kernels == set(ATTN_TUNED) and {r["shapes"] for r in records} == {"d=32", "d=64", "d=128"}
    problems = [p for r in records for p in _hopper_problems(r)]
    assert not problems, "\n".join(problems)
