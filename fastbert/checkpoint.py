"""Hugging Face checkpoint folders, both ways: `load_pretrained` and `save_pretrained`.

A folder holds `config.json` and the weights, as `model.safetensors` (preferred), a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (read with `weights_only=True`, so no code runs).
fastbert's `state_dict` keys are Hugging Face's, so loading is mostly a matter of reconciling prefixes:

- a base-model file (keys `embeddings.…`, as all-MiniLM-L6-v2 ships) loads into a model with heads, whose
  encoder sits under `bert.`; a file with heads (`bert.…`, `cls.…`) loads into a `BertModel`, and the head
  keys it cannot use are reported as unexpected;
- old TensorFlow-converted files name LayerNorm parameters `gamma` / `beta`: they become `weight` / `bias`;
- the MLM decoder weight is tied to the word embeddings and its bias is `cls.predictions.bias`: a file that
  stores only one name of a tied pair fills the other;
- heads missing from the file keep their fresh initialisation; missing and unexpected keys are listed in
  one `warnings.warn`.

Saving writes `config.json`, `model.safetensors` and a manifest (`fastbert-manifest.json`: each file's size and
sha256, written last) into a temporary sibling folder, fsyncs it and swaps it in by rename
(fastbert/_atomic.py): a kill at any point leaves the old complete folder or the new complete one, never new
config beside old weights. A loader that finds a manifest verifies the files it reads against it and names the
one that differs. `save_pretrained` replaces only a folder it recognises (empty, or holding nothing but
config.json, model.safetensors and the files a fastbert manifest lists); anything else needs `overwrite=True`.
Tied tensors are written once, under the names `transformers` expects, so `transformers` loads the folder with
no missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import (
    MANIFEST_NAME,
    absolute,
    atomic_folder,
    fault_point,
    manifest_kind,
    read_manifest,
    recover,
    verify_manifest,
)
from .config import BertConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"

# Aliases of one tensor, as `transformers` declares them: alias → the name that is saved.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

MODEL_KIND = "model"  # the manifest kind of a save_pretrained folder
# What save_pretrained itself writes: a folder holding nothing else (or only files its fastbert manifest
# lists) may be replaced; any other file in it is the user's, and is not deleted without overwrite=True.
MODEL_FILE_NAMES = frozenset({CONFIG_NAME, SAFETENSORS_NAME, MANIFEST_NAME})

# Keys some files carry that are buffers (not weights) in fastbert; dropped on load without a warning.
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")

M = TypeVar("M", bound=nn.Module)


# ---------------------------------------------------------------------------------------------- reading
def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in a checkpoint folder (CPU tensors, keys as in the file)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_NAME).is_file():
        return _read_safetensors(folder / SAFETENSORS_NAME)
    if (folder / SAFETENSORS_INDEX_NAME).is_file():
        return _read_sharded(folder / SAFETENSORS_INDEX_NAME)
    if (folder / PYTORCH_NAME).is_file():
        return _read_torch(folder / PYTORCH_NAME)
    raise FileNotFoundError(
        f"no weights file in {folder}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"weights file {path} is corrupt or not a safetensors file: {e}") from None


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"index file {index_path} is not a valid safetensors index: {e!r}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
        state.update(_read_safetensors(shard_path))
    return state


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"weights file {path} is corrupt or not a PyTorch state dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------- key mapping
def _rename_legacy(key: str) -> str:
    """TF-converted LayerNorm names: `.gamma` → `.weight`, `.beta` → `.bias`."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict's keys to `model`'s (prefix, legacy names, tied aliases)."""
    prefix = getattr(model, "base_prefix", "")
    base = model.get_submodule(prefix.rstrip(".")) if prefix else model
    base_children = {name for name, _ in base.named_children()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = _rename_legacy(key)
        if prefix and key.split(".", 1)[0] in base_children:
            key = prefix + key  # base-model file → model with heads
        elif not prefix and key.startswith("bert."):
            key = key.removeprefix("bert.")  # file with heads → base model
        if key.removeprefix(prefix) in IGNORED_KEYS:
            continue
        out[key] = tensor
    if hasattr(model, "cls"):
        # The decoder weight is tied to the word embeddings, which are the truth: a stored copy is dropped.
        # The decoder bias is `cls.predictions.bias` under a second name: fill whichever name is absent.
        out.pop("cls.predictions.decoder.weight", None)
        if "cls.predictions.bias" in out:
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
        elif "cls.predictions.decoder.bias" in out:
            out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    return out


# ---------------------------------------------------------------------------------------------- load
def load_pretrained(
    cls: type[M], folder: str | os.PathLike, config: BertConfig | None = None, **config_overrides: Any
) -> M:
    """Build `cls` from a Hugging Face checkpoint folder (see the module docstring for what is reconciled).

    `config` replaces the folder's config.json (which may then be absent); `config_overrides` change fields
    of whichever config is used (for example `num_labels=3`, or fusion switches). The model is returned in
    eval mode, in float32 (the file's dtype is cast), on the CPU.
    """
    folder = Path(folder)
    recover(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"checkpoint path is not a folder: {folder}")
    # The files this load reads must match the manifest, if the folder has one (no new config over old weights).
    read = {SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME} | ({CONFIG_NAME} if config is None else set())
    manifest = read_manifest(folder)
    if manifest is not None:
        read |= {name for name in manifest["files"] if name.endswith(".safetensors")}  # shards
        verify_manifest(folder, only=read)
    if config is None:
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{CONFIG_NAME} not found in {folder} (or pass config=BertConfig(...))")
        config = BertConfig.from_json_file(folder / CONFIG_NAME)
    elif not isinstance(config, BertConfig):
        raise ValueError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
    if config_overrides:
        try:
            config = config.replace(**config_overrides)
        except TypeError as e:
            raise ValueError(f"unknown config override: {e}") from None

    raw = read_weights(folder)
    model = cls(config)
    state = convert_state_dict(raw, model)
    expected = model.state_dict()
    clashes = [
        f"{key}: file {tuple(t.shape)} vs config {tuple(expected[key].shape)}"
        for key, t in state.items()
        if key in expected and t.shape != expected[key].shape
    ]
    if clashes:
        shown = "; ".join(clashes[:6]) + (f"; … ({len(clashes) - 6} more)" if len(clashes) > 6 else "")
        raise ValueError(
            f"{len(clashes)} tensor(s) in {folder} do not match the shapes the config gives "
            f"(does config.json belong to these weights?): {shown}"
        )
    result = model.load_state_dict(state, strict=False)
    tied_aliases = set(TIED_KEYS)
    missing = [k for k in result.missing_keys if k not in tied_aliases]
    unexpected = list(result.unexpected_keys)
    if len(missing) == len(expected) - len(tied_aliases & expected.keys()):
        raise ValueError(
            f"none of {cls.__name__}'s weights are in {folder} (the file's keys start with "
            f"{sorted(state)[:3]}); is this a BERT checkpoint?"
        )
    if missing or unexpected:
        lines = [f"loading {cls.__name__} from {folder}:"]
        if missing:
            lines.append(f"  not in the file, freshly initialised ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  in the file but unused ({len(unexpected)}): {', '.join(unexpected)}")
        warnings.warn("\n".join(lines), stacklevel=3)
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: Callable[[Path], object] | None = None,
) -> Path:
    """Write `config.json` and `model.safetensors` (and whatever `extra_files(tmp_folder)` writes, e.g. the
    tokenizer) as the folder `folder`, atomically with a manifest (see the module docstring); returns it.

    An existing `folder` is replaced when it holds nothing but config.json, model.safetensors and the files its
    fastbert manifest lists; a folder with any other file is refused (ValueError) unless `overwrite=True`, and
    a file is always refused."""
    config = getattr(model, "config", None)
    if not isinstance(config, BertConfig):
        raise ValueError(f"{type(model).__name__} has no fastbert BertConfig; cannot save it")
    folder = absolute(folder)
    recover(folder)
    check_model_target(folder, overwrite)
    with atomic_folder(folder, MODEL_KIND) as tmp:
        write_model_files(model, tmp)
        if extra_files is not None:
            extra_files(tmp)
    return folder


