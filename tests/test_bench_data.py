"""The `data` benchmark family's machinery (fastbert/bench/data.py): the corpus it prepares, the memory of a process
tree, one prepare run in a subprocess, and its dry-run listing. The figures themselves are not tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fastbert.bench.cli import main
from fastbert.bench.data import run_prepare, tree_rss, write_corpus
from tests.helpers import require


def test_corpus_is_the_paragraphs_reshuffled_to_a_size(tmp_path):
    require("wiki_corpus")
    path = write_corpus(tmp_path / "c.txt", 0.2)
    docs = path.read_text(encoding="utf-8").split("\n\n")
    assert 200_000 <= path.stat().st_size < 210_000 and len(docs) > 100 and docs[-1] == ""
    assert all(line.strip() for d in docs[:-1] for line in d.split("\n"))  # no blank line inside a document


def test_tree_rss_counts_the_children():
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(80 << 20); time.sleep(60)'])\n"
        "b = bytearray(80 << 20)\nprint(child.pid, flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.time() + 10
        while tree_rss(parent.pid) < 160 << 20 and time.time() < deadline:  # the child's allocation may lag
            time.sleep(0.05)
        assert tree_rss(parent.pid) >= 160 << 20
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert tree_rss(parent.pid) == 0


def test_one_prepare_run_and_the_dry_run(tmp_path, capsys):
    require("wiki_corpus"), require("minilm")
    r = run_prepare(write_corpus(tmp_path / "c.txt", 0.05), tmp_path / "out", workers=None)
    assert r["returncode"] == 0 and (tmp_path / "out" / "meta.json").is_file(), r["tail"]
    assert r["wall_s"] > 0 and r["peak_bytes"] > 20 << 20
    assert main(["--dry-run", "--family", "data", "--device", "cpu"]) == 0
    assert "fastbert-prepare on 10, 30, 120 MB" in capsys.readouterr().out
