"""Reading a corpus in pieces (train/pieces.py): the pieces partition every input exactly, whatever their size; a
piece reads only its own bytes; bad input (binary, empty, a 50 MB line, a file that vanishes mid-run) is a clear
error that leaves no output behind; progress lines when the output is not a terminal."""

from __future__ import annotations

import json
import random

import pytest

from fastbert._atomic import set_fault_hook
from tests.helpers import require
from tests.train.prepared_data import write_corpus, write_vocab
from train import pieces as pc
from train import prepare as prep


def messy_text(seed: int = 0) -> str:
    """Documents of 1-5 lines between runs of blank or whitespace-only lines, some CRLF, no final newline."""
    rng = random.Random(seed)
    blocks = []
    for k in range(40):
        lines = [f"Doc {k} line {j} says w{rng.randrange(9)}. And more{'!' * rng.randrange(2)}"
                 for j in range(rng.randint(1, 5))]
        blocks.append("\n".join(line + ("\r" if rng.random() < 0.2 else "") for line in lines))
    seps = ["\n\n", "\n\n\n", "\n \t\n", "\n\r\n"]
    return "\n\n" + "".join(b + rng.choice(seps) for b in blocks[:-1]) + blocks[-1]


def read_all(path, piece_bytes):
    stats: dict = {}
    docs = [d for piece in pc.plan_pieces([path], piece_bytes) for d, _ in pc.read_piece(piece, stats)]
    return docs, stats.get("cut_documents", 0)


def test_text_pieces_partition_the_file_at_any_size(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(messy_text().encode())
    whole, cut = read_all(path, 1 << 20)
    assert len(whole) == 40 and cut == 0 and whole[3][0].startswith("Doc 3 line 0")
    longest = max(len("\n".join(d)) for d in whole) + 10
    for size in (1, 2, 3, 7, 16, 61, 100, 257, longest, 1000, path.stat().st_size - 1):
        docs, cut = read_all(path, size)
        assert [s for d in docs for s in d] == [s for d in whole for s in d], size  # every sentence once, in order
        assert len(docs) == len(whole) + cut, size  # a document cut at a piece boundary counts as two
        if size >= longest:
            assert docs == whole and cut == 0, size


def test_json_lines_and_json_pieces_partition_the_file(tmp_path):
    texts = [f"Entry {k} is about w{k}. It has {k % 3 + 1} parts." for k in range(30)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "k": k}) for k, t in enumerate(texts)) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({f"T{k}": {"title": f"T{k}", "extract": t}
                                                 for k, t in enumerate(texts)}))
    expected = [pc.split_sentences(t) for t in texts]
    for size in (1, 10, 97, 500, 1 << 20):
        assert read_all(tmp_path / "c.jsonl", size) == (expected, 0), size
        assert read_all(tmp_path / "c.json", size) == (expected, 0), size
    assert len(pc.plan_pieces([tmp_path / "c.json"], 97)) == 10  # 3 entries of ~38 bytes reach 97


