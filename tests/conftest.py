"""Test set-up: without a GPU, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before `triton` is first imported, so it is set here, at collection start.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the tests use tiny tensors, where threads cost more than they give (and CI has 2 cores).
torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
