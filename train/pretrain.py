"""BERT pretraining (MLM + NSP) on fastbert's model: `fastbert-pretrain` / `python -m train.pretrain`.

    python -m train.pretrain --preset tiny --demo          # a few minutes on a laptop CPU, embedded Wikipedia
    fastbert-pretrain --preset base --data-dir runs/data/my-128 --out-dir runs/base-p1                  # phase 1
    fastbert-prepare --max-seq-len 512 --out-dir runs/data/my-512 corpus.txt
    fastbert-pretrain --preset base --data-dir runs/data/my-512 --init-from runs/base-p1/model \\
        --micro-batch-size 32 --lr 4e-3 --max-steps 1563 --warmup-steps 200 --out-dir runs/base-p2      # phase 2
    torchrun --nproc_per_node 8 -m train.pretrain --preset base ...                            # DDP, any size
    fastbert-pretrain ... --resume                      # continue from the newest checkpoint in --out-dir

Every option is a field of `PretrainConfig` (flat, with its default visible below); the CLI flags are generated
from it (`--micro-batch-size`, `--no-fused`, ...). Precedence: dataclass defaults < `PRESETS[preset]` <
`DEMO` (with --demo) < flags given on the command line.

What one optimizer step does: `grad_accum` micro-batches per rank, each a forward with `masked_only=True` (the
MLM head decodes only the labelled positions) under bf16 autocast on CUDA (fp16 + GradScaler on request, fp32 on
CPU), the losses scaled so that the gradient is that of the *global* batch — MLM cross-entropy averaged over
all masked tokens of the global batch, NSP over all its sequences — whatever the split over ranks and
micro-batches; then global-norm clipping, the optimizer (LAMB or AdamW) and the warm-up + polynomial-decay LR.

Logged every `log_every` steps (stdout and <out_dir>/log.jsonl): loss, MLM / NSP loss and accuracy, lr, grad
norm, seq/s, real tokens/s and MFU = tokens/s × F / peak, with F = 72·L·H² + 12·L·T·H + 6·H·V·f FLOP per real
token (f = fraction of tokens with an MLM prediction) and the peak from `PEAK_FLOPS` (dense bf16 tensor-core
spec; MFU is omitted on CPU and on unknown GPUs). At the end: held-out MLM / NSP evaluation (also every
`eval_every` steps), <out_dir>/loss.png, and the model in Hugging Face format in <out_dir>/model/.

The run folder: a fresh run refuses an --out-dir that already holds files unless `--resume` (continue it) or
`--overwrite` (replace it; never the working directory or a folder holding the data); `fastbert-run.json` in it
names the run (its run id is in every checkpoint, and rotation deletes only that run's checkpoints). SIGTERM or
SIGINT: the current step is finished, a checkpoint written, one line logged, exit 143 / 130 (train/signals.py);
`--resume` then continues bitwise as if uninterrupted. `--resume` verifies the newest checkpoint and falls back
to the previous one when it is corrupt, drops a partial last line of log.jsonl, and refuses a different dataset
(a fingerprint of its meta.json and file sizes is stored) as it refuses a changed lr.

Caution: the data position is the optimizer step, so resuming needs the same global batch
(micro_batch_size × grad_accum × world size) — checked, with a clear error. A resumed run's first log window
starts at the resume step (windows differ from the uninterrupted run's unless the stop was on a log step).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastbert._atomic import absolute, fault_point, refuse_dangerous_target, write_text_atomic
from fastbert.config import BertConfig
from fastbert.flops import train_flops_per_token
from fastbert.models import BertForPreTraining

from . import distributed
from .checkpointing import (
    checkpoint_dir,
    list_checkpoints,
    load_latest_good,
    load_model_weights,
    rng_state,
    save_checkpoint,
    save_model_folder,
    set_rng_state,
)
from .cli import add_config_arguments
from .dataset import IGNORE_INDEX, PretrainingDataset, StepBatchSampler, keep_batch
from .optim import build_optimizer, build_scheduler, warmup_poly_factor
from .prepare import FORMAT_VERSION, PrepareConfig, data_format, is_prepared, prepare
from .signals import GracefulStop, ignore_in_worker

RUN_MARKER = "fastbert-run.json"  # names the run a run folder holds (kind, run id)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PretrainConfig:
    # model
    preset: str = "tiny"  # fastbert.config.PRESETS: tiny, mini, small, medium, base, large
    hidden_size: int | None = None  # None = the preset's; these four give a custom size (tests use 32)
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    dropout: float | None = None  # hidden and attention dropout; None = the preset's (0.1, as BERT)
    fused: bool = True  # fastbert's Triton fusions (where a fused path exists for the device); off = reference
    init_from: str | None = None  # model or checkpoint folder to start from (phase 2 from phase 1)
    # data
    data_dir: str | None = None  # a fastbert-prepare directory; None = the embedded Wikipedia, prepared once
    data_cache: str = "runs/data"  # where the embedded corpus is prepared when data_dir is None
    max_seq_len: int = 128  # only for the automatic preparation (a data_dir has its own)
    dupe_factor: int = 5  # only for the automatic preparation
    vocab_size: int = 0  # only for the automatic preparation: 0 = the MiniLM (BERT uncased) vocabulary,
    #                      N = a new WordPiece vocabulary of N tokens trained on the corpus
    mask_prob: float = 0.15
    max_predictions: int = 0  # cap on masked tokens per sequence; 0 = ceil(mask_prob × the data's length):
    #                           20 at 128 tokens, 77 at 512 (the BERT recipe: 20 and 80)
    whole_word_mask: bool = False  # mask whole words (a token and its ## pieces), as Google's option
    num_workers: int = 2  # data-loader processes per rank (loading costs 13-19 µs of a core per sequence at 128)
    # optimisation
    optimizer: str = "lamb"  # "lamb" (train/optim.py) or "adamw" (torch, fused on CUDA)
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.01  # not on biases and LayerNorm
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    warmup_steps: int = 1000
    max_steps: int = 10000  # length of the LR schedule
    decay_power: float = 1.0  # polynomial decay after warm-up: 1 = linear, 0.5 = NVIDIA's LAMB recipe
    micro_batch_size: int = 64  # sequences per forward per rank
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro × accum × ranks
    clip_grad_norm: float = 1.0  # global-norm clipping; 0 = off
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with GradScaler), fp32
    device: str = "auto"  # auto, cuda, cpu
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default (one per core)
    seed: int = 42
    # logging, evaluation, checkpoints
    out_dir: str | None = None  # None = runs/pretrain-<preset>
    log_every: int = 50
    eval_every: int = 0  # held-out evaluation every N steps (0 = only at the end)
    eval_samples: int = 2000  # held-out sequences per evaluation
    checkpoint_every: int = 1000  # 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = all)
    resume: bool = False  # continue from the newest good checkpoint in out_dir
    overwrite: bool = False  # replace an out_dir holding another run or other files (they are deleted)
    stop_at_step: int = 0  # stop (with a checkpoint) after this step, as a time-limited job would; 0 = off
    progress: bool = True  # tqdm progress bar (on a terminal only)
    demo: bool = False  # the CPU demo settings (DEMO below), applied over the preset

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("max_seq_len", "dupe_factor", "max_steps", "micro_batch_size",
                     "grad_accum", "log_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "cpu_threads", "warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "max_predictions", "stop_at_step", "clip_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in ("lamb", "adamw"):
            raise ValueError(f"optimizer must be 'lamb' or 'adamw', got {self.optimizer!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.decay_power <= 0:
            raise ValueError(f"decay_power must be > 0, got {self.decay_power}")
        if self.resume and self.overwrite:
            raise ValueError("give --resume (continue the run in out_dir) or --overwrite (replace it), not both")

    @classmethod
    def from_preset(cls, preset: str = "tiny", demo: bool = False, **overrides: Any) -> PretrainConfig:
        """Defaults < PRESETS[preset] < DEMO (when demo) < overrides."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PretrainConfig option(s) {unknown}")
        values = {**PRESETS[preset], **(DEMO if demo else {}), **overrides, "preset": preset, "demo": demo}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/pretrain-{self.preset}")


