"""Training checkpoints: atomic, complete enough that `--resume` reproduces the uninterrupted run exactly.

Layout of `<out_dir>/checkpoints/step_00000500/`:

    model/              the model in Hugging Face format (save_pretrained: config.json + model.safetensors)
                        plus vocab.txt, so `transformers.BertForPreTraining.from_pretrained(model/)` loads it
    trainer_state.pt    optimizer, LR scheduler, grad scaler, step, the RNG states (python, numpy, torch,
                        CUDA), the training config and the log history

The whole directory is written under a temporary name and renamed with `os.replace`, so a crash mid-write never
leaves a checkpoint that looks complete. The data position needs no state of its own: the batch order is a pure
function of the step (train.dataset.StepBatchSampler) and masking a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under out_dir, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_model_folder(model: nn.Module, folder: Path, vocab: str | os.PathLike | None) -> None:
    """save_pretrained plus vocab.txt (so the folder is a complete Hugging Face model+tokenizer folder)."""
    model.save_pretrained(folder)
    if vocab is not None:
        shutil.copyfile(vocab, folder / "vocab.txt")


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    extra: dict[str, Any],
    vocab: str | os.PathLike | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` checkpoints (0 = keep all). `model` is the
    bare model (not the DDP wrapper)."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model_folder(model, tmp / "model", vocab)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            **extra,
        }
        torch.save(state, tmp / STATE_NAME)
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights of a Hugging Face model folder — or of a training checkpoint (its model/ subfolder)
    — into `model` in place (same shapes required)."""
    folder = Path(folder)
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model (no config.json); give a checkpoint or model folder")
    loaded = type(model).from_pretrained(folder, config=model.config)
    model.load_state_dict(loaded.state_dict())


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and scaler in place from checkpoint `path`; returns the saved
    state (step, config, history, ...). RNG states are *not* restored here — call `set_rng_state(state["rng"])`
    once everything that consumes randomness at start-up is built."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_NAME})")
    load_model_weights(model, path / "model")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state
