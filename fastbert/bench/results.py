"""Rows of results: the CSV layout (one file per family, header written once), speed-ups against the family's
baseline and its best peer, the printed tables, and the row sink through which every family hands over its rows
as soon as they are measured (`report_rows`: the command line appends them to the CSVs at once, so a run killed
part-way keeps every row reported before the kill)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .peers import is_peer
from .timing import BenchEnv

# Families in the order tables print them; a plain `fastbert-bench` runs DEFAULT_FAMILIES (inference is asked
# for by name: it loads whole models, transformers and sentence-transformers; data too: the CPU's loader and
# fastbert-prepare, data.py).
FAMILIES = ("kernels", "attention", "train", "inference", "data")
DEFAULT_FAMILIES = ("kernels", "attention", "train")
CSV_FILES = {"kernels": "kernels.csv", "attention": "attention.csv", "train": "train_step.csv",
             "inference": "inference.csv", "data": "data.csv"}
CSV_COLUMNS = (
    "run_id", "timestamp", "commit", "device", "gpu", "torch", "triton", "transformers",
    "family", "case", "size", "candidate", "mode", "dtype", "shape",
    "ms", "speedup", "baseline", "tflops", "gbps", "pct_ceiling", "seq_per_s", "mfu",
    "peak_GB", "extra_GB", "warm_s", "parity", "ceil_tflops", "ceil_gbps", "note",
)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    family: str
    case: str
    size: str
    candidate: str
    mode: str
    dtype: str
    shape: str
    ms: float | None = None
    speedup: float | None = None
    baseline: str = ""
    tflops: float | None = None
    gbps: float | None = None
    pct_ceiling: float | None = None
    seq_per_s: float | None = None
    mfu: float | None = None
    peak_GB: float | None = None
    extra_GB: float | None = None
    warm_s: float | None = None
    parity: str = ""
    note: str = ""
    # Not CSV columns (the CSV layout is fixed): derived from the rows of the same run, kept for tables and JSON.
    vs_peer: float | None = None  # best peer's time / this candidate's time, same case and mode
    best_peer: str = ""

    def to_dict(self, env: BenchEnv | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if env is not None:
            d.update(run_id=env.run_id, commit=env.commit, device=env.device.type, gpu=env.gpu,
                     ceil_tflops=env.ceil_tflops, ceil_gbps=env.ceil_gbps, **env.versions)
        return d


def append_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Append rows to a CSV with `CSV_COLUMNS`, writing the header only when the file is new. A file whose
    header differs (written by another version) is left alone: the rows go to `<stem>-<columns hash>.csv`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(CSV_COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        with open(path, encoding="utf-8", newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != header:
            path = path.with_name(f"{path.stem}-{abs(hash(tuple(header))) % 10**6:06d}{path.suffix}")
            print(f"warning: {path.name}: existing CSV has other columns; writing to {path}", file=sys.stderr)
            return append_csv(path, rows)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in header})
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def best_peers(rows: Sequence[Row]) -> dict[tuple[str, str, str], tuple[str, float]]:
    """(case, size, mode) → (name, ms) of the fastest peer measured (see `peers.PEERS`)."""
    best: dict[tuple[str, str, str], tuple[str, float]] = {}
    for r in rows:
        if r.ms and is_peer(r.family, r.candidate):
            key = (r.case, r.size, r.mode)
            if key not in best or r.ms < best[key][1]:
                best[key] = (r.candidate, r.ms)
    return best


def finish_rows(rows: list[Row], env: BenchEnv, baseline: str) -> list[Row]:
    """Speed-ups against `baseline` and the best peer (same case and mode), and the fraction of the ceiling."""
    base = {(r.case, r.mode): r.ms for r in rows if r.candidate == baseline and r.ms}
    peer = best_peers(rows)
    for r in rows:
        b = base.get((r.case, r.mode))
        if r.ms and b:
            r.speedup, r.baseline = b / r.ms, baseline
        bp = peer.get((r.case, r.size, r.mode))
        if r.ms and bp:
            r.best_peer, r.vs_peer = bp[0], bp[1] / r.ms
        if r.family in ("train", "data"):  # the training step's is its MFU column; text per second is no copy
            continue
        if r.tflops is not None and env.ceil_tflops:
            r.pct_ceiling = 100.0 * r.tflops / env.ceil_tflops
        elif r.gbps is not None and env.ceil_gbps:
            r.pct_ceiling = 100.0 * r.gbps / env.ceil_gbps
    return rows


# ---------------------------------------------------------------------------------------------- the row sink

_SINKS: list[Callable[[list[Row]], None]] = []


@contextlib.contextmanager
def row_sink(sink: Callable[[list[Row]], None]) -> Iterator[None]:
    """While active, every `report_rows` call hands its rows to `sink` at once (the command line appends them to
    the CSVs and rewrites its JSON there)."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def report_rows(rows: list[Row], env: BenchEnv, baseline: str) -> list[Row]:
    """`finish_rows`, then the rows handed to the active sinks: what a family calls as soon as a group of rows is
    complete and will not change (a case's skipped candidates, one mode of a case, one training case). The group
    must hold the baseline's row of each of its (case, mode) for the speed-ups. Returns `rows`."""
    finish_rows(rows, env, baseline)
    for sink in _SINKS if rows else ():
        sink(rows)
    return rows


