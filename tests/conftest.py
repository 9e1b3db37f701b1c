"""Test set-up: without a GPU, run the Triton kernels through Triton's interpreter — and prove they ran.

1. Interpreter. On a machine without CUDA, ``TRITON_INTERPRET=1`` is forced (not defaulted) here, before
   ``triton`` is first imported: the public functions fall back to the plain-PyTorch reference when Triton
   cannot run, so ``TRITON_INTERPRET=0`` left in the environment would otherwise make every kernel test
   compare the reference with itself. The header says what was forced.
2. Launch spy (tests/helpers.py). Every Triton launch is recorded. A test under tests/kernels/, or one of the
   fused-model tests (``KERNEL_TESTS``), fails unless it launched a Triton kernel — of its own op module when
   the file names one (``test_<op>.py`` → ``kernels.<op>``; or a probe kernel in the test file) — except
   tests marked ``reference_path`` (they mean to exercise the PyTorch fallback) or ``no_kernel`` (argument
   checks, compile-only checks).
3. Bounds checker (tests/bounds.py). Under the interpreter every enabled lane of every load, store and atomic
   must lie inside the storage of the tensor argument its pointer came from; a violation fails the test, naming
   the kernel, the line, the operation and the offsets. ``FASTBERT_BOUNDS_CHECK=0`` turns it off (not under
   ``FASTBERT_STRICT=1``).
4. No quiet skips. Under ``FASTBERT_STRICT=1`` (CI: .ci/run) a missing requirement fails instead of skipping
   (``tests.helpers.require``) and, on a machine without CUDA, the run fails if any skip is not a
   ``gpu``-marked test.
"""

