"""The `data` benchmark family's machinery (fastbert/bench/data.py): the memory of a process tree, one prepare run
in a subprocess, the prepare plan with its worker-count axis and its rows reported run by run, and the dry-run
listing. The figures themselves are not tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from fastbert.bench import data
from fastbert.bench.cli import main
from fastbert.bench.results import row_sink
from fastbert.bench.timing import BenchEnv
from tests.helpers import require
from train.corpus_text import write_wiki_text


def test_tree_memory_sums_the_tree_and_counts_shared_pages_once_in_pss():
    # 80 MiB touched, then a fork: the child shares those pages (RSS counts them twice, PSS once).
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, time\nb = b'x' * (80 << 20)\npid = os.fork()\n"
        "if pid == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(pid, flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        pss, rss = data.tree_memory(parent.pid)
        assert rss >= 160 << 20 and 80 << 20 <= pss < rss - (60 << 20), (pss >> 20, rss >> 20)
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert data.tree_memory(parent.pid) == (0, 0)


def test_one_prepare_run(tmp_path):
    require("wiki_corpus"), require("minilm")
    write_wiki_text(tmp_path / "c.txt", 0.05)
    r = data.run_prepare(tmp_path / "c.txt", tmp_path / "out", workers=1)
    assert r["returncode"] == 0 and (tmp_path / "out" / "meta.json").is_file(), r["tail"]
    assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["others_cores"] >= 0
    assert 20 << 20 < r["peak_pss"] <= r["peak_rss"]


def test_prepare_rows_cover_the_worker_axis_and_land_run_by_run(monkeypatch):
    """The quick plan through run_prepare_cases with the prepare itself faked: each run's row reaches the sink
    before the next run starts, and 6 MiB is measured with 1 and with 2 workers."""
    require("wiki_corpus")
    reported: list[list] = []
    runs: list[tuple[int, int]] = []

    def fake_run(corpus, out_dir, workers, piece_mib=None):
        assert len(reported) == len(runs)  # every earlier run's row is out already
        runs.append((corpus.stat().st_size, workers))
        return {"wall_s": 2.0, "cpu_s": 3.0, "peak_pss": 300 << 20, "peak_rss": 500 << 20, "others_cores": 0.0,
                "returncode": 0, "tail": ""}

    monkeypatch.setattr(data, "run_prepare", fake_run)
    env = BenchEnv(torch.device("cpu"), "cpu", {}, "", "test")
    with row_sink(reported.append):
        rows = data.run_prepare_cases(env, quick=True, label="test CPU")
    assert [len(batch) for batch in reported] == [1] * len(rows) and len(rows) == len(data.prepare_plan(True))
    assert {r.candidate for r in rows if r.size == "6MiB"} >= {"workers=1", "workers=2"}
    assert {r.size for r in rows} == {"2MiB", "6MiB"}
    six = next(r for r in rows if r.size == "6MiB")
    size = next(s for s, _ in runs if s >= 6 << 20)
    assert six.gbps == pytest.approx(size / 2.0 / 1e9) and six.peak_GB == pytest.approx((300 << 20) / 1e9)
    assert "pieces=3" in six.shape and "PSS 300 MiB, RSS 500 MiB" in six.note and six.pct_ceiling is None


def test_the_dry_run_lists_sizes_and_worker_counts(capsys):
    assert main(["--dry-run", "--family", "data", "--device", "cpu", "--quick"]) == 0
    quick = capsys.readouterr().out
    assert "fastbert-prepare on 2 MiB" in quick and "workers=1" in quick.split("6 MiB")[1]
    assert "workers=2" in quick.split("6 MiB")[1]
    assert main(["--dry-run", "--family", "data", "--device", "cpu"]) == 0
    full = capsys.readouterr().out
    assert "10 MiB" in full and "120 MiB" in full and "30 MiB (" in full