def check_model_target(folder: Path, overwrite: bool) -> None:
    """The save_pretrained refusal rule (see save_pretrained)."""
    if folder.is_file() or (folder.is_symlink() and not folder.is_dir()):
        raise ValueError(f"save_pretrained: {folder} is a file, not a folder")
    if not folder.is_dir() or overwrite:
        return
    known = set(MODEL_FILE_NAMES)
    if manifest_kind(folder) == MODEL_KIND:
        known |= {name.split("/")[0] for name in read_manifest(folder)["files"]}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in known)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ValueError(f"save_pretrained: {folder} holds files that are not a saved model ({shown}); "
                         "choose an empty or new folder, or pass overwrite=True to replace it")


def write_model_files(model: nn.Module, folder: Path) -> None:
    """config.json and model.safetensors into the (fresh, temporary) `folder`; no manifest, no swap."""
    config = model.config
    config_dict = config.to_dict()
    config_dict["architectures"] = [type(model).__name__]
    config_text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    (folder / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    fault_point("model:config-written")

    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        target = TIED_KEYS.get(key)
        if target in state and state[target].data_ptr() == t.data_ptr():
            continue  # a tied alias: saved once, under the target's name
        tensors[key] = t.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share memory; anything still shared (not a known tie) is copied.
    seen: set[int] = set()
    for key, t in tensors.items():
        if t.data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(t.data_ptr())
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    fault_point("model:weights-written")
