"""A corpus read in pieces of bounded size: fastbert-prepare's inputs → document-aligned pieces → documents.

Input formats, by file name:

    *.jsonl   JSON Lines: one document per line, an object with a "text" string (WikiExtractor's `--json` output,
              most dataset exports); any size, read piece by piece
    *.json    one JSON object title → {"title", "extract"} (the embedded Wikipedia lead paragraphs); parsed whole,
              so at most JSON_MAX_MB — a larger corpus goes in as JSON Lines or text
    other     text: one sentence or paragraph per line, a blank line between documents; any size, piece by piece

Pieces. A text or JSON Lines file is cut every `piece_bytes`: piece k of a file is nominally the bytes
[k·B, (k+1)·B), and each cut is moved forward to the next document boundary — the start of the next blank line
(text) or the next line start (JSON Lines). Both pieces that meet at a cut find the same boundary from the file
alone, so a task seeks to its own bytes and reads only those (plus the scan to its end boundary): no process
reads a whole file, and the pieces depend on the file and B only. When no blank line starts within B bytes after
a cut, the document is cut at the first line start after it (counted as `cut_documents`), so a piece never holds
more than about 2·B bytes. The entries of a .json file are grouped into pieces of about B bytes of text.

Caution: a line longer than MAX_LINE_MB is refused (a text file has a sentence or paragraph per line; such a line
is most likely not text), and so are a NUL byte and invalid UTF-8, each naming the file and the byte offset. A
file that changes or disappears while it is read is an error, not a silent mix of two versions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_LINE_MB = 16
JSON_MAX_MB = 64
_MB = 1 << 20

# ---------------------------------------------------------------------------------------------- sentences
# A boundary is sentence-final punctuation (plus closing quotes/brackets), whitespace, then something that can
# start a sentence (capital, digit, opening quote/bracket). The word before the punctuation vetoes the split when
# it is a known abbreviation or a single letter (initials: "Arthur C. Clarke", "U.S. Navy").
_BOUNDARY = re.compile(r"([.!?][\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx ca c no nos vol fig gen col lt sgt capt "
    "gov sen rep rev hon jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co corp bros u.s u.k".split()
)


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences with the rule above; whitespace is normalised, empty pieces dropped.

    Caution: rule-based — a sentence ending in an abbreviation ("... in the U.S. The next") stays joined to the
    next one, and a lowercase sentence start is not a boundary. Good enough for BERT's segment packing, which
    only needs roughly sentence-sized pieces.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1)
        words = text[start:m.start(1)].rsplit(" ", 1)
        last = words[-1].lower().lstrip("\"'“‘([")
        if m.group(1)[0] == "." and (last in _ABBREVIATIONS or len(last) == 1):
            continue
        sentences.append(text[start:end])
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return [s for s in (s.strip() for s in sentences) if s]


# ---------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Piece:
    """One piece of one input file: what a task needs to read it, and nothing of its content."""

    index: int  # position in the whole corpus (shards are named after it)
    path: str
    kind: str  # "text", "jsonl" or "json"
    start: int  # text / jsonl: the nominal byte range [start, end); json: the entry range
    end: int
    nbytes: int  # input bytes it stands for (progress, throughput)
    piece_bytes: int  # the budget B the file was cut with
    file_size: int  # the file as planned: a change while the corpus is read is an error
    file_mtime_ns: int


def input_kind(path: str | os.PathLike) -> str:
    name = str(path)
    return "jsonl" if name.endswith(".jsonl") else "json" if name.endswith(".json") else "text"


def plan_pieces(paths: Sequence[str | os.PathLike], piece_bytes: int) -> list[Piece]:
    """The pieces of the inputs, in order. Reads nothing of a text or JSON Lines file (only its size); a .json file
    is parsed here, and its errors are raised here."""
    if not paths:
        raise ValueError("no input files given")
    pieces: list[Piece] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        st = path.stat()
        if st.st_size == 0:
            raise ValueError(f"input file {path} is empty")
        kind = input_kind(path)
        if kind == "json":
            ranges = _group(list(map(_utf8_len, _json_extracts(path, st.st_size))), piece_bytes)
        else:
            ranges = [(s, min(s + piece_bytes, st.st_size), min(piece_bytes, st.st_size - s))
                      for s in range(0, st.st_size, piece_bytes)]
        pieces += [Piece(len(pieces) + k, str(path), kind, lo, hi, n, piece_bytes, st.st_size, st.st_mtime_ns)
                   for k, (lo, hi, n) in enumerate(ranges)]
    return pieces


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _group(sizes: list[int], budget: int) -> list[tuple[int, int, int]]:
    """Consecutive entries grouped into (first, end, bytes) of about `budget` bytes each."""
    groups, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= budget:
            groups.append((first, i + 1, total))
            first, total = i + 1, 0
    if first < len(sizes) or not groups:
        groups.append((first, len(sizes), total))
    return groups


def read_piece(piece: Piece, stats: dict | None = None) -> Iterator[tuple[list[str], int]]:
    """The documents of one piece, in order: (sentences, input bytes). `stats["cut_documents"]` counts a document
    cut at this piece's end because it ran on past a whole piece (see the module docstring)."""
    _check_unchanged(piece)
    if piece.kind == "json":
        for extract in _json_extracts(Path(piece.path), piece.file_size)[piece.start:piece.end]:
            sentences = split_sentences(extract)
            if sentences:
                yield sentences, _utf8_len(extract)
        return
    with open(piece.path, "rb") as f:
        end, cut = _boundary(f, piece, piece.end)
        pos, _ = _boundary(f, piece, piece.start)
        if stats is not None and pos < end:  # an empty piece's end is counted by the piece before it
            stats["cut_documents"] = stats.get("cut_documents", 0) + int(cut)
        f.seek(pos)
        doc: list[str] = []
        doc_bytes = 0
        while pos < end:
            line = _readline(f, piece, pos)
            text = _decode(line, piece, pos)
            pos += len(line)
            if piece.kind == "jsonl":
                if text.strip():
                    sentences = split_sentences(_jsonl_text(text, piece, pos - len(line)))
                    if sentences:
                        yield sentences, len(line)
            elif text.strip():
                doc.extend(split_sentences(text))
                doc_bytes += len(line)
            elif doc:
                yield doc, doc_bytes + len(line)
                doc, doc_bytes = [], 0
        if doc:
            yield doc, doc_bytes
    _check_unchanged(piece)


