"""`pytest -p tests.precompile_plugin`: the switches of `fastbert.bench.precompile` inside a test run, as
benchmarks/gpu_check.py passes them (FASTBERT_AUTOTUNE_TOP narrows every autotune list, FASTBERT_TRITON_RECORD
records every Triton compile instead of running it).

A plugin module of its own, importing fastbert only in `pytest_configure`: by then tests/conftest.py has chosen
how the kernels run (importing `fastbert` imports the kernels, which must come after that choice).
"""

from __future__ import annotations

import sys


def pytest_configure(config) -> None:
    from fastbert.bench.precompile import apply_from_env

    apply_from_env(lambda line: print(f"fastbert: {line}", file=sys.stderr))