# Training presets, one per model size: starting points scaled from NVIDIA's recipe (LAMB, global batch
# 64 k at lr 6e-3) down to one node by the square-root rule. Only `tiny` (and DEMO) has been tuned here.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(lr=1e-3, micro_batch_size=64, warmup_steps=500, max_steps=20000, checkpoint_every=2000),
    "mini": dict(lr=1e-3, micro_batch_size=128, warmup_steps=1000, max_steps=50000),
    "small": dict(lr=1e-3, micro_batch_size=128, warmup_steps=2000, max_steps=100000),
    "medium": dict(lr=1e-3, micro_batch_size=128, warmup_steps=2000, max_steps=100000),
    "base": dict(lr=2e-3, micro_batch_size=256, grad_accum=4, warmup_steps=2000, max_steps=100000,
                 decay_power=0.5, num_workers=4),
    "large": dict(lr=2e-3, micro_batch_size=128, grad_accum=8, warmup_steps=2000, max_steps=100000,
                  decay_power=0.5, num_workers=4),
}

# `--demo`: a pretraining that visibly learns in about 2 minutes on a 2-core CPU: sequences of 64 tokens, one
# packing pass over the embedded corpus with a WordPiece vocabulary of 4,096 trained on it (a small vocabulary is
# learnt from far fewer steps than BERT's 30,522), 1,000 AdamW steps at lr 3e-3 after 100 warm-up steps, no
# dropout (a short run is far from overfitting), two threads at most (on an idle 2-core machine 300 steps took
# 28 s with two, 45 s with one; the tiny model gains little from more, and on a busy machine extra OpenMP threads
# spin more than they compute). Deterministic for a seed and a thread count. Measured: held-out MLM accuracy
# 0.128 (unigram baseline 0.048); NSP stays at the majority label (68 % random next on the held-out pairs).
DEMO: dict[str, Any] = dict(
    max_seq_len=64, dupe_factor=1, vocab_size=4096, optimizer="adamw", lr=3e-3, dropout=0.0, micro_batch_size=32,
    warmup_steps=100, max_steps=1000, log_every=25, eval_every=250, eval_samples=448, checkpoint_every=500,
    num_workers=0, cpu_threads=min(2, os.cpu_count() or 1),
)