def sample_documents(pieces: Sequence[Piece], max_bytes: int, stats: dict) -> Iterator[list[str]]:
    """Documents from every piece, about max_bytes in all: the first max_bytes / len(pieces) bytes of each (whole
    pieces when the corpus is smaller). `stats["bytes"]` and `["documents"]` say how much was read."""
    share = max(1, max_bytes // max(1, len(pieces)))
    stats.update(bytes=0, documents=0)
    for piece in pieces:
        taken = 0
        for sentences, nbytes in read_piece(piece):
            yield sentences
            taken += nbytes
            stats["bytes"] += nbytes
            stats["documents"] += 1
            if taken >= share:
                break


# ---------------------------------------------------------------------------------------------- reading
def _check_unchanged(piece: Piece) -> None:
    try:
        st = os.stat(piece.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"input file {piece.path} vanished while the corpus was being prepared") from None
    if (st.st_size, st.st_mtime_ns) != (piece.file_size, piece.file_mtime_ns):
        raise ValueError(f"input file {piece.path} changed while the corpus was being prepared (its size or "
                         "modification time); run the command again once it is final")


def _boundary(f: IO[bytes], piece: Piece, x: int) -> tuple[int, bool]:
    """Where the document-aligned cut at nominal byte x lies (see the module docstring), and whether it cuts a
    document in two (no blank line within a piece's length, and the cut is not at a document's start)."""
    if x <= 0 or x >= piece.file_size:
        return min(max(x, 0), piece.file_size), False
    f.seek(x - 1)
    if f.read(1) != b"\n":
        _readline(f, piece, x - 1)  # the rest of the line holding x: it belongs before the cut
    first = pos = f.tell()
    if piece.kind == "jsonl":
        return first, False
    while pos < piece.file_size:
        line = _readline(f, piece, pos)
        if not line.strip():
            return pos, False
        pos += len(line)
        if pos >= x + piece.piece_bytes:
            break
    if pos >= piece.file_size:
        return piece.file_size, False
    return first, not _follows_blank_line(f, first)


def _follows_blank_line(f: IO[bytes], pos: int) -> bool:
    """Whether the line before the one starting at `pos` is blank (looking back at most 4 KB)."""
    start = max(0, pos - 4096)
    f.seek(start)
    before = f.read(pos - start)
    return not before[:-1].rsplit(b"\n", 1)[-1].strip()


def _readline(f: IO[bytes], piece: Piece, pos: int) -> bytes:
    line = f.readline(MAX_LINE_MB * _MB + 1)
    if len(line) > MAX_LINE_MB * _MB:
        raise ValueError(f"{piece.path} holds a line longer than {MAX_LINE_MB} MB (around byte {pos}); a text input "
                         "holds one sentence or paragraph per line (JSON Lines: one document per line) — is it text?")
    nul = line.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{piece.path} holds a NUL byte at byte {pos + nul}: not a text file")
    return line


def _decode(line: bytes, piece: Piece, pos: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{piece.path} is not UTF-8 text (invalid byte at {pos + e.start})") from None


def _jsonl_text(line: str, piece: Piece, pos: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{piece.path}: the line at byte {pos} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{piece.path}: the line at byte {pos} is not a JSON object with a 'text' string")
    return obj["text"]


def _json_extracts(path: Path, size: int) -> list[str]:
    """The "extract" of every entry of a JSON object title → {"extract": ...}, in file order."""
    if size > JSON_MAX_MB * _MB:
        raise ValueError(f"{path} is {size / _MB:.0f} MB: a .json object is parsed whole, so at most {JSON_MAX_MB} "
                         'MB; give a larger corpus as JSON Lines (.jsonl, one {"text": ...} per line) or text')
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object title → {{'extract': ...}}, got {type(data).__name__}")
    if not data:
        raise ValueError(f"no documents found in {path}")
    extracts = []
    for title, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise ValueError(f"{path}: entry {title!r} has no 'extract' string")
        extracts.append(entry["extract"])
    return extracts