import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    # `@triton.jit` picks interpreter or compiler when a kernel module is imported: too late by then.
    early = sorted(m for m in sys.modules if m == "kernels" or m.startswith("kernels."))
    if early and _INTERPRET_BEFORE != "1":
        raise RuntimeError(f"{early} imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

from tests import bounds  # noqa: E402
from tests.helpers import LAUNCH_SPY, STRICT_ENV, launched, strict  # noqa: E402

LAUNCH_SPY.install()
# Every interpreted load, store and atomic checked against its tensor argument's storage (tests/bounds.py).
BOUNDS_CHECK = not _CUDA and bounds.wanted()
if BOUNDS_CHECK:
    bounds.BOUNDS.install()
elif not _CUDA and strict():
    raise RuntimeError(f"{bounds.SWITCH_ENV}=0 under {STRICT_ENV}=1: CI runs the kernels bounds-checked")

# One intra-op thread: the tests use tiny tensors, where threads cost more than they give (and CI has 2 cores).
torch.set_num_threads(1)

DEVICE = "cuda" if _CUDA else "cpu"

# Test files whose every test must launch a Triton kernel (unless marked otherwise), as path prefixes.
KERNEL_TESTS = ("tests/kernels/", "tests/fastbert/test_fused", "tests/fastbert/test_convergence.py",
                "tests/fastbert/test_optimize.py", "tests/fastbert/test_compile.py",
                "tests/fastbert/test_hf_attention.py", "tests/fastbert/test_optimize_family.py")
# Test file -> the kernel module its tests must launch from, where `test_<op>.py` -> `kernels.<op>` is wrong.
KERNEL_MODULE = {
    "test_attention_scale.py": "kernels.attention",
    "test_attention_dropout_stats.py": "kernels.attention",
    "test_attention_backward_modes.py": "kernels.attention",
    "test_hf_attention.py": "kernels.attention",
    # the GEMM-epilogue kernels live in kernels/matmul.py; the cuBLAS path's GELU epilogue in kernels/bias_gelu.py
    "test_linear_bias_gelu.py": ("kernels.matmul", "kernels.bias_gelu"),
    "test_qkv_projection.py": "kernels.matmul",
    "test_matmul_autotune.py": "kernels.matmul",
    "test_matmul_tma.py": "kernels.matmul",
    "test_gpu_gaps.py": "kernels.attention",  # every test of it runs attention (the model test and the QKV chain too)
}
# Tests in files other owners maintain that launch no kernel by design, with the marker they should carry
# (prefer the decorator in the test file itself; this table only avoids editing those files).
UNMARKED = {
    "tests/kernels/test_aot_compile.py::test_every_kernel_compiles_for_sm90": "no_kernel",
    "tests/kernels/test_aot_compile.py::test_shipped_16bit_attention_configs_lower_to_wgmma": "no_kernel",
    "tests/kernels/test_aot_compile.py::test_shipped_16bit_gemm_configs_lower_to_wgmma_and_tma": "no_kernel",
    "tests/kernels/test_attention.py::test_bad_arguments_raise_value_error": "no_kernel",
    "tests/kernels/test_attention.py::test_pad_unpad_roundtrip": "no_kernel",
    "tests/kernels/test_attention.py::test_reference_path_without_interpreter_honours_dropout": "reference_path",
    "tests/kernels/test_attention.py::test_bf16_on_interpreter_takes_reference_path_with_warning": "reference_path",
    "tests/kernels/test_softmax_dropout.py::test_bad_arguments_raise_value_error": "no_kernel",
    "tests/kernels/test_softmax_dropout.py::test_reference_path_without_interpreter_honours_dropout": "reference_path",
    "tests/kernels/test_linear_bias_gelu.py::test_bad_arguments": "no_kernel",
    "tests/kernels/test_linear_bias_gelu.py::test_bf16_cpu_falls_back_to_reference": "reference_path",
    "tests/kernels/test_qkv_projection.py::test_bad_arguments": "no_kernel",
    "tests/kernels/test_qkv_projection.py::test_bf16_cpu_falls_back_to_reference": "reference_path",
    "tests/fastbert/test_optimize.py::test_key_padding_from_hf_masks": "no_kernel",
    "tests/fastbert/test_optimize.py::test_optimize_refuses_what_it_cannot_do": "no_kernel",
}


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line("markers", "reference_path: means to exercise the PyTorch fallback (no Triton launch "
                                       "required)")
    config.addinivalue_line("markers", "no_kernel(reason): launches no Triton kernel by design (argument checks, "
                                       "compile-only)")


def _how_kernels_run() -> str:
    if _CUDA:
        return "CUDA present: Triton kernels run compiled"
    if _INTERPRET_BEFORE == "1":
        return "no CUDA: TRITON_INTERPRET=1, Triton kernels run through the interpreter"
    return (f"no CUDA: TRITON_INTERPRET forced to 1 (it was {_INTERPRET_BEFORE or 'unset'}), Triton kernels "
            "run through the interpreter")


def pytest_report_header(config):
    how = _how_kernels_run()
    mode = f"{STRICT_ENV}=1: missing requirements and non-gpu skips fail the run" if strict() else (
        f"{STRICT_ENV} unset: missing requirements skip")
    check = ("every interpreted load, store and atomic bounds-checked" if BOUNDS_CHECK else
             f"bounds checker off ({bounds.SWITCH_ENV}=0)" if not _CUDA else "compiled kernels: no bounds checker")
    return [f"fastbert: {how}; every kernel test must launch one (launch spy); {check}", f"fastbert: {mode}"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = UNMARKED.get(item.nodeid.split("[")[0])
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
    if _CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _expected_module(item) -> str | tuple[str, ...] | None:
    """The kernel module(s) a kernel test must launch from, or None for any Triton kernel."""
    path = item.nodeid.split("::")[0]
    if not path.startswith(KERNEL_TESTS):
        return None
    name = path.rsplit("/", 1)[-1]
    if name in KERNEL_MODULE:
        return KERNEL_MODULE[name]
    if path.startswith("tests/kernels/test_") and name.endswith(".py"):
        return "kernels." + name[len("test_"):-len(".py")]
    return None


def _fail_on_out_of_bounds() -> None:
    out_of_bounds = bounds.BOUNDS.take()  # raised in the kernel, but the code around it may have caught the error
    if out_of_bounds:
        pytest.fail("\n".join(out_of_bounds), pytrace=False)


# Checked after each phase: a fixture's kernels (set-up, tear-down) are bounds-checked like the test's own.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    bounds.BOUNDS.take()
    result = yield
    _fail_on_out_of_bounds()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    _fail_on_out_of_bounds()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    LAUNCH_SPY.reset()
    result = yield  # re-raises the test's own failure: nothing to add then
    _fail_on_out_of_bounds()
    path = item.nodeid.split("::")[0]
    exempt = item.get_closest_marker("reference_path") or item.get_closest_marker("no_kernel")
    if path.startswith(KERNEL_TESTS) and not exempt:
        module = _expected_module(item)
        if not LAUNCH_SPY.launches:
            pytest.fail("no Triton kernel was launched: the test compared the PyTorch reference with itself "
                        "(mark it `reference_path` or `no_kernel` if that is its purpose)", pytrace=False)
        # A probe kernel defined in the test file itself (it calls the op's device functions) counts too.
        modules = (module,) if isinstance(module, str) else module
        if modules and not any(launched(m) for m in modules) and not launched(item.module.__name__):
            launches = sorted(set(LAUNCH_SPY.launches))
            pytest.fail(f"no kernel of {' or '.join(modules)} was launched (launched: {launches})",
                        pytrace=False)
    return result


_BAD_SKIPS: list[str] = []  # "nodeid: reason" of every skip of a test not marked `gpu`


def _record_skip(report) -> None:
    if report.skipped and "gpu" not in getattr(report, "keywords", {}):  # a CollectReport has none
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _BAD_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
    bad = _BAD_SKIPS
    if bad and strict() and not _CUDA and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.write_line(f"fastbert: {LAUNCH_SPY.total} Triton kernel launches; {_how_kernels_run()}")
    bad = _BAD_SKIPS
    if not bad:
        return
    if strict() and not _CUDA:
        tr.write_line(f"fastbert: FAILED: {len(bad)} skip(s) of tests not marked `gpu` under {STRICT_ENV}=1:",
                      red=True, bold=True)
    else:
        tr.write_line(f"fastbert: {len(bad)} skip(s) of tests not marked `gpu`:", yellow=True)
    for line in bad:
        tr.write_line(f"  {line}")
