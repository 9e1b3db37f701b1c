"""Shared set-up of the reliability suite: a tiny corpus and vocabulary, a prepared dataset, the micro
pretraining config, and a runner for `python -m train.pretrain` / `train.finetune` in a subprocess.

Everything is CPU-only and small: the suite runs in well under two minutes on two cores.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import prepare as prep

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(40)]
# The micro model of tests/train/test_pretrain.py: hidden 32, 2 layers, the reference path, one thread.
MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, fused=False,
             optimizer="adamw", lr=6e-3, warmup_steps=2, cpu_threads=1, micro_batch_size=8, num_workers=0,
             progress=False, eval_samples=16, max_predictions=5)


def write_vocab(path: Path) -> None:
    path.write_text("\n".join([*prep.SPECIAL_TOKENS, *WORDS, ".", ","]) + "\n")


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """Documents of short sentences drawn from one 4-word topic each (learnable MLM and NSP)."""
    rng = random.Random(seed)
    docs = []
    for k in range(n_docs):
        topic = WORDS[4 * (k % 10):4 * (k % 10) + 4]
        docs.append("\n".join(" ".join(rng.choice(topic) for _ in range(rng.randint(4, 8))) + " ."
                              for _ in range(rng.randint(4, 8))))
    path.write_text("\n\n".join(docs) + "\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder with vocab.txt, corpus.txt and a prepared dataset `data/` (T = 32)."""
    root = tmp_path_factory.mktemp("reliability")
    write_vocab(root / "vocab.txt")
    write_corpus(root / "corpus.txt", 60)
    prep.prepare(prep.PrepareConfig(out_dir=str(root / "data"), inputs=(str(root / "corpus.txt"),),
                                    vocab=str(root / "vocab.txt"), max_seq_len=32, dupe_factor=1,
                                    heldout_fraction=0.05), log=lambda m: None)
    return root


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def flags(options: dict) -> list[str]:
    """A config dict as command-line flags."""
    argv = []
    for k, v in options.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [name, str(v)]
    return argv


def _env(fault: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("FASTBERT_FAULT_AT", None)
    if fault:
        env["FASTBERT_FAULT_AT"] = fault
    return env


def run_module(module: str, argv: list[str], fault: str | None = None, timeout: float = 120,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m module argv` with this checkout first on the path; `fault` sets FASTBERT_FAULT_AT."""
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd or REPO, env=_env(fault),
                          capture_output=True, text=True, timeout=timeout)


def run_python(code: str, fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c code` with this checkout first on the path; `fault` sets FASTBERT_FAULT_AT."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(fault), capture_output=True, text=True,
                          timeout=timeout)