class CountingFile:
    """A binary file that counts the bytes read through it."""

    def __init__(self, f, counter: list[int]):
        self.f, self.counter = f, counter

    def read(self, n=-1):
        data = self.f.read(n)
        self.counter[0] += len(data)
        return data

    def readline(self, n=-1):
        return self.read_counted(self.f.readline(n))

    def read_counted(self, data):
        self.counter[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_piece_reads_only_its_own_bytes(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    write_corpus(path, 2000)  # ~0.6 MB
    counter = [0]
    monkeypatch.setattr(pc, "open", lambda p, mode: CountingFile(open(p, mode), counter), raising=False)
    pieces = pc.plan_pieces([path], 16 << 10)
    assert len(pieces) > 30
    docs = list(pc.read_piece(pieces[len(pieces) // 2]))
    assert docs and counter[0] < 3 * (16 << 10), counter[0]  # its 16 KB and the scans to its boundaries


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def setup(tmp_path):
    write_vocab(tmp_path / "vocab.txt", 200)
    write_corpus(tmp_path / "good.txt", 200)

    def run(*inputs, **kw):
        cfg = prep.PrepareConfig(out_dir=str(tmp_path / "out"), inputs=tuple(map(str, inputs)),
                                 vocab=str(tmp_path / "vocab.txt"), max_seq_len=32, dupe_factor=1, workers=1, **kw)
        return prep.prepare(cfg, log=lambda m: None)

    return tmp_path, run


def leftovers(folder):
    """What a failed run left beside its output: no output, no temporary folder; its work folder (kept for the
    next run by design) is listed apart."""
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out")))
    return [n for n in names if not n.startswith(".out.work-")], [n for n in names if n.startswith(".out.work-")]


def test_binary_and_non_utf8_files_are_refused(setup):
    tmp_path, run = setup
    (tmp_path / "blob.txt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)) + b"\0")
    with pytest.raises(ValueError, match=r"blob.txt (holds a NUL byte at byte \d+: not a text file|is not UTF-8)"):
        run(tmp_path / "blob.txt")
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n\nNa\u00efve.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(invalid byte at 3\)"):
        run(tmp_path / "good.txt", tmp_path / "latin1.txt")
    (tmp_path / "zeros.bin").write_bytes(b"\0" * 1000)  # valid UTF-8, but not text
    with pytest.raises(ValueError, match="zeros.bin holds a NUL byte at byte 0"):
        run(tmp_path / "zeros.bin")
    assert leftovers(tmp_path)[0] == []


def test_empty_inputs_are_refused(setup):
    tmp_path, run = setup
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="input file .*empty.txt is empty"):
        run(tmp_path / "good.txt", tmp_path / "empty.txt")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="input file .*blank.jsonl is empty"):
        run(tmp_path / "good.txt", tmp_path / "blank.jsonl")
    assert leftovers(tmp_path)[0] == []


def test_a_50_mb_line_with_no_newline_is_refused_without_reading_it_whole(setup):
    tmp_path, run = setup
    with open(tmp_path / "one-line.txt", "wb") as f:
        for _ in range(50):
            f.write(b"word " * (1 << 18))  # 50 × 1.25 MB, no newline anywhere
    with pytest.raises(ValueError, match=r"one-line.txt holds a line longer than 16 MB \(around byte \d+\)"):
        run(tmp_path / "good.txt", tmp_path / "one-line.txt")
    assert leftovers(tmp_path)[0] == []


def test_a_file_that_vanishes_mid_run_is_an_error_then_the_run_goes_on(setup):
    """The second input disappears after the first piece is done: a clear error, no output; the finished piece
    stays in the work folder, and once the file is back the same command finishes without redoing it."""
    tmp_path, run = setup
    write_corpus(tmp_path / "second.txt", 60, seed=1)
    content = (tmp_path / "second.txt").read_bytes()

    def vanish(name):
        if name == "prepare:piece-00000:done":
            (tmp_path / "second.txt").unlink()

    previous = set_fault_hook(vanish)
    try:
        with pytest.raises(FileNotFoundError, match="second.txt vanished while the corpus was being prepared"):
            run(tmp_path / "good.txt", tmp_path / "second.txt", piece_mb=0.1)
    finally:
        set_fault_hook(previous)
    output, work = leftovers(tmp_path)
    assert output == [] and len(work) == 1
    assert [p.name for p in (tmp_path / work[0] / "pieces").iterdir()] == ["00000.json"]
    (tmp_path / "second.txt").write_bytes(content)
    said = []
    cfg = prep.PrepareConfig(out_dir=str(tmp_path / "out"), inputs=(str(tmp_path / "good.txt"),
                             str(tmp_path / "second.txt")), vocab=str(tmp_path / "vocab.txt"), max_seq_len=32,
                             dupe_factor=1, workers=1, piece_mb=0.1)
    meta = prep.prepare(cfg, log=said.append)
    assert any("(1 finished by an earlier run of this command)" in m for m in said), said
    assert len(meta["splits"]["train"]["shards"]) == 2 and leftovers(tmp_path) == (["out"], [])


def test_progress_lines_when_not_a_terminal(monkeypatch):
    said = []
    pieces = [pc.Piece(k, "x.txt", "text", 0, 1, 3 << 20, 1, 1, 1) for k in range(4)]
    monkeypatch.setattr(prep, "PROGRESS_EVERY_S", 0.0)
    progress = prep.Progress(pieces, [0], said.append)
    assert progress.bar.disable  # pytest's stderr is not a terminal: no bar
    for _ in range(3):
        progress.update(3 << 20)
    progress.close()
    assert [m.split(",")[0] for m in said] == ["prepare: 2/4 pieces", "prepare: 3/4 pieces", "prepare: 4/4 pieces"]
    assert said[0].startswith("prepare: 2/4 pieces, 6.00 of 12.00 MB, ") and " MB/s, " in said[0]
    assert said[0].endswith(" left")
    assert said[-1].endswith("00:00 left") and not any("\r" in m for m in said)


def test_corpus_text_for_measurements(tmp_path):
    """train/corpus_text.py (the benchmarks' corpora): the embedded paragraphs, reshuffled each pass, as text."""
    require("wiki_corpus")
    from train.corpus_text import write_wiki_text

    n = write_wiki_text(tmp_path / "c.txt", 0.2, seed=1)
    assert n == (tmp_path / "c.txt").stat().st_size and 0.2 * (1 << 20) <= n < 0.2 * (1 << 20) + 40_000
    docs, cut = read_all(tmp_path / "c.txt", 1 << 16)
    assert cut == 0 and len(docs) > 200 and all(len(d) >= 1 for d in docs)
    assert write_wiki_text(tmp_path / "again.txt", 0.2, seed=1) == n
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "c.txt").read_bytes()