# Dense bf16/fp16 tensor-core peak FLOP/s from the vendors' spec sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------- helpers
def ensure_data(cfg: PretrainConfig, info: distributed.DistInfo) -> Path:
    """The dataset directory: cfg.data_dir, or the embedded corpus prepared once under cfg.data_cache."""
    if cfg.data_dir is not None:
        path = Path(cfg.data_dir)
        if not is_prepared(path):
            version = data_format(path)
            if version is not None:
                raise ValueError(f"{path} was prepared by another fastbert version (data format {version}; this one "
                                 f"reads {FORMAT_VERSION}): run fastbert-prepare on its corpus again")
            raise FileNotFoundError(f"{path} is not a prepared pretraining dataset; run fastbert-prepare first")
        return path
    vocab = f"-vocab{cfg.vocab_size}" if cfg.vocab_size else ""
    path = Path(cfg.data_cache) / f"wiki-T{cfg.max_seq_len}-dupe{cfg.dupe_factor}{vocab}"
    try:
        ready = is_prepared(path)
    except ValueError as e:  # fastbert's own cache, damaged (a truncated file): made again
        print(f"note: the prepared corpus is damaged ({e}); preparing it again", flush=True)
        ready = False
    if info.is_main and not ready:
        print(f"preparing the embedded Wikipedia corpus in {path} (once) ...", flush=True)
        prepare(PrepareConfig(out_dir=str(path), max_seq_len=cfg.max_seq_len, dupe_factor=cfg.dupe_factor,
                              vocab_size=cfg.vocab_size))
    distributed.barrier()
    return path


