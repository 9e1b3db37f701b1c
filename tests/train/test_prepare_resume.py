"""fastbert-prepare's promise of the same bytes: whatever the number of worker processes, on a Dask cluster, and
after a kill at any point followed by the same command again (which reuses the pieces already finished); another
command never reuses them.

Kills are taken two ways, as in tests/reliability/test_fault_injection.py: in-process, a fault hook copies the
folder at chosen steps — exactly what a kill there leaves on disk — and the run is resumed from each copy; and
once for real, a subprocess SIGKILLed at a step (FASTBERT_FAULT_AT). The corpus is tiny and cut into 6 pieces;
the vocabulary is trained by the command, so a resume also checks that the same vocabulary comes out of another
process."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastbert._atomic import FAULT_ENV, set_fault_hook
from tests.helpers import require
from tests.train.prepared_data import file_hashes, write_corpus
from train import prepare as prep

REPO = Path(__file__).resolve().parents[2]
NO_PROCESS = 4194305  # past the largest process id Linux hands out: the owner of a folder left by a killed run
OPTIONS = dict(vocab_size=150, max_seq_len=32, dupe_factor=2, heldout_fraction=0.1, piece_mb=0.006)
KILL_POINTS = ["prepare:vocab-written", "prepare:piece-00001:heldout.len_a-written", "prepare:piece-00004:done",
               "write:manifest-written"]


def config(corpus: Path, out: Path, **kw) -> prep.PrepareConfig:
    return prep.PrepareConfig(out_dir=str(out), inputs=(str(corpus),), **{**OPTIONS, "workers": 1, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus and the output of an uninterrupted one-process run: (corpus path, {file: sha256})."""
    root = tmp_path_factory.mktemp("resume")
    write_corpus(root / "corpus.txt", 120)
    meta = prep.prepare(config(root / "corpus.txt", root / "ref" / "d"), log=lambda m: None)
    assert len(meta["splits"]["train"]["shards"]) == 6
    return root / "corpus.txt", file_hashes(root / "ref" / "d")


def finish(corpus: Path, folder: Path, **kw) -> list[str]:
    """Run the command into folder/d; what it logged."""
    said: list[str] = []
    prep.prepare(config(corpus, folder / "d", **kw), log=said.append)
    return said


def interrupt_after(corpus: Path, folder: Path, point: str) -> None:
    """Run the command into folder/d and stop it (Ctrl-C) at the fault point `point`."""

    def stop(name: str) -> None:
        if name == point:
            raise KeyboardInterrupt

    previous = set_fault_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            finish(corpus, folder)
    finally:
        set_fault_hook(previous)


def test_same_bytes_whatever_the_workers(reference, tmp_path):
    corpus, expected = reference
    finish(corpus, tmp_path, workers=2)
    assert file_hashes(tmp_path / "d") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # work folder gone


def test_resume_after_a_kill_at_each_step_gives_the_same_bytes(reference, tmp_path):
    corpus, expected = reference
    run, snaps = tmp_path / "run", tmp_path / "snaps"
    run.mkdir()

    def snapshot(name: str) -> None:
        if name in KILL_POINTS:
            shutil.copytree(run, snaps / name.replace(":", "_"), symlinks=True)

    previous = set_fault_hook(snapshot)
    try:
        finish(corpus, run)
    finally:
        set_fault_hook(previous)
    assert file_hashes(run / "d") == expected
    reused = {}
    for name in KILL_POINTS:
        shutil.rmtree(run)
        shutil.copytree(snaps / name.replace(":", "_"), run, symlinks=True)
        for tmp in run.glob(f".d.tmp-{os.getpid()}-*"):  # as a killed writer leaves it: its process is gone
            tmp.rename(run / tmp.name.replace(str(os.getpid()), str(NO_PROCESS)))
        assert not (run / "d").exists() or name == "write:manifest-written"
        said = finish(corpus, run)
        assert file_hashes(run / "d") == expected, name
        assert sorted(p.name for p in run.iterdir()) == ["d"], name  # no work folder, no temporary left
        start = next(m for m in said if m.startswith("preparing "))
        reused[name] = start.split(" of ")[0].removeprefix("preparing ")
        assert any(m.startswith("using the vocabulary trained by an interrupted run") for m in said), name
    # Pieces still to prepare after each kill: a piece killed mid-write is made again, a finished one is not.
    assert reused == {"prepare:vocab-written": "6", "prepare:piece-00001:heldout.len_a-written": "5",
                      "prepare:piece-00004:done": "1", "write:manifest-written": "0"}


