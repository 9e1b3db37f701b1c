"""Bounds-checked Triton interpreter: every enabled lane of every load, store and atomic must lie inside the
storage of the tensor argument its pointer was derived from.

Under ``TRITON_INTERPRET=1`` a kernel's pointers are raw host addresses (numpy ``uint64`` arrays) and no access
is checked: a missing mask reads a neighbour's bytes or writes into them, and no value a test compares changes.
On a GPU the same kernel crashes (illegal address) or corrupts memory. This module makes the interpreter refuse
such an access before it happens:

- Provenance by tagging. When a launch turns its tensor arguments into pointers, each argument's address gets a
  tag in its top byte (``tag << 56 | address``; user-space addresses are below 2**48, so bits 48-55 stay zero).
  Pointer arithmetic in the interpreter is uint64 addition, so every pointer derived from argument X keeps X's
  tag, and an offset that runs more than 2**48 bytes away (or below address 0) sets the guard bits 48-55.
- Every memory operation decodes the enabled lanes' tags and checks ``[address, address + itemsize)`` against the
  storage (``untyped_storage()``, the whole allocation) of the tagged argument, vectorised in numpy; then strips
  the tags and does the access. Masked-off lanes are exempt (never dereferenced). A violation raises
  `OutOfBounds` before the access — naming the kernel, the source line, the program id, the operation, the
  argument, and the offending element offsets from the start of its storage (a few, their count and range) —
  and is recorded, so a test that swallows the error still fails (tests/conftest.py).

Block pointers (``tl.make_block_ptr``) and tensor descriptors (host ``TensorDescriptor`` and
``tl.make_tensor_descriptor``, the TMA GEMM's path) are checked the same way: the interpreter materialises their
lanes as tagged pointers with a mask from the descriptor's own shape, so a descriptor whose shape or strides
overrun its tensor is caught like any pointer.

Triton internals relied on (triton 3.6.0, ``triton/runtime/interpreter.py``; the pinned CPU version):
``_implicit_cvt`` (argument -> pointer handle, a module global; its ``TensorDescriptor`` branch calls it again on
the base), ``_unwrap_tensor``, ``TensorHandle``, ``GridExecutor.__call__`` (one launch; ``.fn``, ``.arg_names``),
``interpreter_builder.grid_idx``, and the four ``InterpreterBuilder`` methods every access ends in:
``create_masked_load`` and ``create_masked_store`` (called by ``create_load``/``create_store``, the block-pointer
and descriptor loads and stores, gathers and scatters), ``create_atomic_rmw`` (add, and, or, xor, min, max, xchg)
and ``create_atomic_cas``.

Caution: the unit is an argument's whole storage, not its view: a pointer derived from q, a view of a packed qkv
buffer, may touch k and v. Not caught: an access in bounds but at the wrong place (a wrong stride or row: the
numerical tests' job), reads of in-bounds memory nobody wrote (``torch.empty``), pointers loaded from memory or
made from integers (no kernel here has any; they would be reported as derived from no argument). Kernels see
tagged pointer values (the low bits, hence alignment, are the real ones). CUDA launches are not checked.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

_TAG_SHIFT = 56
_ADDRESS_BITS = 48  # x86-64 / aarch64 Linux user space: addresses below 2**47 (2**48 with 5-level paging hinted)
_ADDRESS_MASK = np.uint64((1 << _TAG_SHIFT) - 1)  # keeps the guard bits: a wild pointer stays wild when stripped
_MAX_TAGS = 1 << (64 - _TAG_SHIFT)  # tag 0 = derived from no argument
_EXAMPLES = 6  # offending offsets quoted per violation
_INTERNALS = ("_implicit_cvt", "_unwrap_tensor", "TensorHandle", "GridExecutor", "interpreter_builder")
_BUILDER_OPS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: messages name files from it


class OutOfBounds(AssertionError):
    """An enabled lane of an interpreted load, store or atomic left the storage of its tensor argument."""


@dataclasses.dataclass
class _Launch:
    """The tensor arguments of one interpreted launch: tag -> storage span, in tagged address space."""

    kernel: str
    names: dict[tuple, str]  # (data_ptr, shape, strides) of an argument -> its parameter name
    start: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_MAX_TAGS, np.uint64))
    nbytes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_MAX_TAGS, np.int64))  # 0: no span
    labels: list[str] = dataclasses.field(default_factory=lambda: ["?"])  # per tag, for messages

    def tag(self, tensor: Any) -> int:
        """Register `tensor`'s storage under a new tag; its tagged address."""
        tag = len(self.labels)
        if tag >= _MAX_TAGS:
            raise RuntimeError(f"bounds checker: more than {_MAX_TAGS - 1} tensor arguments in one launch")
        address = tensor.data_ptr()
        if address >> _ADDRESS_BITS:
            raise RuntimeError(f"bounds checker: address {address:#x} has bits above {_ADDRESS_BITS}; run with "
                               f"{SWITCH_ENV}=0 on this machine")  # fmt: skip
        storage = tensor.untyped_storage()
        key = (address, tuple(tensor.shape), tuple(tensor.stride()))
        name = self.names.get(key, "a tensor argument")
        size = storage.nbytes() // tensor.element_size()
        self.labels.append(f"`{name}` ({str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, "
                           f"storage of {size} elements)")  # fmt: skip
        self.start[tag], self.nbytes[tag] = (tag << _TAG_SHIFT) | storage.data_ptr(), storage.nbytes()
        return (tag << _TAG_SHIFT) | address


