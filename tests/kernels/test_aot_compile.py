"""Every Triton kernel compiles for sm_90 (H100/H200), checked on a machine without a GPU.

Runs `python -m kernels.aot_check --quick` in a subprocess without TRITON_INTERPRET (the interpreter's
`@triton.jit` objects cannot be compiled): every kernel, every dtype, the main constexpr combination, one
autotune config, through Triton's real pipeline and the ptxas bundled with triton. The full check
(every config, switch and head dim) is `python -m kernels.aot_check` (minutes).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot_check import KERNELS, toolchain_problem
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