def _on_main(info: distributed.DistInfo, fn):
    """Run `fn` on rank 0 and hand its result (or its ValueError / FileNotFoundError) to every rank."""
    if not info.enabled:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            box[0] = (type(e).__name__, str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(kind, FloatingPointError)(value)


def resolve_precision(cfg: PretrainConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision {cfg.precision} needs a CUDA device; use fp32 (or auto) on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# Options that change the training trajectory: a resumed run must keep them.
_RESUME_KEYS = (
    "preset", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "dropout",
    "optimizer", "lr", "weight_decay", "beta1", "beta2", "eps", "warmup_steps", "max_steps", "decay_power",
    "clip_grad_norm", "seed", "mask_prob", "max_predictions", "precision",
)


def check_resumable(saved: dict[str, Any], cfg: PretrainConfig, global_batch: int,
                    fingerprint: dict[str, Any] | None = None) -> None:
    diffs = [f"{k}: {saved['config'][k]!r} → {getattr(cfg, k)!r}" for k in _RESUME_KEYS
             if saved["config"].get(k) != getattr(cfg, k)]
    if saved["global_batch"] != global_batch:
        diffs.append(f"global batch: {saved['global_batch']} → {global_batch}")
    old = saved.get("data_fingerprint")
    if fingerprint is not None and old is not None and old != fingerprint:
        changed = sorted(k for k in set(old["files"]) | set(fingerprint["files"])
                         if old["files"].get(k) != fingerprint["files"].get(k))
        what = f"files {', '.join(changed)} differ in size" if changed else "its meta.json differs"
        before, after = saved["config"].get("data_dir") or "embedded corpus", cfg.data_dir or "embedded corpus"
        diffs.append(f"dataset: {before} → {after} ({what})")
    if diffs:
        raise ValueError("cannot resume exactly, these options differ from the checkpoint's: " + "; ".join(diffs))


def data_fingerprint(data_dir: Path) -> dict[str, Any]:
    """What identifies a prepared dataset cheaply: the sha256 of its meta.json and the sizes of its arrays (in
    subfolders too: the shards) and vocabulary (files added to the folder by hand do not count)."""
    meta = (data_dir / "meta.json").read_bytes()
    files = {p.relative_to(data_dir).as_posix(): p.stat().st_size for p in sorted(data_dir.rglob("*"))
             if p.is_file() and (p.suffix == ".npy" or p.name == "vocab.txt")}  # shards/ included
    return {"meta_sha256": hashlib.sha256(meta).hexdigest(), "files": files}


def prepare_run_dir(cfg: PretrainConfig, data_dir: Path) -> str:
    """Check (and for a fresh run create) the run folder; returns the run id. See the module docstring."""
    out = absolute(cfg.run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file, not a folder")
    marker = out / RUN_MARKER
    run_info = None
    if marker.is_file():
        try:
            run_info = json.loads(marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            run_info = None
    if cfg.resume:
        if not list_checkpoints(out):
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(out)}")
        if isinstance(run_info, dict) and isinstance(run_info.get("run_id"), str):
            return run_info["run_id"]
        # A run folder written before run ids: adopt it under a new id (its old checkpoints are never rotated).
        run_id = uuid.uuid4().hex[:12]
        write_text_atomic(marker, json.dumps({"fastbert": "pretrain-run", "run_id": run_id}, indent=2) + "\n")
        return run_id
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            held = (f"the fastbert run {run_info.get('run_id')}" if isinstance(run_info, dict) else "files")
            raise ValueError(f"--out-dir {out} already holds {held}; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out-dir")
        refuse_dangerous_target(out, "--out-dir", protected=[data_dir, *([cfg.init_from] if cfg.init_from else [])])
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(marker, json.dumps({"fastbert": "pretrain-run", "run_id": run_id, "created": time.time()},
                                         indent=2) + "\n")
    return run_id


def nan_message(step: int, start_step: int, cfg: PretrainConfig) -> str:
    """What a non-finite loss at optimizer step `step` (1-based) most likely means."""
    if step == start_step + 1:
        start = ("the checkpoint it resumed from" if cfg.resume else
                 f"the weights from --init-from {cfg.init_from}" if cfg.init_from else "a fresh initialisation")
        return (f"the loss is not finite at step {step}, the first step of this run, before any update: the "
                f"starting weights ({start}) or the data are at fault, not the learning rate")
    lr = cfg.lr * warmup_poly_factor(step - 1, cfg.warmup_steps, cfg.max_steps, cfg.decay_power)
    return (f"the loss is not finite at step {step}, after {step - 1 - start_step} finite step(s) of this run, at "
            f"lr {lr:.3g}: training diverged; lower --lr, lengthen --warmup-steps, keep --clip-grad-norm on, or "
            f"use --precision fp32 / bf16 (precision {cfg.precision})")


@torch.no_grad()
def evaluate(model: nn.Module, ds: PretrainingDataset, cfg: PretrainConfig, info: distributed.DistInfo,
             dtype: torch.dtype) -> dict[str, float]:
    """MLM / NSP loss and accuracy on the first `eval_samples` held-out sequences (fixed masking), sharded
    over ranks."""
    was_training = model.training
    model.eval()
    n = min(cfg.eval_samples, len(ds))
    mine = list(range(info.rank, n, info.world_size))
    sums = torch.zeros(6, dtype=torch.float64, device=info.device)  # mlm loss·count, correct, count, nsp ...
    for i in range(0, len(mine), cfg.micro_batch_size):
        b = to_device(ds.batch(mine[i:i + cfg.micro_batch_size]), info.device)
        with autocast(info.device, dtype):
            out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                        b["next_sentence_label"], masked_only=True)
        nsp_correct = (out.seq_relationship_logits.argmax(-1) == b["next_sentence_label"]).sum()
        sums += torch.stack([
            out.mlm_loss.double() * out.mlm_count, out.mlm_correct.double(), out.mlm_count.double(),
            out.nsp_loss.double() * len(b["input_ids"]), nsp_correct.double(),
            torch.tensor(len(b["input_ids"]), dtype=torch.float64, device=info.device),
        ])
    distributed.all_reduce_sum(sums)
    model.train(was_training)
    mlm_loss, mlm_correct, mlm_count, nsp_loss, nsp_correct, seqs = sums.tolist()
    return {
        "eval_mlm_loss": mlm_loss / max(1.0, mlm_count),
        "eval_mlm_acc": mlm_correct / max(1.0, mlm_count),
        "eval_nsp_loss": nsp_loss / max(1.0, seqs),
        "eval_nsp_acc": nsp_correct / max(1.0, seqs),
        "eval_sequences": int(seqs),
    }


def heldout_baselines(train_ds: PretrainingDataset, heldout: PretrainingDataset, n: int) -> dict[str, Any]:
    """What constant predictors score on the first `n` held-out sequences (those `evaluate` uses): MLM = always
    the most frequent token of the training data (the unigram baseline; counted on its first 10 M tokens),
    NSP = always the majority label of the training pairs."""
    import numpy as np

    top = int(np.bincount(train_ds.head_tokens(10_000_000), minlength=train_ds.vocab_size).argmax())
    labels = heldout.batch(list(range(n)))["labels"].numpy()
    labels = labels[labels != IGNORE_INDEX]
    majority = int(train_ds.is_random_next.mean() >= 0.5)
    vocab = (train_ds.data_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {
        "unigram_mlm_acc": float(np.mean(labels == top)) if len(labels) else 0.0,
        "unigram_token": vocab[top] if top < len(vocab) else str(top),
        "majority_nsp_acc": float(np.mean(heldout.is_random_next[:n] == majority)),
        "majority_nsp_label": "random next" if majority else "true next",
    }


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss (and held-out MLM loss where evaluated) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (MLM + NSP)")
    ax.plot([r["step"] for r in train], [r["mlm_loss"] for r in train], label="train MLM loss", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_mlm_loss"] for r in evals], "o-", label="held-out MLM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)  # then renamed: a kill never leaves half a PNG under the final name
    plt.close(fig)
    tmp.replace(path)


class JsonlLog:
    """Appends records to <out_dir>/log.jsonl (rank 0); on resume, drops the records past the checkpoint and a
    partial last line (a crash while writing it), with a note."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, note=print):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if i == last:
                        note(f"note: dropped the partial last line {i + 1} of {path} (written when the run stopped)")
                        break
                    raise ValueError(f"{path}:{i + 1}: not a JSON record ({e}); fix or delete that line") from None
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
                    self.records.append(record)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------- training
def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining; returns the final held-out metrics and the output paths."""
    cfg.validate()
    info = distributed.setup(cfg.device)
    stopper = GracefulStop(info.world_size)  # armed when the training loop starts
    failed = True
    try:
        result = _pretrain(cfg, info, stopper)
        failed = False
        return result
    finally:
        stopper.close(failed)
        distributed.cleanup()


def _pretrain(cfg: PretrainConfig, info: distributed.DistInfo, stopper: GracefulStop) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t_start = time.time()
    out_dir = cfg.run_dir
    say = (lambda msg: tqdm.write(msg)) if info.is_main else (lambda msg: None)
    dev = info.device
    dtype = resolve_precision(cfg, dev)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data, run folder
    data_dir = ensure_data(cfg, info)
    run_id = _on_main(info, lambda: prepare_run_dir(cfg, data_dir))
    fingerprint = data_fingerprint(data_dir)
    masking = dict(mask_prob=cfg.mask_prob, max_predictions=cfg.max_predictions or None,
                   whole_word_mask=cfg.whole_word_mask)
    train_ds = PretrainingDataset(data_dir, "train", seed=cfg.seed, **masking)
    heldout = PretrainingDataset(data_dir, "heldout", seed=cfg.seed + 1, fixed_masking=True, **masking)
    if len(heldout) == 0:
        heldout = None
        say("note: the dataset has no held-out split; no evaluation")
    seq_len = train_ds.max_seq_len

    # ---- model, optimizer, schedule
    overrides: dict[str, Any] = {"vocab_size": train_ds.vocab_size}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if cfg.dropout is not None:
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    mcfg = BertConfig.from_preset(cfg.preset, **overrides).with_fusions(cfg.fused)
    if seq_len > mcfg.max_position_embeddings:
        raise ValueError(f"the data has sequences of {seq_len} tokens, more than the model's "
                         f"max_position_embeddings ({mcfg.max_position_embeddings})")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = BertForPreTraining(mcfg)
    if cfg.init_from:
        load_model_weights(model, cfg.init_from)
        say(f"initialised from {cfg.init_from}")
    model.to(dev)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.decay_power)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    global_batch = cfg.micro_batch_size * cfg.grad_accum * info.world_size

    start_step, saved = 0, None
    if cfg.resume:
        # Rank 0 verifies and loads the newest good checkpoint; the other ranks load the one it picked.
        picked: dict[str, Any] = {}

        def pick() -> str:
            path, picked["state"] = load_latest_good(out_dir, model, optimizer, scheduler, scaler, warn=say)
            return str(path)

        ckpt = Path(_on_main(info, pick))
        saved = picked.get("state") or load_latest_good(out_dir, model, optimizer, scheduler, scaler, warn=say,
                                                        only=ckpt, verify=False)[1]
        check_resumable(saved, cfg, global_batch, fingerprint)
        start_step = saved["step"]
        say(f"resumed from {ckpt} at step {start_step}")
    end_step = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.max_steps

    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if dev.type == "cuda" else None
        )
    model.train()

    sampler = StepBatchSampler(len(train_ds), cfg.micro_batch_size, cfg.grad_accum, info.world_size, info.rank,
                               cfg.seed, start_step, max(0, end_step - start_step))
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, collate_fn=keep_batch, num_workers=cfg.num_workers,
        pin_memory=dev.type == "cuda", worker_init_fn=ignore_in_worker if cfg.num_workers else None,
    )
    batches = iter(loader)
    # The RNG states are set last: building the model and starting the loader iterator draw random numbers.
    if saved is not None and len(saved["rng"]) == info.world_size:
        set_rng_state(saved["rng"][info.rank])
    else:
        if saved is not None:
            say(f"note: the checkpoint was written by {len(saved['rng'])} ranks, not {info.world_size}: "
                "fresh dropout RNG streams")
        torch.manual_seed(cfg.seed + 1000 * (info.rank + 1))  # dropout streams differ by rank

    log = JsonlLog(out_dir / "log.jsonl", info.is_main, start_step if cfg.resume else None, note=say)
    if info.is_main:
        write_text_atomic(out_dir / "config.json", json.dumps(
            {"pretrain": asdict(cfg), "model": mcfg.to_dict(), "data_dir": str(data_dir), "run_id": run_id,
             "world_size": info.world_size}, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(dev)
    say(
        f"model {cfg.preset}: {n_params / 1e6:.1f} M parameters, vocab {mcfg.vocab_size}; data {data_dir} "
        f"({len(train_ds)} train sequences of ≤ {seq_len} tokens); {info.world_size} × {dev.type}, "
        f"{str(dtype).removeprefix('torch.')}; global batch {global_batch}, steps {start_step} → {end_step}"
    )

    # Per-window sums, kept on the device (no host sync per step): mlm loss·n, mlm correct, mlm n,
    # nsp loss·seqs, nsp correct, seqs, real tokens, grad norm·steps.
    window = torch.zeros(8, dtype=torch.float64, device=dev)
    window_steps, t_window = 0, time.perf_counter()
    last_eval: dict[str, float] = {}
    # disable=None: the bar only on a terminal; in a log file (`make pretrain > log 2>&1`, a batch job) its every
    # refresh would be a line, and the log lines every --log-every steps say the same.
    bar = tqdm(total=end_step, initial=start_step, desc="pretrain", dynamic_ncols=True,
               disable=None if cfg.progress and info.is_main else True)

    def save(step: int) -> Path | None:
        check_finite()  # never a checkpoint of NaN weights
        states = [rng_state()]
        if info.enabled:
            states = [None] * info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        path = None
        if info.is_main:
            extra = {"config": asdict(cfg), "global_batch": global_batch, "world_size": info.world_size,
                     "data_fingerprint": fingerprint}
            path = save_checkpoint(out_dir, step, model, optimizer, scheduler, scaler, extra,
                                   vocab=data_dir / "vocab.txt", keep=cfg.keep_checkpoints, run_id=run_id, rng=states)
        distributed.barrier()
        return path

    # The first step whose loss is not finite, tracked on the device (read at log and checkpoint steps only).
    step_t = torch.tensor(start_step, dtype=torch.int64, device=dev)
    first_bad = torch.full((), -1, dtype=torch.int64, device=dev)

    def check_finite() -> None:
        bad = first_bad.clone()
        if info.enabled:  # the earliest step any rank saw (every rank calls this at the same steps)
            bad = torch.where(bad > 0, bad, torch.full_like(bad, end_step + 1))
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        bad_step = int(bad.item())
        if 0 < bad_step <= end_step:
            raise FloatingPointError(nan_message(bad_step, start_step, cfg))

    ckpt_path, ckpt_step, done, stopped = None, None, start_step, None
    stopper.arm()
    for step in range(start_step, end_step):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        # Global normalisers, so each micro-batch's loss is its share of the global-batch mean.
        n_masked = torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)),
                                dtype=torch.float64)
        n_masked = distributed.all_reduce_sum(n_masked.to(dev))
        for k, b in enumerate(micro):
            b = to_device(b, dev)
            sync = contextlib.nullcontext() if (not info.enabled or k == cfg.grad_accum - 1) else ddp_model.no_sync()
            with sync:
                with autocast(dev, dtype):
                    out = ddp_model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                                    b["next_sentence_label"], masked_only=True, packed=b["packed"])
                # DDP averages gradients over ranks, hence × world_size.
                w = info.world_size
                loss = (out.mlm_loss * (out.mlm_count.double() * w / n_masked).float()
                        + out.nsp_loss * (len(b["input_ids"]) * w / global_batch))
                (scaler.scale(loss) if scaler is not None else loss).backward()
            first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad < 0), step_t + 1, first_bad)
            nsp_correct = (out.seq_relationship_logits.detach().argmax(-1) == b["next_sentence_label"]).sum()
            window[:7] += torch.stack([
                out.mlm_loss.detach().double() * out.mlm_count, out.mlm_correct.double(), out.mlm_count.double(),
                out.nsp_loss.detach().double() * len(b["input_ids"]), nsp_correct.double(),
                torch.tensor(float(len(b["input_ids"])), dtype=torch.float64, device=dev),
                b["attention_mask"].sum().double(),
            ])
        fault_point(f"pretrain:step-{step + 1}:backward")
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        window[7] += grad_norm.double()
        lr = scheduler.get_last_lr()[0]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_t += 1
        window_steps += 1
        bar.update(1)
        done = step + 1

        if done % cfg.log_every == 0 or done == end_step:
            check_finite()
            distributed.all_reduce_sum(window[:7])
            mlm_l, mlm_c, mlm_n, nsp_l, nsp_c, seqs, toks, gn = window.tolist()
            dt = time.perf_counter() - t_window
            rec = {
                "kind": "train", "step": done, "loss": (mlm_l / mlm_n) + (nsp_l / seqs),
                "mlm_loss": mlm_l / mlm_n, "nsp_loss": nsp_l / seqs, "mlm_acc": mlm_c / mlm_n,
                "nsp_acc": nsp_c / seqs, "lr": lr, "grad_norm": gn / window_steps,
                "seq_per_s": seqs / dt, "tokens_per_s": toks / dt,
            }
            if peak is not None:
                f = train_flops_per_token(mcfg, seq_len, mlm_n / toks)
                rec["mfu"] = toks / dt * f / (peak * info.world_size)
            rec["elapsed_s"] = time.time() - t_start
            log.write(rec)
            mfu = f", MFU {rec['mfu']:.1%}" if "mfu" in rec else ""
            say(f"step {done:6d} | loss {rec['loss']:.4f} (MLM {rec['mlm_loss']:.3f}, NSP {rec['nsp_loss']:.3f}) "
                f"| MLM acc {rec['mlm_acc']:.3f} NSP acc {rec['nsp_acc']:.3f} | lr {lr:.2e} | "
                f"{rec['seq_per_s']:.0f} seq/s {rec['tokens_per_s']:.0f} tok/s{mfu}")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", mlm_acc=f"{rec['mlm_acc']:.3f}")
            window.zero_()
            window_steps, t_window = 0, time.perf_counter()

        is_last = done == end_step
        if heldout is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last):
            t_eval = time.perf_counter()
            last_eval = evaluate(model, heldout, cfg, info, dtype)
            log.write({"kind": "eval", "step": done, **last_eval})
            say(f"step {done:6d} | held-out MLM loss {last_eval['eval_mlm_loss']:.4f} acc "
                f"{last_eval['eval_mlm_acc']:.3f} | NSP loss {last_eval['eval_nsp_loss']:.4f} acc "
                f"{last_eval['eval_nsp_acc']:.3f} ({last_eval['eval_sequences']} sequences)")
            t_window += time.perf_counter() - t_eval  # keep evaluation out of the throughput figures
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or is_last:
            t_ckpt = time.perf_counter()
            ckpt_path, ckpt_step = save(done), done
            t_window += time.perf_counter() - t_ckpt
        stopped = stopper.poll()
        if stopped:
            if ckpt_step != done:
                ckpt_path, ckpt_step = save(done), done
            say(f"stopped by {stopper.name} after step {done}: checkpoint {ckpt_path} written; continue with "
                "--resume")
            break
    bar.close()

    result: dict[str, Any] = {"step": done, "checkpoint": str(ckpt_path) if ckpt_path else None, **last_eval}
    if stopped:
        result["signal"], result["exit_code"] = stopper.name, stopper.exit_code
    if info.is_main:
        if done == cfg.max_steps:
            final = out_dir / "model"
            save_model_folder(model, final, data_dir / "vocab.txt", overwrite=True)
            result["model"] = str(final)
        if any(r["kind"] == "train" for r in log.records):
            plot_losses(log.records, out_dir / "loss.png")
            result["loss_png"] = str(out_dir / "loss.png")
        train_recs = [r for r in log.records if r["kind"] == "train"]
        if train_recs:
            result["first_loss"], result["last_loss"] = train_recs[0]["loss"], train_recs[-1]["loss"]
        result["wall_s"] = time.time() - t_start
        say(f"done in {result['wall_s']:.0f} s: checkpoint {result['checkpoint']}"
            + (f", model {result['model']}" if "model" in result else "")
            + (f", loss curve {result['loss_png']}" if "loss_png" in result else ""))
        if train_recs:
            say(f"training loss {result['first_loss']:.3f} (first log) → {result['last_loss']:.3f} (last log)")
        if last_eval:
            base = heldout_baselines(train_ds, heldout, last_eval["eval_sequences"])
            result.update(base)
            say(f"held-out MLM accuracy {last_eval['eval_mlm_acc']:.3f} (loss {last_eval['eval_mlm_loss']:.3f}, "
                f"perplexity {math.exp(min(50.0, last_eval['eval_mlm_loss'])):.1f}) against "
                f"{base['unigram_mlm_acc']:.3f} for always predicting the most frequent token "
                f"({base['unigram_token']!r}, the unigram baseline); NSP accuracy {last_eval['eval_nsp_acc']:.3f} "
                f"against {base['majority_nsp_acc']:.3f} for always predicting the majority label "
                f"({base['majority_nsp_label']})")
    distributed.barrier()  # no rank exits (and has torchrun stop the others) while rank 0 is still writing
    return result


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastbert-pretrain",
        description="BERT pretraining (MLM + NSP) with fastbert. Every PretrainConfig field is a flag; "
                    "precedence: defaults < --preset < --demo < flags given.",
    )
    # Defaults suppressed: only flags actually given reach the namespace, so presets are not overridden by the
    # dataclass defaults.
    add_config_arguments(p, PretrainConfig, suppress_defaults=True)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[PretrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    print_only = args.pop("print_config")
    preset = args.pop("preset", PretrainConfig.preset)
    demo = args.pop("demo", False)
    return PretrainConfig.from_preset(preset, demo=demo, **args), print_only


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_only = config_from_args(argv)
        if print_only:
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        result = pretrain(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"fastbert-pretrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the training loop (data, model): nothing to save yet
        print("fastbert-pretrain: interrupted before training started; nothing written", file=sys.stderr)
        return 130
    return result.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