class BoundsChecker:
    """Installs the checks on Triton's interpreter (once per process); `violations` keeps the messages."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.installed = False
        self._launch: _Launch | None = None

    def take(self) -> list[str]:
        """The violations recorded since the last call (and forget them)."""
        found, self.violations = self.violations, []
        return found

    def install(self) -> None:
        if self.installed:
            return
        import triton
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        missing = [name for name in _INTERNALS if not hasattr(interpreter, name)]
        missing += [f"InterpreterBuilder.{name}" for name in _BUILDER_OPS if not hasattr(builder, name)]
        if missing:
            raise RuntimeError(f"bounds checker: Triton {triton.__version__}'s interpreter has no {missing} (written "
                               f"for 3.6.0); adapt tests/bounds.py or run with {SWITCH_ENV}=0")  # fmt: skip
        self._wrap_launch(interpreter)
        self._wrap_argument(interpreter)
        self._wrap_memory_ops(builder, interpreter)
        self.installed = True

    # ---------------------------------------------------------------------------------------- the launch
    def _wrap_launch(self, interpreter: Any) -> None:
        checker = self
        original = interpreter.GridExecutor.__call__

        def __call__(executor, *args, **kwargs):
            names = {}
            for name, value in [*zip(executor.arg_names, args, strict=False), *kwargs.items()]:
                if not hasattr(value, "data_ptr"):  # a host TensorDescriptor: its base tensor
                    name, value = name + ".base", getattr(value, "base", None)
                if hasattr(value, "data_ptr") and hasattr(value, "stride"):
                    names[(value.data_ptr(), tuple(value.shape), tuple(value.stride()))] = name
            outer, checker._launch = checker._launch, _Launch(executor.fn.__name__, names)
            try:
                return original(executor, *args, **kwargs)
            finally:
                checker._launch = outer

        interpreter.GridExecutor.__call__ = __call__

    def _wrap_argument(self, interpreter: Any) -> None:
        checker = self
        original = interpreter._implicit_cvt

        def _implicit_cvt(arg):
            converted = original(arg)
            launch = checker._launch
            if launch is not None and hasattr(arg, "data_ptr"):
                tensor = interpreter._unwrap_tensor(arg)
                converted.handle.data = np.array([launch.tag(tensor)], dtype=np.uint64)
            return converted

        interpreter._implicit_cvt = _implicit_cvt  # looked up as a module global, also by its own recursion

    # ---------------------------------------------------------------------------------------- the accesses
    def _wrap_memory_ops(self, builder: Any, interpreter: Any) -> None:
        checker = self
        handle = interpreter.TensorHandle
        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
        rmw_names = {  # ATOMIC_OP.FADD -> "atomic_add"
            op: "atomic_" + str(op).rsplit(".", 1)[-1].lower().replace("fadd", "add")
            for op in builder.ir_rmw_op_to_interpreter_rmw_op
        }

        def strip(ptrs, mask, op):
            return handle(checker.check(ptrs, None if mask is None else mask.data, op), ptrs.dtype, ptrs.attr)

        def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
            return load(self, strip(ptrs, mask, "load"), mask, other, cache_modifier, eviction_policy, is_volatile)

        def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
            return store(self, strip(ptrs, mask, "store"), value, mask, cache_modifier, eviction_policy)

        def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
            return rmw(self, rmwOp, strip(ptr, mask, rmw_names.get(rmwOp, "atomic_rmw")), val, mask, sem, scope)

        def create_atomic_cas(self, ptr, cmp, val, sem, scope):
            return cas(self, strip(ptr, None, "atomic_cas"), cmp, val, sem, scope)

        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        builder.create_atomic_rmw = create_atomic_rmw
        builder.create_atomic_cas = create_atomic_cas

    def check(self, ptrs: Any, mask: np.ndarray | None, op: str) -> np.ndarray:
        """The untagged addresses of `ptrs` (a pointer TensorHandle), after checking its enabled lanes."""
        tagged = ptrs.data
        launch = self._launch
        if launch is None:  # not inside an interpreted launch (a device function called from Python)
            return tagged
        lanes = tagged if mask is None else tagged[np.broadcast_to(mask, tagged.shape)]
        if lanes.size:
            itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            tags = (lanes >> np.uint64(_TAG_SHIFT)).astype(np.intp)
            offset = lanes - launch.start[tags]  # bytes from the storage start; wraps to huge below it
            last = launch.nbytes[tags] - itemsize  # the last byte offset an access of itemsize may start at
            ok = (last >= 0) & (offset <= np.maximum(last, 0).astype(np.uint64))
            if not ok.all():
                message = self._describe(launch, op, lanes, tags, ok, itemsize)
                self.violations.append(message)
                raise OutOfBounds(message)
        return tagged & _ADDRESS_MASK

    def _describe(self, launch: _Launch, op: str, lanes: np.ndarray, tags: np.ndarray, ok: np.ndarray,
                  itemsize: int) -> str:  # fmt: skip
        from triton.runtime.interpreter import interpreter_builder

        parts = []
        for tag in np.unique(tags[~ok]):
            bad = lanes[~ok & (tags == tag)]
            if tag == 0 or tag >= len(launch.labels):
                parts.append(f"{bad.size} lane(s) through a pointer derived from no tensor argument of the launch")
                continue
            offsets = (bad - launch.start[tag]).view(np.int64) // itemsize  # elements from the storage start
            shown = ", ".join(str(o) for o in offsets[:_EXAMPLES]) + (", ..." if offsets.size > _EXAMPLES else "")
            parts.append(f"{bad.size} of {lanes.size} enabled lanes outside {launch.labels[tag]}: element offsets "
                         f"{shown} (min {offsets.min()}, max {offsets.max()})")  # fmt: skip
        return (f"out-of-bounds {op} in kernel {launch.kernel} at {_kernel_line()}, program "
                f"{tuple(interpreter_builder.grid_idx)}: " + "; ".join(parts))  # fmt: skip


def _kernel_line() -> str:
    """file:line of the innermost frame outside Triton and this module: the kernel source of the access."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and f"{os.sep}triton{os.sep}" not in path:
            shown = os.path.relpath(path, _ROOT) if path.startswith(_ROOT + os.sep) else path
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


BOUNDS = BoundsChecker()
SWITCH_ENV = "FASTBERT_BOUNDS_CHECK"


def wanted() -> bool:
    """Whether the suite installs the checker (``FASTBERT_BOUNDS_CHECK``, on unless set to 0)."""
    return os.environ.get(SWITCH_ENV, "1") != "0"