def write_csvs(rows: Sequence[Row], env: BenchEnv, csv_dir: str | os.PathLike) -> list[Path]:
    written = []
    for fam, fname in CSV_FILES.items():
        fam_rows = [r.to_dict(env) for r in rows if r.family == fam]
        if fam_rows:
            written.append(append_csv(Path(csv_dir) / fname, fam_rows))
    return written


# ---------------------------------------------------------------------------------------------- table


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _short_shape(shape: str) -> str:
    """The sizes of a shape string, without the dropout / padding words (those are in the header)."""
    return " ".join(w for w in shape.split() if "=" in w and not w.startswith("p="))


def format_table(rows: Sequence[Row], env: BenchEnv) -> str:
    """One readable table per family; skipped candidates and errors listed under each."""
    cols = ("case", "candidate", "mode", "ms", "x base", "x peer", "TFLOP/s", "GB/s", "%ceil", "seq/s", "MFU",
            "peak GB", "warm s", "check")
    out = []
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r.family == fam]
        if not fam_rows:
            continue
        measured = [r for r in fam_rows if r.ms is not None]
        base = next((r.baseline for r in measured if r.baseline), "")
        out.append(f"\n== {fam} ({env.gpu}, {measured[0].dtype if measured else '-'})"
                   + (f"; x base = {base} time / candidate time" if base else "")
                   + ("; x peer = best peer's time / candidate time (best peer: "
                      + ", ".join(sorted({r.best_peer for r in measured if r.best_peer})) + ")"
                      if any(r.best_peer for r in measured) else ""))
        table = [cols]
        for r in measured:
            table.append((
                r.case if fam in ("train", "inference") else f"{r.case} {r.size} {_short_shape(r.shape)}",
                r.candidate, r.mode,
                _fmt(r.ms, ".3f"), _fmt(r.speedup, ".2f"), _fmt(r.vs_peer, ".2f"), _fmt(r.tflops, ".3g"),
                _fmt(r.gbps, ".3g"),
                _fmt(r.pct_ceiling, ".1f"), _fmt(r.seq_per_s, ".1f"),
                _fmt(None if r.mfu is None else 100 * r.mfu, ".1f"), _fmt(r.peak_GB, ".2f"),
                _fmt(r.warm_s, ".2f"), r.parity))
        widths = [max(len(str(t[i])) for t in table) for i in range(len(cols))]
        for t in table:
            out.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(t, widths, strict=True))).rstrip())
        measured_notes = sorted({f"{r.candidate}: {r.note}" for r in measured if r.note})
        if measured_notes:
            out.append("  notes:")
            out += [f"    {n}" for n in measured_notes]
        notes = sorted({f"{r.candidate}: {r.note}" for r in fam_rows if r.ms is None and r.note})
        if notes:
            out.append("  not measured:")
            out += [f"    {n}" for n in notes]
    return "\n".join(out)

