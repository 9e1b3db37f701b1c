"""Pretraining loop on a micro model: loss falls, outputs (checkpoint, JSONL, PNG, HF folder), exact resume,
torchrun with 2 CPU processes = 1 process with the same global batch, phase 2 from phase 1, CLI and errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import require
from train import prepare as prep
from train.pretrain import PretrainConfig, main, pretrain

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(40)]
# The micro model: hidden 32, 2 layers, the 47-token test vocabulary; the reference path (no interpreter).
# One thread: the micro model gains nothing from a second one, and on a busy machine OpenMP spinning makes
# two threads many times slower.
MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, fused=False,
             optimizer="adamw", lr=6e-3, warmup_steps=10, cpu_threads=1, micro_batch_size=16, num_workers=0,
             progress=False, eval_samples=64, max_predictions=5)
COMPARED = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "grad_norm")


def write_learnable_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """Each document draws its words from one topic of 4 words (w0-w3, w4-w7, ...): a masked word is
    predictable from the rest of the sequence (1 in 4 instead of 1 in 40), and a random next segment usually
    comes from another topic, so NSP is learnable too."""
    rng = random.Random(seed)
    docs = []
    for k in range(n_docs):
        topic = WORDS[4 * (k % 10):4 * (k % 10) + 4]
        lines = [" ".join(rng.choice(topic) for _ in range(rng.randint(4, 8))) + " ."
                 for _ in range(rng.randint(5, 10))]
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "vocab.txt").write_text("\n".join([*prep.SPECIAL_TOKENS, *WORDS, ".", ","]) + "\n")
    write_learnable_corpus(root / "corpus.txt", 150)
    for T in (32, 48):
        prep.prepare(prep.PrepareConfig(out_dir=str(root / f"data{T}"), inputs=(str(root / "corpus.txt"),),
                                        vocab=str(root / "vocab.txt"), max_seq_len=T, dupe_factor=2,
                                        heldout_fraction=0.05), log=lambda m: None)
    return root


def records(out_dir: Path, kind: str = "train") -> list[dict]:
    with open(out_dir / "log.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(data):
    """One 200-step run shared by the tests that inspect its outputs."""
    n = torch.get_num_threads()
    cfg = PretrainConfig(**MICRO, dropout=0.0, data_dir=str(data / "data32"), out_dir=str(data / "run"),
                         max_steps=200, log_every=20, eval_every=100, checkpoint_every=100)
    result = pretrain(cfg)
    torch.set_num_threads(n)
    return cfg, result


def test_loss_falls_and_outputs_are_written(trained):
    cfg, result = trained
    out = Path(cfg.out_dir)
    train = records(out)
    assert [r["step"] for r in train] == list(range(20, 201, 20))
    first, last = train[0], train[-1]
    assert first["loss"] > 4.0  # ≈ ln(47) + ln(2) at the start
    assert last["loss"] < first["loss"] - 1.5, (first, last)
    assert all(r["seq_per_s"] > 0 and r["tokens_per_s"] > r["seq_per_s"] and "mfu" not in r for r in train)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [100, 200]
    # Held out: a topic word is 1 in 4 given the context (loss ln 4 = 1.39 at best), 1 in 40 without it.
    assert result["eval_mlm_loss"] == evals[-1]["eval_mlm_loss"] < 2.5
    assert result["eval_mlm_acc"] > 0.12 and result["eval_nsp_acc"] > 0.8
    assert result["eval_sequences"] > 0
    # The constant baselines printed at the end, recomputed by hand: "." is the most frequent token.
    import numpy as np

    from train.dataset import PretrainingDataset

    held = PretrainingDataset(Path(cfg.data_dir), "heldout", seed=cfg.seed + 1, max_predictions=5, fixed_masking=True)
    labels = np.concatenate([held[i]["labels"].numpy() for i in range(result["eval_sequences"])])
    labels = labels[labels != -100]
    assert result["unigram_token"] == "."
    assert result["unigram_mlm_acc"] == pytest.approx(np.mean(labels == 5 + len(WORDS)))
    assert result["unigram_mlm_acc"] < result["eval_mlm_acc"]
    assert 0.3 < result["majority_nsp_acc"] < 0.8 and result["majority_nsp_acc"] < result["eval_nsp_acc"] - 0.2
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000100", "step_00000200"]
    assert (out / "checkpoints" / "step_00000200" / "trainer_state.pt").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    for folder in (out / "model", out / "checkpoints" / "step_00000200" / "model"):
        assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in folder.iterdir()}


def test_checkpoint_loads_in_transformers(trained, data):
    transformers = require("transformers")
    from fastbert.modeling import BertForPreTraining
    from train.dataset import PretrainingDataset, collate

    cfg, _ = trained
    folder = Path(cfg.out_dir) / "model"
    hf = transformers.BertForPreTraining.from_pretrained(folder).eval()
    ours = BertForPreTraining.from_pretrained(folder).eval()
    b = collate([PretrainingDataset(data / "data32", "heldout")[i] for i in range(4)])
    with torch.no_grad():
        h = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
        o = ours(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    real = b["attention_mask"].bool()  # the fused encoder leaves padded positions at zero (unpadding)
    torch.testing.assert_close(h.prediction_logits[real], o.prediction_logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.seq_relationship_logits, o.seq_relationship_logits, rtol=1e-4, atol=1e-4)


def test_resume_is_exact(data, tmp_path):
    # Dropout on and LAMB, so the restored RNG and optimizer states matter.
    common = dict(MICRO, optimizer="lamb", lr=2e-2, dropout=0.1, data_dir=str(data / "data32"), max_steps=12,
                  log_every=1, checkpoint_every=6, eval_every=0)
    straight = pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "a")))
    pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "b"), stop_at_step=6))  # "interrupted" at 6
    assert [r["step"] for r in records(tmp_path / "b")] == list(range(1, 7))
    assert not (tmp_path / "b" / "model").exists()  # no final model for an unfinished run
    resumed = pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "b"), resume=True))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}, ra["step"]
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight["eval_mlm_loss"] == resumed["eval_mlm_loss"]


def test_resume_errors(data, tmp_path):
    common = dict(MICRO, data_dir=str(data / "data32"), max_steps=4, warmup_steps=1, log_every=2,
                  out_dir=str(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(PretrainConfig(**common, resume=True))
    pretrain(PretrainConfig(**common, stop_at_step=2))
    with pytest.raises(ValueError, match="lr"):
        pretrain(PretrainConfig(**{**common, "lr": 0.5}, resume=True))
    with pytest.raises(ValueError, match="global batch"):
        pretrain(PretrainConfig(**{**common, "micro_batch_size": 8}, resume=True))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(data, tmp_path):
    """2 gloo ranks × micro-batch 4 vs 1 process × 2 accumulated micro-batches of 4: same global batches, same
    global-mean losses, so the same losses and weights up to fp32 rounding."""
    flags = dict(MICRO, dropout=0.0, micro_batch_size=4, max_steps=8, warmup_steps=2, log_every=1,
                 checkpoint_every=0, eval_every=0, data_dir=str(data / "data32"))
    argv = []
    for k, v in flags.items():
        name = "--" + k.replace("_", "-")
        argv += ([name] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [name, str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.pretrain", *argv, "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = pretrain(PretrainConfig(**{**flags, "grad_accum": 2}, out_dir=str(tmp_path / "one")))
    ddp, one = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert len(ddp) == len(one) == 8
    for rd, ro in zip(ddp, one, strict=True):
        for k in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
            assert rd[k] == pytest.approx(ro[k], rel=1e-5, abs=1e-6), (rd["step"], k)
        assert rd["mlm_acc"] == ro["mlm_acc"] and rd["nsp_acc"] == ro["nsp_acc"]
    wd = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    wo = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for k in wo:
        torch.testing.assert_close(wd[k], wo[k], rtol=1e-4, atol=1e-5, msg=k)
    assert single["eval_mlm_acc"] == pytest.approx(records(tmp_path / "ddp", "eval")[-1]["eval_mlm_acc"])


def test_phase2_continues_from_phase1(trained, data, tmp_path, recwarn):
    cfg1, _ = trained
    # As the README's phase-2 command: no --max-predictions, so the cap follows the longer data (no warning).
    common = dict(MICRO, data_dir=str(data / "data48"), max_steps=2, log_every=1, warmup_steps=1, lr=1e-4,
                  max_predictions=0)
    cont = pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "p2"), init_from=str(Path(cfg1.out_dir))))
    pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "fresh")))
    first_cont, first_fresh = records(tmp_path / "p2")[0], records(tmp_path / "fresh")[0]
    assert first_cont["loss"] < first_fresh["loss"] - 1.0  # the phase-1 weights were loaded
    assert cont["eval_nsp_acc"] > 0.8
    saved = json.loads((tmp_path / "p2" / "model" / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["max_position_embeddings"] == 512
    assert not [w for w in recwarn if "max_predictions" in str(w.message)]


def test_cli_precedence_and_errors(capsys):
    assert main(["--preset", "tiny", "--demo", "--lr", "5e-3", "--no-fused", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lr"] == 5e-3 and shown["fused"] is False  # flags given win
    assert shown["max_seq_len"] == 64 and shown["optimizer"] == "adamw"  # DEMO over the preset
    assert shown["vocab_size"] == 4096 and shown["max_predictions"] == 0  # 0: ceil(0.15 · 64) = 10
    assert main(["--preset", "base", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["grad_accum"] == 4 and shown["optimizer"] == "lamb" and shown["demo"] is False
    for argv, match in ((["--optimizer", "sgd"], "optimizer"), (["--max-steps", "0"], "max_steps"),
                        (["--preset", "huge"], "unknown preset"), (["--precision", "fp8"], "precision"),
                        (["--warmup-steps", "50", "--max-steps", "10"], "warmup_steps"),
                        (["--data-dir", "/nonexistent/data"], "not a prepared pretraining dataset")):
        assert main([*argv, "--no-progress"]) == 2, argv
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--max-steps", "ten"])  # argparse rejects a non-integer
    with pytest.raises(ValueError, match="unknown PretrainConfig option"):
        PretrainConfig.from_preset("tiny", learning_rate=1.0)
    with pytest.raises(ValueError, match="CUDA"):
        from train.pretrain import resolve_precision

        resolve_precision(PretrainConfig(precision="bf16"), torch.device("cpu"))
    assert set(asdict(PretrainConfig())) >= {"preset", "lr", "resume", "init_from", "stop_at_step"}
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # each flag's help is its field's comment (+ continuation)
    assert "--micro-batch-size INT sequences per forward per rank (default: 64)" in shown
    assert "N = a new WordPiece vocabulary of N tokens trained on the corpus (default: 0)" in shown


def test_flops_per_token_matches_the_design_number():
    from fastbert.config import BertConfig
    from fastbert.flops import train_flops_per_token

    f = train_flops_per_token(BertConfig.from_preset("base"), 128, 0.15)
    assert f == pytest.approx(5.45e8, rel=2e-3)