def test_sigkill_then_the_same_command_finishes_with_the_same_bytes(reference, tmp_path):
    corpus, expected = reference
    argv = [str(corpus), "--out-dir", str(tmp_path / "d"), "--workers", "1",
            *(f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items())]
    env = {**os.environ, FAULT_ENV: "prepare:piece-00002:done", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "train.prepare", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(".d.work-")]
    assert not (tmp_path / "d").exists() and len(list((work / "pieces").iterdir())) == 3
    said = finish(corpus, tmp_path)  # the vocabulary trained by the killed process is used
    assert any(m.startswith("preparing 3 of 6 piece(s)") for m in said), said
    assert file_hashes(tmp_path / "d") == expected and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_another_command_never_reuses_the_pieces_and_abandoned_work_is_removed(reference, tmp_path):
    corpus, _ = reference

    interrupt_after(corpus, tmp_path, "prepare:piece-00001:done")
    (kept,) = [p.name for p in tmp_path.iterdir() if p.name.startswith(".d.work-")]
    # A work folder whose owner is gone (a killed run of yet another command).
    (tmp_path / ".d.work-0123456789abcdef").mkdir()
    (tmp_path / ".d.work-0123456789abcdef" / "owner.json").write_text(f'{{"pid": {NO_PROCESS}}}')
    said = finish(corpus, tmp_path, seed=7)  # another seed: nothing of the interrupted run applies
    assert any(m.startswith("preparing 6 of 6 piece(s)") for m in said), said
    # The interrupted run's folder is ours (this process is alive): kept; the dead owner's is removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", kept])
    said = finish(corpus, tmp_path)  # the interrupted command, again: it goes on from its two pieces
    assert any(m.startswith("preparing 4 of 6 piece(s)") for m in said), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_same_command_running_twice_at_once_is_refused(reference, tmp_path):
    corpus, hashes = reference

    interrupt_after(corpus, tmp_path, "prepare:piece-00000:done")
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(".d.work-")]
    (work / "owner.json").write_text(f'{{"pid": {os.getppid()}}}')  # a live process other than this one
    with pytest.raises(ValueError, match=r"another fastbert-prepare \(process \d+\) is preparing"):
        finish(corpus, tmp_path)
    assert work.is_dir() and not (tmp_path / "d").exists()  # nothing of the other run's taken or removed
    (work / "owner.json").write_text(f'{{"pid": {NO_PROCESS}}}')  # it was killed: this command goes on
    said = finish(corpus, tmp_path)
    assert any(m.startswith("preparing 5 of 6 piece(s)") for m in said), said
    assert file_hashes(tmp_path / "d") == hashes


def test_dask_cluster_gives_the_same_bytes(reference, tmp_path):
    """The same per-piece task on a local Dask cluster of two workers. Threads, not processes: two worker
    processes each import fastbert (torch) first, ~20 s on a busy 2-core machine; that the task travels to
    another process is checked by pickling it, as Dask does."""
    distributed = require("distributed")
    corpus, expected = reference
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        said = finish(corpus, tmp_path, dask_scheduler=c.scheduler_address)
    assert any(f"on the Dask cluster at {c.scheduler_address}" in m for m in said), said
    assert file_hashes(tmp_path / "d") == expected
    task = functools.partial(prep.make_piece, config(corpus, tmp_path / "d"), work=prep.WorkFolder(tmp_path, "k"),
                             vocab="vocab.txt")
    again = pickle.loads(pickle.dumps(task))
    assert again.func is prep.make_piece and again.keywords["work"].path == task.keywords["work"].path
