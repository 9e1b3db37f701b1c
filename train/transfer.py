"""Does pretraining help fine-tuning? `make demo-transfer` / `python -m train.transfer`.

    python -m train.transfer                                  # pretrain (wiki + in-domain text), then compare
    python -m train.transfer --pretrain-steps 4000            # a larger pretraining budget
    python -m train.transfer --pretrained runs/pretrain-tiny/model      # compare an existing checkpoint
    python -m train.transfer --pretrain-steps 18000 --curve-every 3000  # the curve: every 3,000th step's checkpoint

Fine-tunes a pretrained checkpoint and the same architecture from random initialisation on the embedded Rotten
Tomatoes task (3,000 train / 1,000 test snippets, the split of `fastbert-finetune`) with the same settings and
the same seeds, and prints both test accuracies per seed, their means and the gain.

Without `--pretrained`, the checkpoint is pretrained here first with the `--demo` settings of fastbert-pretrain
(tiny model, 64 tokens, AdamW, lr 2e-3) for `pretrain_steps` steps on in-domain unlabelled text, as
domain-adaptive pretraining does (`domain_documents`; `--wiki` adds the embedded Wikipedia): the Rotten
Tomatoes `plot` snippets (a document each) and the review snippets outside the task's train and test splits,
grouped by movie into documents (one review a line), with a WordPiece vocabulary trained on that text. A review
whose text equals any train or test snippet is left out as well, so no text the model is fine-tuned or tested
on is pretrained on.

With `--curve-every N` the pretraining keeps a checkpoint every N steps and each one is fine-tuned (the
pretrained model only; one random-init baseline serves them all, as they share the architecture and the
vocabulary): test accuracy against pretraining steps and CPU time, one run with one learning-rate schedule (the
earlier checkpoints are taken mid-schedule, at a higher learning rate than a run of that length would end at).

Output: <out_dir>/transfer.json (per-seed accuracies, means, settings; with a curve, one row per checkpoint) and
the pretraining run in <out_dir>/pretrain-<steps>; a second run into the same out_dir replaces what the first
wrote there (and refuses a folder it did not write). Every job runs on `threads` CPU threads (1 by default: the
tiny model gains little from more, and the runs are deterministic for their seeds).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .classification_data import ROTTEN_TOMATOES_SIZES, embedded_task_split
from .cli import add_config_arguments


@dataclass
class TransferConfig:
    pretrained: str | None = None  # a model folder to compare; None = pretrain one here first
    out_dir: str = "runs/transfer"
    # pretraining (only without --pretrained): the --demo settings of fastbert-pretrain with these changes
    pretrain_steps: int = 1000  # optimizer steps of 32 sequences of <= 64 tokens (~0.16 CPU-s each)
    warmup_steps: int = 100
    lr: float = 2e-3  # peak pretraining lr
    vocab_size: int = 4096  # WordPiece vocabulary trained on the pretraining corpus
    wiki: bool = False  # add the embedded Wikipedia lead paragraphs to the in-domain text
    dupe_factor: int = 5  # packing passes over the pretraining corpus
    # fine-tuning, identical for both models
    seeds: int = 3  # fine-tuning seeds 0 .. seeds-1
    epochs: int = 3
    ft_lr: float = 3e-4
    ft_dropout: float | None = None  # hidden and attention dropout while fine-tuning; None = the checkpoint's
    batch_size: int = 32
    max_length: int = 64
    data_seed: int = 0  # the Rotten Tomatoes train / test split (fastbert-finetune's default)
    train_size: int | None = None  # None: the task's 3,000 train snippets (smaller only for smoke runs)
    test_size: int | None = None  # None: the task's 1,000 test snippets
    threads: int = 1  # torch CPU threads for every job (0 = torch's default)
    only: str = "both"  # the fine-tunings to run: both, pretrained or random_init (a curve reuses one baseline)
    curve_every: int = 0  # > 0: checkpoint every N pretraining steps and fine-tune each checkpoint (a curve)
    reinit_pooler: bool = True  # start the pretrained model's pooler afresh (it is trained by NSP alone, which a
    #                             short pretraining leaves at the majority label), like the random-init one's

    def validate(self) -> None:
        for name in ("pretrain_steps", "seeds", "epochs", "batch_size", "vocab_size", "dupe_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.pretrain_steps:
            raise ValueError(f"warmup_steps must be in [0, pretrain_steps], got {self.warmup_steps}")
        if not (self.lr > 0 and self.ft_lr > 0):
            raise ValueError(f"lr and ft_lr must be > 0, got {self.lr} and {self.ft_lr}")
        if self.curve_every < 0:
            raise ValueError(f"curve_every must be >= 0, got {self.curve_every}")
        if self.curve_every and self.pretrained is not None:
            raise ValueError("curve_every needs a pretraining here: give it without --pretrained")
        if self.curve_every and self.only != "both":
            raise ValueError("curve_every fine-tunes every checkpoint and one random-init baseline: leave only=both")
        if self.only not in ("both", "pretrained", "random_init"):
            raise ValueError(f"only must be both, pretrained or random_init, got {self.only!r}")
        if self.ft_dropout is not None and not 0.0 <= self.ft_dropout < 1.0:
            raise ValueError(f"ft_dropout must be in [0, 1), got {self.ft_dropout}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            raise FileNotFoundError(f"pretrained model folder not found: {self.pretrained}")


# ---------------------------------------------------------------------------------------------- in-domain text
def _rotten_tomatoes_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") if str(path).endswith(".bz2") else open(
        path, encoding="utf-8", newline=""
    ) as f:
        return list(csv.DictReader(f))


def domain_documents(source: str | os.PathLike | None = None, data_seed: int = 0,
                     sizes: tuple[int, int] = ROTTEN_TOMATOES_SIZES) -> tuple[list[list[str]], dict[str, int]]:
    """In-domain pretraining documents (lines of text) from the Rotten Tomatoes file, and counts.

    Plot snippets: one document each (its paragraphs as lines). Reviews: those outside the fine-tuning task's
    train and test splits (the split `embedded_task_split` makes with `data_seed` and `sizes`) and whose text
    equals no train or test snippet, grouped by movie (a review a line)."""
    from fastbert import resources

    path = source or resources.rotten_tomatoes_path()
    train, test, _ = embedded_task_split("rotten_tomatoes", sizes[0], sizes[1], data_seed, source=path)
    excluded = {ex.text_a for ex in (*train, *test)}
    plots: list[list[str]] = []
    by_movie: dict[str, list[str]] = {}
    n_reviews = n_left_out = 0
    for row in _rotten_tomatoes_rows(path):
        if row["category"] == "plot":
            lines = [" ".join(p.split()) for p in (row["text"] or "").splitlines()]
            if any(lines):
                plots.append([p for p in lines if p])
            continue
        text = " ".join((row["text"] or "").split())
        n_reviews += 1
        if text in excluded or not text:
            n_left_out += 1
            continue
        by_movie.setdefault(row.get("movie_name") or "", []).append(text)
    docs = plots + list(by_movie.values())
    counts = {"plot_documents": len(plots), "review_documents": len(by_movie), "reviews": n_reviews,
              "reviews_used": n_reviews - n_left_out, "reviews_left_out": n_left_out}
    return docs, counts


def write_documents(docs: list[list[str]], path: Path) -> None:
    """One line per sentence or snippet, a blank line between documents (fastbert-prepare's text format)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- jobs
def pretrain_checkpoint(cfg: TransferConfig, out_dir: Path, log=print) -> Path:
    """Prepare the pretraining corpus and pretrain; returns the run folder (its final model in model/, with
    `curve_every` its checkpoints in checkpoints/)."""
    from .prepare import PrepareConfig, is_prepared, prepare
    from .pretrain import RUN_MARKER, PretrainConfig, pretrain

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = (cfg.train_size or ROTTEN_TOMATOES_SIZES[0], cfg.test_size or ROTTEN_TOMATOES_SIZES[1])
    docs, counts = domain_documents(data_seed=cfg.data_seed, sizes=sizes)
    log(f"in-domain text: {counts['plot_documents']} plot snippets, {counts['reviews_used']} of "
        f"{counts['reviews']} reviews in {counts['review_documents']} movie documents "
        f"({counts['reviews_left_out']} left out: in the fine-tuning train / test splits)")
    domain = out_dir / "rotten_tomatoes_domain.txt"
    write_documents(docs, domain)
    inputs = [str(domain)]
    if cfg.wiki:
        from fastbert.resources import wiki_corpus_path

        inputs.insert(0, str(wiki_corpus_path()))
    data_dir = out_dir / f"data-T64-v{cfg.vocab_size}-dupe{cfg.dupe_factor}{'-wiki' if cfg.wiki else ''}"
    if not is_prepared(data_dir):
        prepare(PrepareConfig(out_dir=str(data_dir), inputs=tuple(inputs), vocab_size=cfg.vocab_size,
                              max_seq_len=64, dupe_factor=cfg.dupe_factor, seed=cfg.data_seed), log=log)
    run_dir = out_dir / f"pretrain-{cfg.pretrain_steps}"
    # A run this command made before is replaced (a second `make demo-transfer` starts afresh); anything else in
    # that folder makes fastbert-pretrain refuse, naming it.
    overwrite = (run_dir / RUN_MARKER).is_file()
    pcfg = PretrainConfig.from_preset(
        "tiny", demo=True, data_dir=str(data_dir), out_dir=str(run_dir),
        max_steps=cfg.pretrain_steps, warmup_steps=cfg.warmup_steps, lr=cfg.lr, cpu_threads=cfg.threads,
        eval_every=cfg.curve_every, checkpoint_every=cfg.curve_every, keep_checkpoints=0,
        log_every=max(25, cfg.pretrain_steps // 20), progress=False, overwrite=overwrite,
    )
    pretrain(pcfg)
    return pcfg.run_dir


def finetune_both(cfg: TransferConfig, folder: Path, out_dir: Path, log=print) -> dict:
    """Fine-tune `folder` and a random-init model of its architecture for each seed; the summary dict."""
    from fastbert._atomic import manifest_kind
    from fastbert.config import BertConfig
    from fastbert.models import BertForSequenceClassification  # the class finetune() expects (fused when asked)

    from .finetune import OUTPUT_KIND, FinetuneConfig, finetune, load_tokenizer

    # The plain PyTorch reference (every fusion off): these jobs run on the CPU.
    arch = BertConfig.from_json_file(folder / "config.json").replace(num_labels=2).with_fusions(False)
    changes = {} if cfg.ft_dropout is None else dict(hidden_dropout_prob=cfg.ft_dropout,
                                                     attention_probs_dropout_prob=cfg.ft_dropout)
    tokenizer = load_tokenizer(folder)
    runs: dict[str, list[float]] = {k: [] for k in ("pretrained", "random_init") if cfg.only in ("both", k)}
    for seed in range(cfg.seeds):
        for kind in runs:
            ft_dir = out_dir / f"ft-{kind}-seed{seed}"
            fcfg = FinetuneConfig(
                task="rotten_tomatoes", init=str(folder), epochs=cfg.epochs, lr=cfg.ft_lr,
                batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed, data_seed=cfg.data_seed,
                train_size=cfg.train_size, test_size=cfg.test_size,
                output_dir=str(ft_dir), save_model=False, eval_every_epoch=False, device="cpu",
                overwrite=manifest_kind(ft_dir) == OUTPUT_KIND,  # this command's earlier output: replaced
            )
            torch.manual_seed(seed)
            if kind == "random_init":
                model = BertForSequenceClassification(arch.replace(**changes))
            else:
                model = BertForSequenceClassification.from_pretrained(folder, config=arch.replace(**changes))
                if cfg.reinit_pooler:
                    model.bert.pooler.apply(model._init_module)
            t0 = time.perf_counter()
            metrics = finetune(fcfg, model=model, tokenizer=tokenizer, log=lambda m: None)
            acc = float(metrics["metrics"]["accuracy"])
            runs[kind].append(acc)
            log(f"seed {seed} {kind:<11s} test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    _, test, _ = embedded_task_split("rotten_tomatoes", cfg.train_size, cfg.test_size, cfg.data_seed)
    summary: dict = {"majority_class_acc": float(np.bincount([ex.label for ex in test]).max() / len(test))}
    for kind, accs in runs.items():
        summary[f"{kind}_acc"], summary[f"{kind}_mean"] = accs, float(np.mean(accs))
    if len(runs) == 2:
        summary["gain_points"] = 100 * (summary["pretrained_mean"] - summary["random_init_mean"])
    return summary


def finetune_curve(cfg: TransferConfig, run_dir: Path, out_dir: Path, pretrain_cpu_s: float, log=print) -> dict:
    """Fine-tune every checkpoint of the pretraining run in `run_dir` (pretrained only) and, once, the random-init
    model of their architecture; the summary dict with a `curve` row per checkpoint. A checkpoint's CPU time is
    the run's, pro rata by step (the steps cost the same; data preparation is counted in full in every row)."""
    from dataclasses import replace

    from .checkpointing import list_checkpoints, read_trainer_state

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: nothing to fine-tune for the curve")
    baseline = finetune_both(replace(cfg, only="random_init"), ckpts[-1] / "model", out_dir / "random_init", log)
    rows = []
    for ckpt in ckpts:
        step = read_trainer_state(ckpt)["step"]
        log(f"checkpoint at step {step}:")
        got = finetune_both(replace(cfg, only="pretrained"), ckpt / "model", out_dir / f"step{step}", log)
        rows.append({"step": step, "pretrain_cpu_s": pretrain_cpu_s * step / cfg.pretrain_steps,
                     "pretrained_acc": got["pretrained_acc"], "pretrained_mean": got["pretrained_mean"],
                     "gain_points": 100 * (got["pretrained_mean"] - baseline["random_init_mean"])})
    return {**baseline, "curve": rows, "pretrained_mean": rows[-1]["pretrained_mean"],
            "pretrained_acc": rows[-1]["pretrained_acc"], "gain_points": rows[-1]["gain_points"]}


def model_folder(path: Path) -> Path:
    """The model folder `path` stands for: a pretraining run folder (its config.json is the run's options) gives
    its final model, `model/`; a model folder is itself."""
    return path / "model" if (path / "model" / "config.json").is_file() else path


def transfer(cfg: TransferConfig, log=print) -> dict:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    folder = model_folder(Path(cfg.pretrained) if cfg.pretrained else pretrain_checkpoint(cfg, out_dir, log))
    pretrain_cpu_s = time.process_time() - t0
    if cfg.curve_every:
        summary = finetune_curve(cfg, folder.parent, out_dir, pretrain_cpu_s, log)
    else:
        summary = finetune_both(cfg, folder, out_dir, log)
    summary.update(model=str(folder), config=asdict(cfg))
    if not cfg.pretrained:
        summary["pretrain_cpu_s"] = pretrain_cpu_s
    tmp = out_dir / f".tmp-transfer-{os.getpid()}.json"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "transfer.json")
    head = f"Rotten Tomatoes test accuracy, mean of {cfg.seeds} fine-tuning seeds ({cfg.epochs} epochs, lr {cfg.ft_lr})"
    if cfg.curve_every:
        log(f"{head}; random init {summary['random_init_mean']:.4f} (majority class "
            f"{summary['majority_class_acc']:.3f}):")
        for row in summary["curve"]:
            log(f"  pretrained {row['step']:>6d} steps ({row['pretrain_cpu_s'] / 60:5.1f} CPU-min): "
                f"{row['pretrained_mean']:.4f} ({row['gain_points']:+.1f} points)")
        return summary
    shown = ", ".join(f"{k.replace('_', ' ')} {summary[f'{k}_mean']:.4f}" for k in ("pretrained", "random_init")
                      if f"{k}_mean" in summary)
    gain = f": {summary['gain_points']:+.1f} points from pretraining" if "gain_points" in summary else ""
    log(f"{head}: {shown}{gain} (majority class {summary['majority_class_acc']:.3f})")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.transfer", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, TransferConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = TransferConfig(**vars(build_parser().parse_args(argv)))
    try:
        transfer(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"transfer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
