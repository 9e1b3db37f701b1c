"""Fine-tune a BERT checkpoint: sequence classification / regression (single sentence or pair) and SQuAD QA.

    fastbert-finetune                                   # MiniLM on the embedded Rotten Tomatoes task
    fastbert-finetune --task bbc_news --max-length 256
    fastbert-finetune --task mrpc --data-dir glue/MRPC --init path/to/bert-folder
    fastbert-finetune --task squad --data-dir squad --max-length 384 --batch-size 16 --epochs 2
    python -m train.finetune --help

Python API: `finetune(FinetuneConfig(task="rte", data_dir=...))` → the metrics dict that is also written to
`<output_dir>/metrics.json`; a model and tokenizer built elsewhere can be passed in (`model=`, `tokenizer=`).

Tasks: the GLUE tasks (TSV files, see train/glue.py), the embedded `rotten_tomatoes` (fresh = 1 / rotten = 0)
and `bbc_news` (5 topics) with a seeded train / test split (train/classification_data.py), and `squad`
(v1.1 JSON, see train/squad.py). The start point is the MiniLM checkpoint (default), any Hugging Face-format
BERT folder (a pretraining checkpoint `step_N/` or its `model/` included; the task head is freshly
initialised, and the tokenizer is the folder's vocab.txt / tokenizer.json unless --tokenizer), or `preset:<name>` for
a randomly initialised model of a BertConfig preset (smoke runs).

Training: AdamW (no weight decay on biases and LayerNorm weights), linear warm-up then linear decay to zero,
gradient clipping, batches padded to their longest sequence. CPU runs fp32; CUDA runs bf16 autocast (fp32
master weights). Written to `output_dir`: metrics.json (metrics, per-epoch history, timings, the config),
predictions.json (and nbest_predictions.json for SQuAD), and the fine-tuned model under `model/`
(save_pretrained, with the tokenizer files) unless `--no-save-model`.

The output folder is written whole as a temporary sibling and swapped in by rename, with a manifest
(fastbert/_atomic.py): a kill leaves the old complete folder or the new one. An existing non-empty output_dir is
refused unless `--overwrite` (never the working directory or a folder holding the data or the start model).
SIGTERM / SIGINT: the current optimizer step is finished, the output written with the model so far and
`"interrupted"` in metrics.json (no evaluation), one line logged, exit 143 / 130; a second signal exits at once.

Caution: evaluation is on the dev / held-out split (GLUE test files carry no labels); SQuAD v2.0 is not
supported; one process, one device (no distributed training).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from torch import nn

from fastbert._atomic import absolute, atomic_folder, fault_point, refuse_dangerous_target
from fastbert.checkpoint import save_pretrained
from fastbert.config import FUSION_FLAGS, BertConfig
from fastbert.models import BertForQuestionAnswering, BertForSequenceClassification
from fastbert.tokenizer import Tokenizer

from . import squad as squad_lib
from .classification_data import embedded_task_split
from .cli import add_config_arguments
from .glue import GLUE_TASKS, TextExample, classification_metrics, glue_files, read_glue_tsv
from .signals import GracefulStop

OUTPUT_KIND = "finetune-output"  # the manifest kind of a fine-tuning output folder

EMBEDDED_TASKS = ("rotten_tomatoes", "bbc_news")
TASKS = (*EMBEDDED_TASKS, *GLUE_TASKS, "squad")
HEADLINE_METRIC = {"rotten_tomatoes": "accuracy", "bbc_news": "accuracy", "squad": "f1"} | {
    name: spec.metric for name, spec in GLUE_TASKS.items()
}


@dataclass
class FinetuneConfig:
    # ---- task and data
    task: str = "rotten_tomatoes"  # GLUE tasks read TSV files, squad v1.1 JSON; the first two are embedded
    data_dir: str | None = None  # GLUE task folder (train.tsv, dev.tsv) or SQuAD folder (train/dev-v1.1.json)
    train_file: str | None = None  # overrides the training file found in data_dir (or the embedded data file)
    eval_file: str | None = None  # overrides the evaluation file found in data_dir
    train_size: int | None = None  # embedded: training split size (None: 3,000 RT / 1,780 BBC); else first N
    test_size: int | None = None  # embedded: test split size (None: 1,000 RT / 445 BBC); else first N
    data_seed: int = 0  # seed of the embedded tasks' train / test split (fixed, so runs share a test set)
    # ---- model
    init: str = "minilm"  # "minilm", a Hugging Face-format BERT folder, or "preset:<name>" (random init)
    tokenizer: str | None = None  # tokenizer.json, vocab.txt or a folder; None: the init folder's (MiniLM's)
    fused: bool = True  # fastbert's fused kernels (honoured on CUDA; the reference runs on plain CPU)
    # ---- optimisation (defaults: the setting the done-when figure and the transformers baseline used)
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int | None = None  # None: 64 for classification (short snippets), 384 for SQuAD (BERT's)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # fraction of the steps spent warming the learning rate up from 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 42
    # ---- SQuAD (original BERT's settings)
    doc_stride: int = 128  # step between context windows, in tokens
    max_query_length: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    # ---- run
    device: str = "auto"  # auto = cuda when available, else cpu
    output_dir: str = "runs/finetune"
    overwrite: bool = False  # replace an existing, non-empty output_dir (its files are deleted)
    save_model: bool = True
    eval_every_epoch: bool = True  # evaluate after every epoch (the last one is always evaluated)
    log_every: int = 20  # steps

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "doc_stride", "max_query_length", "n_best",
                     "max_answer_length", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_length is not None and not (8 <= self.max_length <= 4096):
            raise ValueError(f"max_length must be in [8, 4096] (the model's own limit is checked too), "
                             f"got {self.max_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.task not in EMBEDDED_TASKS and self.data_dir is None and (
            self.train_file is None or self.eval_file is None
        ):
            raise ValueError(f"task {self.task} needs --data-dir (or both --train-file and --eval-file)")
        if self.task in EMBEDDED_TASKS and self.eval_file is not None:
            raise ValueError(f"{self.task} is split from one file; use --train-file for it, not --eval-file")
        if self.init.startswith("preset:"):
            from fastbert.config import PRESETS

            if self.init[len("preset:"):] not in PRESETS:
                raise ValueError(f"unknown preset in init={self.init!r}; choose one of {sorted(PRESETS)}")

    @property
    def seq_len(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return 384 if self.task == "squad" else 64


def _print(message: str) -> None:
    print(message, flush=True)  # flushed: logs are often redirected to a file and tailed


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | Path) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` (truncation and padding off) of `fastbert.Tokenizer.from_file(path)`: a
    tokenizer.json, a vocab.txt (BERT WordPiece; lower-cased unless a tokenizer_config.json beside it says
    do_lower_case false) or a folder holding either (tokenizer.json preferred)."""
    try:
        return Tokenizer.from_file(path).backend_tokenizer
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass --tokenizer with the vocabulary the model was trained on") from None


