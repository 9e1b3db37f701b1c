"""The suite's bounds checker (tests/bounds.py): what it refuses, what it lets through, and what it says.

Probe kernels, each run on tiny tensors through the interpreter: an unmasked tail, a pointer of one argument
walked into another's storage, atomics, a store, a block pointer without its boundary check and a tensor
descriptor whose shape overruns its tensor. Each expected violation is taken off the record, so the test's own
check (tests/conftest.py) sees only the unexpected ones.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tests.bounds import BOUNDS

pytestmark = pytest.mark.skipif(not BOUNDS.installed, reason="the bounds checker is off (CUDA, or "
                                                             "FASTBERT_BOUNDS_CHECK=0)")  # fmt: skip


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, shift, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n if MASKED else i < BLOCK
    tl.store(y_ptr + i, tl.load(x_ptr + i + shift, mask=ok, other=0.0), mask=ok)


@triton.jit
def _atomic_kernel(x_ptr, flag_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if OP == 0:
        tl.atomic_add(x_ptr + i, 1.0, mask=i < n)
    elif OP == 1:
        tl.atomic_xchg(flag_ptr + i, 2, mask=i < n)
    else:
        tl.atomic_cas(flag_ptr + n, 0, 1)


@triton.jit
def _block_ptr_kernel(x_ptr, y_ptr, n, CHECKED: tl.constexpr, BLOCK: tl.constexpr):
    src = tl.make_block_ptr(x_ptr, (n,), (1,), (0,), (BLOCK,), (0,))
    if CHECKED:
        v = tl.load(src, boundary_check=(0,), padding_option="zero")
    else:
        v = tl.load(src)
    tl.store(y_ptr + tl.arange(0, BLOCK), v)


@triton.jit
def _descriptor_kernel(x_ptr, y_ptr, rows, BLOCK: tl.constexpr):
    desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, BLOCK], strides=[BLOCK, 1], block_shape=[BLOCK, BLOCK])
    tl.store(y_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], desc.load([0, 0]))


def _refused(launch, *expected: str) -> str:
    """Run `launch`, which must be refused; the recorded message, checked for each of `expected`."""
    with pytest.raises(triton.runtime.errors.InterpreterError, match="out-of-bounds"):
        launch()
    (message,) = BOUNDS.take()
    for part in expected:
        assert part in message, message
    return message


def test_unmasked_tail_is_refused_and_masked_lanes_are_exempt():
    x, y = torch.arange(10.0), torch.zeros(16)
    _copy_kernel[(1,)](x, y, 10, 0, MASKED=True, BLOCK=16)  # 6 lanes past x, masked off: fine
    assert torch.equal(y[:10], x) and not BOUNDS.violations
    _refused(lambda: _copy_kernel[(1,)](x, y, 10, 0, MASKED=False, BLOCK=16),
             "out-of-bounds load in kernel _copy_kernel at tests/test_bounds.py:", "program (0, 0, 0)",
             "6 of 16 enabled lanes outside `x_ptr` (float32 (10,), storage of 10 elements)",
             "element offsets 10, 11, 12, 13, 14, 15 (min 10, max 15)")  # fmt: skip


def test_pointer_walked_into_another_arguments_storage_is_refused():
    """The union of the launch's storages would let this through: the check follows each pointer's argument."""
    x, y = torch.zeros(8), torch.arange(8.0)
    shift = (y.data_ptr() - x.data_ptr()) // 4  # from x's start to y's, in elements
    _refused(lambda: _copy_kernel[(1,)](x, y, 8, shift, MASKED=True, BLOCK=8),
             "8 of 8 enabled lanes outside `x_ptr`", f"element offsets {shift}, {shift + 1}")  # fmt: skip
    _refused(lambda: _copy_kernel[(1,)](x, y, 8, -3, MASKED=True, BLOCK=8), "offsets -3, -2, -1 (min -3, max -1)")


@pytest.mark.parametrize("op, name", [(0, "atomic_add"), (1, "atomic_xchg"), (2, "atomic_cas")])
def test_atomics_out_of_bounds_are_refused(op, name):
    x, flag = torch.zeros(5), torch.zeros(5, dtype=torch.int32)
    _atomic_kernel[(1,)](x, flag, 4 if op == 2 else 5, OP=op, BLOCK=8)  # in bounds
    n = 5 if op == 2 else 7
    where = "`x_ptr`" if op == 0 else "`flag_ptr`"
    _refused(lambda: _atomic_kernel[(1,)](x, flag, n, OP=op, BLOCK=8), f"out-of-bounds {name}", where)


def test_store_past_the_end_is_refused_before_it_writes():
    x, y = torch.arange(16.0), torch.zeros(12)
    _refused(lambda: _copy_kernel[(1,)](x, y, 16, 0, MASKED=True, BLOCK=16), "out-of-bounds store", "`y_ptr`",
             "4 of 16 enabled lanes")  # fmt: skip
    assert not y.any()  # refused before the access: not even its 12 in-bounds lanes were written


def test_block_pointer_without_boundary_check_is_refused():
    x, y = torch.arange(10.0), torch.zeros(16)
    _block_ptr_kernel[(1,)](x, y, 10, CHECKED=True, BLOCK=16)
    assert torch.equal(y[:10], x)
    _refused(lambda: _block_ptr_kernel[(1,)](x, y, 10, CHECKED=False, BLOCK=16), "6 of 16 enabled lanes")


def test_tensor_descriptor_overrunning_its_tensor_is_refused():
    """A descriptor's own bounds are its `shape`: the checker still holds them to the tensor's storage."""
    x, y = torch.arange(64.0).reshape(4, 16), torch.zeros(16, 16)
    _descriptor_kernel[(1,)](x, y, 4, BLOCK=16)  # rows 4..15 out of the descriptor's shape: zero-filled
    assert torch.equal(y[:4], x) and not y[4:].any()
    _refused(lambda: _descriptor_kernel[(1,)](x, y, 16, BLOCK=16), "192 of 256 enabled lanes outside `x_ptr`")


_SWALLOWED_IN_A_FIXTURE = '''
import pytest, torch
from tests.test_bounds import _copy_kernel

@pytest.fixture
def swallowed():
    x, y = torch.zeros(5), torch.zeros(8)
    try:
        _copy_kernel[(1,)](x, y, 5, 0, MASKED=False, BLOCK=8)  # reads 3 floats past x
    except Exception:
        pass  # what a benchmark case does with any error: the checker's record must still fail the test
    yield

def test_with_the_fixture(swallowed):
    pass
'''


def test_a_violation_swallowed_in_a_fixture_fails_the_test(tmp_path):
    """The suite's hooks check after set-up and tear-down too, not only after the test's own call."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_probe.py").write_text(_SWALLOWED_IN_A_FIXTURE)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_probe.py")], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 error" in run.stdout and "out-of-bounds load in kernel _copy_kernel" in run.stdout, run.stdout[-2000:]
