"""Every scenario of the data-safety issue, as a new user would meet it, through the public commands.

Each failed before the change (user files deleted, a run's checkpoints deleted by its own rotation, a crafted
pickle run, a raw traceback, `pearson: 0.0`); kills and signals are in test_fault_injection.py and
test_signals.py. Only public entry points are used here, so the file also runs against an older checkout.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from train import prepare as prep
from train.pretrain import PretrainConfig, pretrain
from train.pretrain import main as pretrain_main

from .conftest import MICRO, flags, write_corpus, write_vocab


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A user's working folder: their corpus, vocabulary and some unrelated files."""
    d = tmp_path / "home"
    d.mkdir()
    write_vocab(d / "vocab.txt")
    write_corpus(d / "corpus.txt", 20)
    (d / "thesis.tex").write_text("two years of work")
    (d / "notes").mkdir()
    (d / "notes" / "todo.md").write_text("- finish")
    return d


PREP = ["--vocab", "vocab.txt", "--max-seq-len", "32", "--dupe-factor", "1", "--heldout-fraction", "0"]


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_into_the_working_directory_is_refused(user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder)
    before = tree(user_folder)
    for extra in ([], ["--overwrite"]):
        assert prep.main(["corpus.txt", *PREP, "--out-dir", ".", *extra]) == 2
        err = capsys.readouterr().err
        assert "working directory" in err and err.count("\n") == 1, err
    assert tree(user_folder) == before


def test_prepare_into_a_folder_of_other_files_is_refused_unless_overwrite(user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder)
    before = tree(user_folder / "notes")
    assert prep.main(["corpus.txt", *PREP, "--out-dir", "notes"]) == 2
    err = capsys.readouterr().err
    assert "is not a fastbert-prepare output" in err and "--overwrite" in err
    assert tree(user_folder / "notes") == before
    assert prep.main(["corpus.txt", *PREP, "--out-dir", "notes", "--overwrite"]) == 0
    assert prep.is_prepared(user_folder / "notes") and not (user_folder / "notes" / "todo.md").exists()
    # A previous fastbert-prepare output is replaced without asking.
    assert prep.main(["corpus.txt", *PREP, "--out-dir", "notes", "--seed", "7"]) == 0
    assert json.loads((user_folder / "notes" / "meta.json").read_text())["config"]["seed"] == 7


def test_prepare_into_the_inputs_folder_is_refused_even_with_overwrite(user_folder, tmp_path, capsys):
    before = tree(user_folder)
    for target in (user_folder, tmp_path):  # the input's folder, and a folder holding it
        for extra in ([], ["--overwrite"]):
            argv = [str(user_folder / "corpus.txt"), *PREP[2:], "--vocab", str(user_folder / "vocab.txt"),
                    "--out-dir", str(target), *extra]
            assert prep.main(argv) == 2
            assert "holds the input" in capsys.readouterr().err
    assert tree(user_folder) == before


def test_prepare_out_dir_that_is_a_file(user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder)
    assert prep.main(["corpus.txt", *PREP, "--out-dir", "thesis.tex"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (user_folder / "thesis.tex").read_text() == "two years of work"


# ---------------------------------------------------------------------------------------------- pretrain
def run_opts(corpus: Path, out: Path, **kw) -> dict:
    return {**MICRO, "data_dir": str(corpus / "data"), "out_dir": str(out), "max_steps": 6, "log_every": 1,
            "checkpoint_every": 2, "keep_checkpoints": 2, "eval_every": 0, **kw}


def test_a_fresh_run_into_an_existing_run_folder_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain(PretrainConfig(**run_opts(corpus, out)))
    before = tree(out)
    assert pretrain_main(flags(run_opts(corpus, out, seed=5))) == 2
    err = capsys.readouterr().err
    assert "already holds the fastbert run" in err and "--resume" in err and "--overwrite" in err
    assert tree(out) == before  # old log, model and checkpoints untouched
    assert Path(first["checkpoint"]).is_dir()


def test_pretrain_out_dir_that_is_a_file(corpus, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert pretrain_main([*flags(run_opts(corpus, tmp_path / "f")), "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "f").read_text() == "mine"


def test_overwrite_replaces_the_run_and_rotation_keeps_its_own_checkpoints(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, max_steps=8)))  # checkpoints 6, 8 of the old run
    capsys.readouterr()
    assert pretrain_main([*flags(run_opts(corpus, out, seed=5)), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    ckpt = Path(printed.split("done in ")[1].split(": checkpoint ")[1].split(",")[0])
    assert ckpt.is_dir() and ckpt.name == "step_00000006"  # the printed path exists
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_crafted_pickle_in_a_checkpoint_does_not_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, keep_checkpoints=0, stop_at_step=4)))
    marker = tmp_path / "pwned"
    state = out / "checkpoints" / "step_00000004" / "trainer_state.pt"
    state.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    assert pretrain_main([*flags(run_opts(corpus, out, keep_checkpoints=0)), "--resume"]) == 0
    assert not marker.exists()
    captured = capsys.readouterr().out
    assert f"checkpoint {state.parent} is unusable" in captured and "step_00000002 at step 2" in captured


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_truncated_latest_checkpoint_falls_back_with_a_warning(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, stop_at_step=4)))
    bad = out / "checkpoints" / "step_00000004" / "model" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    capsys.readouterr()
    pretrain(PretrainConfig(**run_opts(corpus, out), resume=True))
    said = capsys.readouterr().out
    assert f"warning: checkpoint {bad.parents[1]} is unusable: {bad} has 100 bytes" in said
    assert "resumed from" in said and "step_00000002 at step 2" in said


