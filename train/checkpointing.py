"""Training checkpoints: folder-atomic, verified, safe to load, complete enough that `--resume` reproduces the
uninterrupted run exactly.

Layout of `<out_dir>/checkpoints/step_00000500/`:

    model/                  the model in Hugging Face format (save_pretrained: config.json, model.safetensors,
                            its own manifest) plus vocab.txt, so `transformers.BertForPreTraining.from_pretrained(
                            model/)` loads it
    trainer_state.pt        step, run id, optimizer, LR scheduler, grad scaler, the RNG states of every rank
                            (python, numpy, torch CPU, every CUDA device) and the training config — tensors,
                            numbers, strings, lists and dicts only, so it is read with `weights_only=True` and
                            a crafted file cannot run code
    fastbert-manifest.json  written last: kind "checkpoint", step, run id, each file's size and sha256

The folder is written under a temporary name and swapped in by rename (fastbert/_atomic.py), so a kill at any
point leaves no checkpoint that looks complete; `load_latest_good` verifies the manifest and falls back to the
previous checkpoint when the newest is corrupt. Rotation deletes only checkpoints of the current run (its run
id is in every manifest). The data position needs no state of its own: the batch order is a pure function of
the step (train.dataset.StepBatchSampler) and masking a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastbert._atomic import (
    ManifestError,
    atomic_folder,
    fault_point,
    read_manifest,
    recover,
    verify_manifest,
)
from fastbert.checkpoint import save_pretrained

STATE_NAME = "trainer_state.pt"
CHECKPOINT_KIND = "checkpoint"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(internal, dtype=torch.int64),  # 624 Mersenne Twister words + position
        "python_gauss": gauss,  # float or None
        "numpy_kind": str(kind),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only where CUDA is available)."""
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(value: Any, where: str = "state") -> None:
    """TypeError unless `value` is made of tensors, numbers, strings, None, lists/tuples and str-keyed dicts —
    what `torch.load(weights_only=True)` reads back — so no checkpoint is written that cannot be loaded."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; trainer state keys must be str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; the trainer state holds only tensors, numbers, strings, "
                    "lists and dicts (so it loads with weights_only=True)")


# ---------------------------------------------------------------------------------------------- listing
def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints under out_dir that look complete (trainer_state.pt present), oldest first; temporary and
    aside folders are ignored. Not verified: see `load_latest_good`."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    for p in list(root.iterdir()):  # a kill between the two renames of a swap: put the old one back
        if p.name.startswith(".step_") and p.name.endswith(".old"):
            recover(root / p.name[1:-len(".old")])
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_run_id(path: Path) -> str | None:
    """The run id in a checkpoint's manifest (None for one without a readable manifest)."""
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return None
    return None if manifest is None else manifest.get("run_id")


# ---------------------------------------------------------------------------------------------- saving
def save_model_folder(model: nn.Module, folder: Path, vocab: str | os.PathLike | None, *,
                      overwrite: bool = False) -> Path:
    """save_pretrained plus vocab.txt (a complete Hugging Face model + tokenizer folder), folder-atomic."""

    def add_vocab(tmp: Path) -> None:
        if vocab is not None:
            shutil.copyfile(vocab, tmp / "vocab.txt")

    return save_pretrained(model, folder, overwrite=overwrite, extra_files=add_vocab)


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
    *,
    run_id: str | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `step` (folder-atomic, with a manifest) and keep the newest `keep` checkpoints of run
    `run_id` (0 = keep all; other runs' checkpoints are never deleted). `model` is the bare model (not the DDP
    wrapper); `rng` the RNG states of every rank (default: this process's only); `extra` more plain values
    (the config, ...)."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    state = {
        **extra,
        "step": step,
        "run_id": run_id,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng if rng is not None else [rng_state()],
    }
    check_plain(state)
    with atomic_folder(final, CHECKPOINT_KIND, step=step, run_id=run_id) as tmp:
        save_model_folder(model, tmp / "model", vocab)
        torch.save(state, tmp / STATE_NAME)
        fault_point("checkpoint:state-written")
    if keep > 0:
        mine = [p for p in list_checkpoints(out_dir) if checkpoint_run_id(p) == run_id]
        for old in mine[:-keep]:
            # Renamed out of sight first, so a kill mid-delete never leaves a half-deleted checkpoint in the list.
            doomed = root / f".{old.name}.deleting-{uuid.uuid4().hex[:8]}"
            os.replace(old, doomed)
            fault_point("checkpoint:rotated-out")
            shutil.rmtree(doomed, ignore_errors=True)
    for leftover in root.glob(".step_*.deleting-*"):  # from a kill during an earlier rotation
        shutil.rmtree(leftover, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- loading
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


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.pt of checkpoint `path`, read with weights_only=True: ValueError naming the file when it is
    truncated, corrupt or holds anything but tensors, numbers, strings and containers (nothing in it runs)."""
    file = Path(path) / STATE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_NAME})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file} holds objects other than tensors, numbers, strings and lists (a crafted or "
                         f"foreign file?); refused, nothing in it was run ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ValueError(f"{file} is corrupt or truncated: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file} is not a fastbert trainer state (no step)")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and scaler in place from checkpoint `path` (its manifest verified
    first when `verify`); returns the saved state (step, run id, config, ...). RNG states are *not* restored
    here — call `set_rng_state(state["rng"][rank])` once everything that draws random numbers at start-up is
    built."""
    path = Path(path)
    if verify:
        verify_manifest(path)
    state = read_trainer_state(path)
    load_model_weights(model, path / "model")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path / STATE_NAME}: the optimizer / scheduler / scaler state does not fit this run: "
                         f"{e}") from None
    return state


def load_latest_good(
    out_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    warn: Callable[[str], None] = print,
    only: Path | None = None,
    verify: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Load the newest checkpoint under out_dir that verifies and loads (`only`: that one and no other); a bad
    one is reported through `warn`, naming the file, and the previous one tried. FileNotFoundError when there
    is none; ValueError (one line) when none is good."""
    ckpts = list_checkpoints(out_dir) if only is None else [only]
    if not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)}")
    errors = []
    for path in reversed(ckpts):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler, scaler, verify=verify)
        except (ValueError, FileNotFoundError) as e:
            errors.append(f"{path.name}: {e}")
            warn(f"warning: checkpoint {path} is unusable: {e}" + ("; trying the previous one"
                                                                    if path != ckpts[0] else ""))
    raise ValueError(f"--resume: none of the {len(ckpts)} checkpoint(s) in {checkpoint_dir(out_dir)} is usable "
                     f"(newest: {errors[0]})")
