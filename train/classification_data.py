"""The embedded classification tasks: Rotten Tomatoes snippets (fresh / rotten) and BBC news (5 topics).

Both are read from the offline data packages (see fastbert/resources.py) and split deterministically: the
examples are shuffled with a seeded numpy generator, the first `test_size` become the test set and the next
`train_size` the training set, so changing the training size never changes the test set.
"""

from __future__ import annotations

import bz2
import csv
import os
from pathlib import Path

import numpy as np

from .glue import TextExample

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # rotten = 0, fresh = 1
# 3,000 / 1,000: the split the done-when figure and the transformers baseline (0.793) were measured on.
ROTTEN_TOMATOES_SIZES = (3000, 1000)
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")
BBC_NEWS_SIZES = (1780, 445)  # 80 / 20 of the 2,225 articles


def read_rotten_tomatoes(path: str | os.PathLike) -> list[TextExample]:
    """All fresh / rotten snippets of the (optionally bz2-compressed) CSV; `plot` rows are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rotten_tomatoes: file not found: {path}")
    # utf-8-sig: a leading byte-order mark is dropped (else the first column would be named "\ufeffcategory").
    raw = bz2.open(path, "rt", encoding="utf-8-sig", newline="") if path.suffix == ".bz2" else open(
        path, encoding="utf-8-sig", newline=""
    )
    with raw as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            rows = list(reader)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
        except (OSError, EOFError, csv.Error) as e:  # OSError: not a bz2 stream
            raise ValueError(f"{path}: cannot be read as CSV: {e}") from None
    if not header:
        raise ValueError(f"{path}: empty file")
    missing = [c for c in ("category", "text") if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
    label_ids = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    examples = []
    for lineno, row in enumerate(rows, start=2):
        category = row["category"]
        if category == "plot":
            continue
        if category not in label_ids:
            raise ValueError(f"{path}: row {lineno}: category {category!r} is not fresh, rotten or plot")
        examples.append(TextExample(" ".join((row["text"] or "").split()), None, label_ids[category]))
    if not examples:
        raise ValueError(f"{path}: no fresh / rotten rows")
    return examples


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is in Windows-1252
        return data.decode("cp1252", errors="replace")


def read_bbc_news(folder: str | os.PathLike) -> list[TextExample]:
    """Every article of the five topic subfolders; the text is the headline and body, whitespace collapsed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"bbc_news: folder not found: {folder}")
    missing = [name for name in BBC_NEWS_LABELS if not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"{folder}: missing topic folder(s) {missing}")
    examples = []
    for label, name in enumerate(BBC_NEWS_LABELS):
        for path in sorted((folder / name).glob("*.txt")):
            examples.append(TextExample(" ".join(_read_text(path).split()), None, label))
    return examples


def seeded_split(
    examples: list[TextExample], train_size: int, test_size: int, seed: int
) -> tuple[list[TextExample], list[TextExample]]:
    """(train, test) drawn without overlap from a seeded shuffle; test first (see the module docstring)."""
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    if train_size + test_size > len(examples):
        raise ValueError(
            f"train_size + test_size = {train_size + test_size} exceeds the {len(examples)} examples available"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    test = [examples[i] for i in order[:test_size]]
    train = [examples[i] for i in order[test_size : test_size + train_size]]
    return train, test


def embedded_task_split(
    task: str, train_size: int | None, test_size: int | None, seed: int, source: str | os.PathLike | None = None
) -> tuple[list[TextExample], list[TextExample], tuple[str, ...]]:
    """(train, test, label names) of `rotten_tomatoes` or `bbc_news`; sizes None = the task's default;
    `source` overrides the file / folder found in the installed data package."""
    from fastbert import resources

    if task == "rotten_tomatoes":
        examples = read_rotten_tomatoes(source or resources.rotten_tomatoes_path())
        sizes, labels = ROTTEN_TOMATOES_SIZES, ROTTEN_TOMATOES_LABELS
    elif task == "bbc_news":
        examples = read_bbc_news(source or resources.bbc_news_path())
        sizes, labels = BBC_NEWS_SIZES, BBC_NEWS_LABELS
    else:
        raise ValueError(f"unknown embedded task {task!r}; choose rotten_tomatoes or bbc_news")
    train, test = seeded_split(
        examples, train_size if train_size is not None else sizes[0], test_size if test_size is not None else sizes[1],
        seed,
    )
    return train, test, labels


__all__ = [
    "ROTTEN_TOMATOES_LABELS",
    "BBC_NEWS_LABELS",
    "read_rotten_tomatoes",
    "read_bbc_news",
    "seeded_split",
    "embedded_task_split",
]
