"""GLUE tasks: the TSV readers (one column layout per task) and the metric each task is scored with.

The files are those of the public GLUE distribution (`<TASK>/train.tsv`, `dev.tsv`; MNLI `dev_matched.tsv`).
They are tab-separated with no quoting (sentences contain bare `"` characters), so lines are split on tabs,
never parsed as CSV. Every task but CoLA has a header row, and its columns are found by name; CoLA has none
and is read by position (source, label, original mark, sentence).

Files are UTF-8 (a byte-order mark is accepted); a score that is NaN or infinite is refused with its file and
line. Metrics are computed with numpy only: accuracy; F1 of the positive class (MRPC, QQP); Matthews correlation
(CoLA); Pearson and Spearman correlation (STS-B, a regression task, never scored as classification). A metric
that is undefined (no examples, a constant prediction or label for a correlation, no positive anywhere for F1)
is NaN, never 0.

Caution: `test.tsv` files carry no labels and cannot be read for training or scoring here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_a: str | int  # header name, or column index for header-less files (CoLA)
    text_b: str | int | None  # None = single-sentence task
    label: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None = regression (float score)
    metric: str  # the headline metric of the task
    has_header: bool = True
    dev_file: str = "dev.tsv"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", text_a=3, text_b=None, label=1, labels=("0", "1"), metric="matthews_corr",
                     has_header=False),
    "sst2": GlueTask("sst2", "sentence", None, "label", ("0", "1"), "accuracy"),
    "mrpc": GlueTask("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), "f1"),
    "qqp": GlueTask("qqp", "question1", "question2", "is_duplicate", ("0", "1"), "f1"),
    "stsb": GlueTask("stsb", "sentence1", "sentence2", "score", None, "pearson"),
    "mnli": GlueTask("mnli", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                     "accuracy", dev_file="dev_matched.tsv"),
    "qnli": GlueTask("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueTask("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy"),
    "wnli": GlueTask("wnli", "sentence1", "sentence2", "label", ("0", "1"), "accuracy"),
}


@dataclass
class TextExample:
    """One classification / regression example: text (and its pair), label id or float score."""

    text_a: str
    text_b: str | None
    label: int | float


def glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[name]


def read_glue_tsv(path: str | os.PathLike, task: str | GlueTask) -> list[TextExample]:
    """Read one labelled GLUE TSV file of `task`. Raises ValueError (with the file and line number) on a
    missing column, a short row, an unknown label or an empty file."""
    spec = glue_task(task) if isinstance(task, str) else task
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name}: file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading byte-order mark is dropped
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert the file to UTF-8") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty file")

    columns = [spec.text_a, spec.text_b, spec.label]
    if spec.has_header:
        header = lines[0].split("\t")
        missing = [c for c in columns if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} for task {spec.name}; header is {header}")
        index = [header.index(c) if c is not None else None for c in columns]
        rows, first_line = lines[1:], 2
    else:
        index, rows, first_line = columns, lines, 1
    if not rows:
        raise ValueError(f"{path}: no examples (only a header)")
    ia, ib, il = index
    need = max(i for i in index if i is not None) + 1
    label_ids = {s: i for i, s in enumerate(spec.labels)} if spec.labels is not None else None

    examples = []
    for lineno, line in enumerate(rows, start=first_line):
        fields = line.split("\t")
        if len(fields) < need:
            raise ValueError(
                f"{path}:{lineno}: {len(fields)} tab-separated field(s), task {spec.name} needs at least {need}"
            )
        raw = fields[il].strip()
        if label_ids is None:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {raw!r} is not a number") from None
            if not math.isfinite(label):
                raise ValueError(f"{path}:{lineno}: score {raw!r} is not a finite number")
        elif raw in label_ids:
            label = label_ids[raw]
        else:
            raise ValueError(f"{path}:{lineno}: label {raw!r} is not one of {list(spec.labels)}")
        examples.append(TextExample(fields[ia], fields[ib] if ib is not None else None, label))
    return examples


def glue_files(task: str, data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(train file, dev file) of a GLUE task folder."""
    spec = glue_task(task)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{task}: data folder not found: {data_dir}")
    return data_dir / "train.tsv", data_dir / spec.dev_file


# ---------------------------------------------------------------------------------------------- metrics
def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction right; NaN with no examples."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if labels.size else math.nan


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0 when there are positives but no true positive, NaN when neither
    the predictions nor the labels hold a positive (undefined)."""
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp = int((preds & labels).sum())
    fp = int((preds & ~labels).sum())
    fn = int((~preds & labels).sum())
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan


def matthews_corr(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two binary labelings; NaN when either is constant (undefined)."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, tn = float((p & y).sum()), float((~p & ~y).sum())
    fp, fn = float((p & ~y).sum()), float((~p & y).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom > 0 else math.nan


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when it is undefined (fewer than 2 values, a constant side, a NaN value)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else math.nan


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span (as `scipy.stats.rankdata`)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Group boundaries of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation; NaN when undefined (as `pearson`, a NaN value included)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def classification_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics a task is scored with. `preds` are label ids, or float scores for a regression task (STS-B,
    under any spelling of its name: `stsb`, `STS-B`, `sts_b`); label ids that are not integers are refused."""
    key = task.lower().replace("-", "").replace("_", "")
    if key in GLUE_TASKS and GLUE_TASKS[key].is_regression:
        p, s = pearson(preds, labels), spearman(preds, labels)
        return {"pearson": p, "spearman": s, "corr": (p + s) / 2}
    for name, values in (("preds", preds), ("labels", labels)):
        values = np.asarray(values)
        if values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.round(values)).all()):
            raise ValueError(f"{task} is scored as classification but {name} holds non-integer values "
                             "(a regression task's scores?)")
    out = {"accuracy": accuracy(preds, labels)}
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(preds, labels)
    if task == "cola":
        out["matthews_corr"] = matthews_corr(preds, labels)
    return out