def test_no_good_checkpoint_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, stop_at_step=2)))
    (out / "checkpoints" / "step_00000002" / "trainer_state.pt").write_bytes(b"")
    assert pretrain_main([*flags(run_opts(corpus, out)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastbert-pretrain: error: --resume: none of the 1 checkpoint") and err.count("\n") == 1


def test_partial_last_log_line_is_dropped_with_a_note(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, stop_at_step=4)))
    n = len((out / "log.jsonl").read_text().splitlines())
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # what a kill mid-write leaves
    capsys.readouterr()
    pretrain(PretrainConfig(**run_opts(corpus, out), resume=True))
    assert f"dropped the partial last line {n + 1} of {out / 'log.jsonl'}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_dataset_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**run_opts(corpus, out, stop_at_step=2)))
    other = tmp_path / "other"
    prep.prepare(prep.PrepareConfig(out_dir=str(other), inputs=(str(corpus / "corpus.txt"),),
                                    vocab=str(corpus / "vocab.txt"), max_seq_len=32, dupe_factor=2,
                                    heldout_fraction=0.05), log=lambda m: None)
    with pytest.raises(ValueError, match=r"dataset: .* \(files .*train\S*tokens.npy.* differ in size\)"):
        pretrain(PretrainConfig(**{**run_opts(corpus, out), "data_dir": str(other)}, resume=True))


def test_truncated_train_tokens_is_named(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    prep.prepare(prep.PrepareConfig(out_dir=str(data), inputs=(str(corpus / "corpus.txt"),),
                                    vocab=str(corpus / "vocab.txt"), max_seq_len=32, dupe_factor=1,
                                    heldout_fraction=0.05), log=lambda m: None)
    tokens = data / "train.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-50])
    assert pretrain_main(flags({**run_opts(corpus, tmp_path / "run"), "data_dir": str(data)})) == 2
    assert str(tokens) in capsys.readouterr().err
    from train.dataset import PretrainingDataset

    (data / "fastbert-manifest.json").unlink()  # without the manifest the loader itself names it
    with pytest.raises(ValueError, match="train.tokens.npy is truncated or corrupt"):
        PretrainingDataset(data, "train")


# ---------------------------------------------------------------------------------------------- GLUE data
def test_nan_scores_are_refused_with_file_and_line(tmp_path):
    from train.glue import classification_metrics, pearson, read_glue_tsv

    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    good = "0\tg\tf\t2012\t0\ts\ts\ta cat\ta dog\t3.2"
    for bad_score in ("nan", "inf", "-Infinity"):
        (tmp_path / "dev.tsv").write_text(f"{header}\n{good}\n{good[:-3]}{bad_score}\n")
        with pytest.raises(ValueError, match=rf"dev.tsv:3: score '{bad_score}' is not a finite number"):
            read_glue_tsv(tmp_path / "dev.tsv", "stsb")
    assert np.isnan(pearson([1.0, 1.0, 1.0], [0.5, 2.0, 3.0]))  # undefined: NaN, not 0.0
    assert np.isnan(classification_metrics("stsb", np.array([2.0, 2.0]), np.array([1.0, 3.0]))["pearson"])
    # STS-B is scored as regression under any spelling, and a classification task refuses float scores.
    assert set(classification_metrics("STS-B", np.array([0.1, 2.0, 3.5]), np.array([0.0, 2.5, 5.0]))) == {
        "pearson", "spearman", "corr"}
    with pytest.raises(ValueError, match="non-integer values"):
        classification_metrics("sst2", np.array([0.3, 1.7]), np.array([0, 1]))


def test_nan_score_in_a_train_file_is_named_not_blamed_on_the_lr(tmp_path, capsys):
    from train.finetune import main

    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [f"{i}\tg\tf\t2012\t{i}\ts\ts\ta cat\ta dog\t{i % 5}.0" for i in range(6)]
    (tmp_path / "train.tsv").write_text("\n".join([header, *rows[:3], rows[3][:-3] + "nan", *rows[4:]]) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join([header, *rows]) + "\n")
    assert main(["--task", "stsb", "--data-dir", str(tmp_path), "--init", "preset:tiny", "--no-fused",
                 "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.tsv'}:5: score 'nan' is not a finite number" in err and "lr" not in err


def test_tsv_encodings(tmp_path):
    from train.glue import read_glue_tsv

    (tmp_path / "bom.tsv").write_bytes("\ufeffsentence\tlabel\ngood\t1\n".encode())
    assert read_glue_tsv(tmp_path / "bom.tsv", "sst2")[0].label == 1
    (tmp_path / "latin1.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.tsv: not UTF-8 text"):
        read_glue_tsv(tmp_path / "latin1.tsv", "sst2")
    from train.classification_data import read_rotten_tomatoes
    from train.squad import read_squad

    (tmp_path / "rt.csv").write_bytes("\ufeffcategory,text\nfresh,a fine film\n".encode())
    assert read_rotten_tomatoes(tmp_path / "rt.csv")[0].label == 1
    (tmp_path / "rt1252.csv").write_bytes("category,text\nfresh,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="rt1252.csv: not UTF-8 text"):
        read_rotten_tomatoes(tmp_path / "rt1252.csv")
    squad = {"data": [{"paragraphs": [{"context": "a cat sat", "qas": [
        {"id": "q", "question": "who?", "answers": [{"text": "cat", "answer_start": 2}]}]}]}]}
    (tmp_path / "sq.json").write_bytes(("\ufeff" + json.dumps(squad)).encode())
    assert read_squad(tmp_path / "sq.json")[0].answers == [("cat", 2)]
    (tmp_path / "sq1252.json").write_bytes(json.dumps(squad).replace("cat", "caf\xe9").encode("latin-1"))
    with pytest.raises(ValueError, match="sq1252.json: not UTF-8 text"):
        read_squad(tmp_path / "sq1252.json")