def encode_pairs(tokenizer, examples: list[TextExample], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids) of `[CLS] a [SEP] (b [SEP])`, cut to max_length (longest text first)."""
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    try:
        inputs = [ex.text_a if ex.text_b is None else (ex.text_a, ex.text_b) for ex in examples]
        encodings = tokenizer.encode_batch(inputs)
    finally:
        tokenizer.no_truncation()
    return [(e.ids, e.type_ids) for e in encodings]


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: input_ids, token_type_ids, attention_mask (int64, (B, T))."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    token_type_ids = torch.zeros((len(rows), T), dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.int64)
    for i, (ids, types) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        token_type_ids[i, : len(types)] = torch.tensor(types)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    train: list  # TextExample or SquadExample
    eval: list
    label_names: tuple[str, ...] | None  # None: regression or QA
    source: str


def load_task_data(cfg: FinetuneConfig) -> TaskData:
    if cfg.task in EMBEDDED_TASKS:
        train, test, labels = embedded_task_split(cfg.task, cfg.train_size, cfg.test_size, cfg.data_seed,
                                                  source=cfg.train_file)
        return TaskData(train, test, labels, cfg.train_file or f"embedded {cfg.task}")
    if cfg.task == "squad":
        data_dir = Path(cfg.data_dir or ".")  # validate() ensured data_dir or both files
        train_path = Path(cfg.train_file) if cfg.train_file else data_dir / "train-v1.1.json"
        eval_path = Path(cfg.eval_file) if cfg.eval_file else data_dir / "dev-v1.1.json"
        train, dev = squad_lib.read_squad(train_path), squad_lib.read_squad(eval_path)
        labels = None
    else:
        spec = GLUE_TASKS[cfg.task]
        train_path, eval_path = glue_files(cfg.task, cfg.data_dir) if cfg.data_dir else (None, None)
        train_path = Path(cfg.train_file) if cfg.train_file else train_path
        eval_path = Path(cfg.eval_file) if cfg.eval_file else eval_path
        train, dev = read_glue_tsv(train_path, spec), read_glue_tsv(eval_path, spec)
        labels = spec.labels
    train = train[: cfg.train_size] if cfg.train_size else train
    dev = dev[: cfg.test_size] if cfg.test_size else dev
    return TaskData(train, dev, labels, f"{train_path} / {eval_path}")


# ---------------------------------------------------------------------------------------------- model
def resolve_init(init: str) -> Path | None:
    """The checkpoint folder named by `init`; None for a `preset:` (random) init."""
    if init.startswith("preset:"):
        return None
    if init == "minilm":
        from fastbert.resources import minilm_path

        return minilm_path()
    path = Path(init)
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint folder not found: {init} (use minilm, a folder or preset:<name>)")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"  # a pretraining checkpoint (step_N/) keeps its model in model/
    return path


def build_model(cfg: FinetuneConfig, num_labels: int, vocab_size: int) -> nn.Module:
    cls = BertForQuestionAnswering if cfg.task == "squad" else BertForSequenceClassification
    overrides = {flag: cfg.fused for flag in FUSION_FLAGS}
    if cfg.task != "squad":
        overrides["num_labels"] = num_labels
    folder = resolve_init(cfg.init)
    if folder is None:
        config = BertConfig.from_preset(cfg.init[len("preset:"):], vocab_size=vocab_size, **overrides)
        return cls(config)
    model = cls.from_pretrained(folder, **overrides)
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary only {model.config.vocab_size}"
        )
    return model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


# ---------------------------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=on_cuda or None)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LR factor rising linearly 0 → 1 over `warmup_steps`, then falling linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps  # step 0 already gets a small non-zero rate
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 (no autocast) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train(
    model: nn.Module,
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]],
    n_train: int,
    cfg: FinetuneConfig,
    device: torch.device,
    evaluate: Callable[[int], dict] | None = None,
    log: Callable[[str], None] = _print,
) -> dict:
    """The fine-tuning loop shared by every task. `make_batch(indices)` gives the model's keyword inputs
    (labels included); `evaluate(epoch)` is called after each epoch (only the last when
    cfg.eval_every_epoch is False). Returns {"train_loss", "train_seconds", "steps", "history"}, plus
    "interrupted" (the signal's name) and "exit_code" when SIGTERM / SIGINT stopped it after a complete step."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_linear_decay(optimizer, int(cfg.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, step, train_seconds = [], 0, 0.0
    with GracefulStop() as stop:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            window_loss, window_seqs, window_t0, epoch_loss = 0.0, 0, time.perf_counter(), 0.0
            for indices in batches(n_train, cfg.batch_size, shuffle=True, generator=generator):
                batch = {k: v.to(device, non_blocking=True) for k, v in make_batch(indices).items()}
                with autocast(device):
                    loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(nan_loss_message(loss.item(), step, batch, scheduler.get_last_lr()[0]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                fault_point(f"finetune:step-{step + 1}:backward")
                optimizer.step()
                scheduler.step()
                step += 1
                value = loss.item()
                window_loss += value * len(indices)
                epoch_loss += value * len(indices)
                window_seqs += len(indices)
                if step % cfg.log_every == 0 or step == total:
                    dt = time.perf_counter() - window_t0
                    log(
                        f"epoch {epoch} step {step}/{total} loss {window_loss / window_seqs:.4f} "
                        f"lr {scheduler.get_last_lr()[0]:.2e} {window_seqs / dt:.1f} seq/s"
                    )
                    window_loss, window_seqs, window_t0 = 0.0, 0, time.perf_counter()
                if stop.poll():
                    train_seconds += time.perf_counter() - t0
                    log(f"stopped by {stop.name} after step {step} of {total}: writing the model so far "
                        "(no evaluation)")
                    return {"train_loss": history[-1]["train_loss"] if history else math.nan,
                            "train_seconds": train_seconds, "steps": step, "history": history,
                            "interrupted": stop.name, "exit_code": stop.exit_code}
            train_seconds += time.perf_counter() - t0
            record = {"epoch": epoch, "train_loss": epoch_loss / n_train}
            if evaluate is not None and (cfg.eval_every_epoch or epoch == cfg.epochs):
                record["eval"] = evaluate(epoch)
                log(f"epoch {epoch} eval {json.dumps(record['eval'])}")
            history.append(record)
    return {"train_loss": history[-1]["train_loss"], "train_seconds": train_seconds, "steps": step,
            "history": history}


def nan_loss_message(loss: float, step: int, batch: dict[str, torch.Tensor], lr: float) -> str:
    """What a non-finite loss most likely means: bad labels in the data, bad starting weights, or the lr."""
    labels = batch.get("labels")
    if labels is not None and labels.is_floating_point() and not torch.isfinite(labels).all():
        return f"loss is {loss} at step {step + 1}: this batch's labels hold NaN or inf (the data is at fault)"
    if step == 0:
        return (f"loss is {loss} at the first step, before any update: the starting weights or the inputs are at "
                "fault, not the learning rate")
    return f"loss is {loss} at step {step + 1}, after {step} finite step(s), at lr {lr:.3g}: lower --lr"


# ---------------------------------------------------------------------------------------------- tasks
@torch.no_grad()
def predict_logits(
    model: nn.Module, make_batch: Callable[[list[int]], dict[str, torch.Tensor]], n: int, batch_size: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, ...]]:
    """Model outputs (logit tensors, fp32 on the CPU) batch by batch, in example order."""
    model.eval()
    out = []
    for indices in batches(n, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in make_batch(indices).items()}
        with autocast(device):
            result = model(**batch)
        out.append(tuple(t.float().cpu() for t in result[1:]))
    return out


def run_classification(
    cfg: FinetuneConfig, data: TaskData, model: nn.Module, tokenizer, device: torch.device, log
) -> tuple[dict, list[dict]]:
    regression = data.label_names is None
    pad_id = tokenizer.token_to_id("[PAD]")
    train_rows = encode_pairs(tokenizer, data.train, cfg.seq_len)
    eval_rows = encode_pairs(tokenizer, data.eval, cfg.seq_len)
    label_dtype = torch.float32 if regression else torch.int64
    for split, examples in (("train", data.train), ("eval", data.eval)) if regression else ():
        bad = next((i for i, ex in enumerate(examples) if not math.isfinite(ex.label)), None)
        if bad is not None:  # the file readers already refuse these with the file and line
            raise ValueError(f"{data.source}: {split} example {bad} has score {examples[bad].label}, not a finite "
                             "number")
    train_labels = torch.tensor([ex.label for ex in data.train], dtype=label_dtype)
    eval_labels = np.array([ex.label for ex in data.eval])

    def make_train_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        return {**pad_batch([train_rows[i] for i in indices], pad_id), "labels": train_labels[indices]}

    def make_eval_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        return pad_batch([eval_rows[i] for i in indices], pad_id)

    last_preds: list[np.ndarray] = []

    def evaluate(epoch: int) -> dict:
        logits = torch.cat([o[0] for o in predict_logits(model, make_eval_batch, len(eval_rows),
                                                          cfg.eval_batch_size, device)])
        preds = logits.squeeze(-1).numpy() if regression else logits.argmax(-1).numpy()
        last_preds[:] = [preds]
        return classification_metrics(cfg.task, preds, eval_labels)

    result = train(model, make_train_batch, len(train_rows), cfg, device, evaluate, log)
    if not last_preds:  # interrupted before the evaluation
        return result, []
    preds = last_preds[0]
    names = data.label_names
    predictions = []
    for i, (ex, p) in enumerate(zip(data.eval, preds, strict=True)):
        row = {"index": i, "text_a": ex.text_a}
        if ex.text_b is not None:
            row["text_b"] = ex.text_b
        if regression:
            row |= {"label": float(ex.label), "prediction": float(p)}
        else:
            row |= {"label": names[ex.label], "prediction": names[int(p)]}
        predictions.append(row)
    return result, predictions


def squad_batch(features: list[squad_lib.SquadFeature], indices: list[int], pad_id: int,
                with_positions: bool) -> dict[str, torch.Tensor]:
    batch = pad_batch([(features[i].input_ids, features[i].token_type_ids) for i in indices], pad_id)
    if with_positions:
        batch["start_positions"] = torch.tensor([features[i].start_position for i in indices])
        batch["end_positions"] = torch.tensor([features[i].end_position for i in indices])
    return batch


def run_squad(
    cfg: FinetuneConfig, data: TaskData, model: nn.Module, tokenizer, device: torch.device, log
) -> tuple[dict, dict]:
    kwargs = dict(max_length=cfg.seq_len, doc_stride=cfg.doc_stride, max_query_length=cfg.max_query_length)
    train_features = squad_lib.make_features(data.train, tokenizer, training=True, **kwargs)
    eval_features = squad_lib.make_features(data.eval, tokenizer, training=False, **kwargs)
    if not train_features:
        raise ValueError("no SQuAD training features (no answer could be located in its context)")
    log(f"squad: {len(data.train)} train questions → {len(train_features)} windows; "
        f"{len(data.eval)} eval questions → {len(eval_features)} windows")
    pad_id = tokenizer.token_to_id("[PAD]")
    gold = squad_lib.gold_answers(data.eval)
    outputs: dict = {}

    def evaluate(epoch: int) -> dict:
        chunks = predict_logits(model, lambda ix: squad_batch(eval_features, ix, pad_id, False),
                                len(eval_features), cfg.eval_batch_size, device)
        starts = [row.numpy() for s, _ in chunks for row in s]
        ends = [row.numpy() for _, e in chunks for row in e]
        preds, nbest = squad_lib.decode_predictions(data.eval, eval_features, starts, ends, cfg.n_best,
                                                    cfg.max_answer_length)
        outputs["predictions"], outputs["nbest"] = preds, nbest
        return squad_lib.squad_metrics(preds, gold)

    result = train(model, lambda ix: squad_batch(train_features, ix, pad_id, True), len(train_features), cfg,
                   device, evaluate, log)
    outputs.setdefault("predictions", {})  # interrupted before the evaluation
    outputs.setdefault("nbest", {})
    return result, outputs


# ---------------------------------------------------------------------------------------------- entry points
def finetune(
    cfg: FinetuneConfig,
    model: nn.Module | None = None,
    tokenizer=None,
    log: Callable[[str], None] = _print,
) -> dict:
    """Run one fine-tuning job (see the module docstring) and return the metrics written to metrics.json.

    `model` (a BertForSequenceClassification / BertForQuestionAnswering) and `tokenizer` (a fastbert
    `Tokenizer`, or a `tokenizers.Tokenizer` with a [CLS] / [SEP] / [PAD] vocabulary) replace `cfg.init` /
    `cfg.tokenizer`."""
    cfg.validate()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data = load_task_data(cfg)
    if not data.train or not data.eval:
        raise ValueError(f"{cfg.task}: {len(data.train)} training and {len(data.eval)} evaluation examples")
    num_labels = 1 if data.label_names is None else len(data.label_names)
    out = check_output_dir(cfg)

    if tokenizer is None:
        folder = resolve_init(cfg.init)
        if cfg.tokenizer is not None:
            source = cfg.tokenizer
        elif folder is None:  # preset: random weights, but a real vocabulary
            from fastbert.resources import minilm_path

            source = minilm_path()
        else:
            source = folder
        tokenizer = load_tokenizer(source)
    elif isinstance(tokenizer, Tokenizer):
        tokenizer = tokenizer.backend_tokenizer
    else:
        tokenizer.no_truncation()
        tokenizer.no_padding()
    if model is None:
        model = build_model(cfg, num_labels, tokenizer.get_vocab_size())
    expected = BertForQuestionAnswering if cfg.task == "squad" else BertForSequenceClassification
    if not isinstance(model, expected):
        raise ValueError(f"task {cfg.task} needs a {expected.__name__}, got {type(model).__name__}")
    if cfg.task != "squad" and model.config.num_labels != num_labels:
        raise ValueError(f"the model has {model.config.num_labels} labels but task {cfg.task} has {num_labels}")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"max_length {cfg.seq_len} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    model.to(device)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"task {cfg.task}: {len(data.train)} train / {len(data.eval)} eval examples ({data.source}); "
        f"model {type(model).__name__} {n_params / 1e6:.1f} M params from {cfg.init}; device {device}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    t0 = time.perf_counter()
    if cfg.task == "squad":
        result, outputs = run_squad(cfg, data, model, tokenizer, device, log)
        predictions, extra = outputs["predictions"], {"nbest_predictions.json": outputs["nbest"]}
    else:
        result, predictions = run_classification(cfg, data, model, tokenizer, device, log)
        extra = {}
    wall = time.perf_counter() - t0

    interrupted = result.get("interrupted")
    metrics = {
        "task": cfg.task,
        "headline_metric": HEADLINE_METRIC[cfg.task],
        "metrics": None if interrupted else result["history"][-1]["eval"],
        "train_loss": result["train_loss"],
        "steps": result["steps"],
        "num_train": len(data.train),
        "num_eval": len(data.eval),
        "train_seconds": result["train_seconds"],
        "wall_seconds": wall,
        "device": str(device),
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
        "history": result["history"],
        "config": dataclasses.asdict(cfg),
    }
    if interrupted:
        metrics |= {"interrupted": interrupted, "exit_code": result["exit_code"]}
    if cfg.save_model and data.label_names is not None:
        model.config.extra = {
            **model.config.extra,
            "id2label": {str(i): name for i, name in enumerate(data.label_names)},
            "label2id": {name: i for i, name in enumerate(data.label_names)},
        }

    def add_tokenizer(folder: Path) -> None:
        tokenizer.save(str(folder / "tokenizer.json"))
        tokenizer.model.save(str(folder))  # vocab.txt

    with atomic_folder(out, OUTPUT_KIND, task=cfg.task) as tmp:
        blobs = {"metrics.json": metrics, **({} if interrupted else {"predictions.json": predictions, **extra})}
        for name, blob in blobs.items():
            (tmp / name).write_text(json.dumps(blob, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            fault_point(f"finetune:{name}-written")
        if cfg.save_model:
            save_pretrained(model, tmp / "model", extra_files=add_tokenizer)
    if interrupted:
        log(f"{cfg.task}: stopped by {interrupted} after {result['steps']} steps; model so far written to {out}")
    else:
        log(f"{cfg.task}: {json.dumps(metrics['metrics'])} ({wall:.1f} s); written to {out}")
    return metrics


def check_output_dir(cfg: FinetuneConfig) -> Path:
    """The output folder, absolute; ValueError (one line) when it may not be written (module docstring)."""
    out = absolute(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(f"--output-dir {out} already holds files (an earlier run?); pass --overwrite to replace "
                             "it, or choose another --output-dir")
        inputs = [p for p in (cfg.data_dir, cfg.train_file, cfg.eval_file, cfg.tokenizer) if p]
        if not cfg.init.startswith("preset:") and cfg.init != "minilm":
            inputs.append(cfg.init)
        refuse_dangerous_target(out, "--output-dir", protected=inputs)
    return out


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """One option per FinetuneConfig field (`--max-length 128`, `--no-save-model`), defaults from it."""
    parser = argparse.ArgumentParser(
        prog="fastbert-finetune",
        description="Fine-tune BERT (MiniLM by default) on a classification, regression or SQuAD task.",
    )
    add_config_arguments(parser, FinetuneConfig, choices={"task": TASKS})
    return parser


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return FinetuneConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))  # exits with status 2
        raise  # unreachable; keeps type checkers content


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        metrics = finetune(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"fastbert-finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started: nothing to write
        print(f"fastbert-finetune: interrupted before training; {cfg.output_dir} is unchanged", file=sys.stderr)
        return 130
    return metrics.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
