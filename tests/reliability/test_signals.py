"""SIGTERM / SIGINT during pretraining and fine-tuning: the current step finishes, a checkpoint is written, one
line says so, the exit code is 143 / 130 with no traceback, and `--resume` then gives a run bitwise equal to an
uninterrupted one. A second signal exits at once.

The signal is sent by the process to itself at a named point inside a step (FASTBERT_FAULT_AT=point=TERM:
after the backward, before the optimizer step), so where it lands is deterministic; one test sends it from
outside, at whatever moment the run is in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.pretrain import PretrainConfig, pretrain

from .conftest import MICRO, REPO, _env, flags, run_module

COMPARED = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "grad_norm")


def records(out_dir: Path) -> list[dict]:
    with open(out_dir / "log.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def common(corpus):
    # Dropout on and LAMB, so the RNG and optimizer states restored on resume matter.
    return dict(MICRO, optimizer="lamb", lr=2e-2, dropout=0.1, data_dir=str(corpus / "data"), max_steps=10,
                log_every=1, checkpoint_every=0, eval_every=0, keep_checkpoints=2)


@pytest.fixture(scope="module")
def straight(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    pretrain(PretrainConfig(**common, out_dir=str(out)))
    return out


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_pretrain_signal_checkpoints_then_resume_is_bitwise_equal(common, straight, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = run_module("train.pretrain", [*flags(common), "--out-dir", str(out)],
                      fault=f"pretrain:step-4:backward={sig}")
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert f"SIG{sig} received" in proc.stderr
    assert f"stopped by SIG{sig} after step 4: checkpoint" in proc.stdout  # the step in flight was finished
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000004"]
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert not (out / "model").exists()  # not finished: no final model

    pretrain(PretrainConfig(**common, out_dir=str(out), resume=True))
    a, b = records(straight), records(out)
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}, ra["step"]
    wa, wb = weights(straight), weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_second_ctrl_c_exits_at_once(common, tmp_path):
    out = tmp_path / "run"
    # The first SIGINT inside step 3; the second when the checkpoint write it asked for begins.
    proc = run_module("train.pretrain", [*flags(common), "--out-dir", str(out)],
                      fault="pretrain:step-3:backward=INT,write:started=INT")
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SIGINT again: exiting now, without a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((out / "checkpoints").glob("step_*"))  # nothing half-written looks like a checkpoint


def test_sigterm_from_outside_mid_run(common, tmp_path):
    """A real asynchronous SIGTERM to the whole process group (as a scheduler or a terminal sends it: the
    data-loader workers get it too) while the run is going, wherever it lands; then resume: bitwise equal."""
    out = tmp_path / "run"
    opts = dict(common, max_steps=400)
    cmd = [sys.executable, "-m", "train.pretrain", *flags({**opts, "num_workers": 2}), "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step      3 "):
                break
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = int(next(line for line in stdout.splitlines() if "stopped by SIGTERM" in line).split("after step ")[1]
                  .split(":")[0])
    assert 3 <= stopped < 400
    assert (out / "checkpoints" / f"step_{stopped:08d}").is_dir()
    # Resume for a few steps only (stop_at_step) and compare with the straight run's first steps.
    resumed = pretrain(PretrainConfig(**opts, out_dir=str(out), resume=True, stop_at_step=stopped + 3))
    straight = pretrain(PretrainConfig(**opts, out_dir=str(tmp_path / "straight"), stop_at_step=stopped + 3))
    assert resumed["step"] == straight["step"] == stopped + 3
    a, b = records(tmp_path / "straight"), records(out)
    assert len(a) == len(b) == stopped + 3
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}, ra["step"]


def test_finetune_sigterm_writes_the_model_so_far(tmp_path, capsys):
    import fastbert

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join([*specials, "good", "bad", "film"]) + "\n")
    rows = ["sentence\tlabel", *(f"{'good' if i % 2 else 'bad'} film\t{i % 2}" for i in range(32))]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(fastbert.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2))
    model.save_pretrained(tmp_path / "init")
    (tmp_path / "init" / "vocab.txt").write_text((tmp_path / "vocab.txt").read_text())
    argv = ["--task", "sst2", "--data-dir", str(tmp_path), "--init", str(tmp_path / "init"), "--epochs", "2",
            "--batch-size", "8", "--max-length", "8", "--no-fused", "--output-dir", str(tmp_path / "out")]
    proc = run_module("train.finetune", argv, fault="finetune:step-3:backward=TERM")
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "stopped by SIGTERM after step 3 of 8" in proc.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["interrupted"] == "SIGTERM" and metrics["steps"] == 3 and metrics["metrics"] is None
    tuned = fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert not torch.equal(tuned.classifier.weight, model.classifier.weight)  # three steps were taken
    # The folder is now a fine-tune output: a new run into it needs --overwrite.
    from train.finetune import main

    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert "interrupted" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.slow
def test_torchrun_ranks_agree_on_the_stop_step(common, tmp_path):
    """SIGTERM reaches rank 1 only (inside step 3): both ranks stop after the same step (the agreement is
    read one step later), rank 0 writes the checkpoint, and nobody hangs in a collective."""
    opts = dict(common, micro_batch_size=4, max_steps=8)
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train.pretrain",
           *flags(opts), "--out-dir", str(tmp_path / "ddp")]
    env = _env("pretrain:step-3:backward=TERM@1")
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert "SIGTERM received" in proc.stderr, out[-3000:]
    assert "stopped by SIGTERM after step 4: checkpoint" in proc.stdout, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_00000004"]
    assert [r["step"] for r in records(tmp_path / "ddp")] == [1, 2, 3, 4]
    # The ranks exit with 143 (torchrun then reports a failed child in its own summary and may SIGTERM a rank
    # already past its last write); no traceback comes from the training code.
    assert "exitcode  : 143" in out and "train/pretrain.py" not in out, out[-3000:]
