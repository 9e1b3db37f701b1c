"""Kill the writer at every step of every folder write: the folder is the old complete one or the new complete
one, never a mix.

Two ways. In-process, a fault hook (fastbert._atomic.set_fault_hook) copies the whole parent folder at each
named step of a write — exactly what a kill at that step would leave on disk — and every copy is then loaded
and checked (prepare output, training checkpoint with rotation, save_pretrained, fine-tune output). And for
real, a few subprocesses are SIGKILLed at chosen steps (FASTBERT_FAULT_AT) and the folder is checked after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert._atomic import set_fault_hook, verify_manifest
from fastbert.checkpoint import CONFIG_NAME, SAFETENSORS_NAME
from train import prepare as prep
from train.checkpointing import load_latest_good, save_checkpoint
from train.dataset import PretrainingDataset
from train.optim import build_optimizer, build_scheduler

from .conftest import run_python

SWAP_STEPS = ["write:started", "write:files-written", "write:manifest-written", "swap:old-moved-aside",
              "swap:new-in-place", "swap:done"]


class Snapshots:
    """A fault hook that copies `watch` (the folder holding the target and its temporary siblings) at each step."""

    def __init__(self, watch: Path, into: Path):
        self.watch, self.into, self.taken = watch, into, []

    def __call__(self, name: str) -> None:
        dest = self.into / f"{len(self.taken):03d}-{name.replace(':', '_').replace('/', '_')}"
        shutil.copytree(self.watch, dest, symlinks=True)
        self.taken.append((name, dest))


@contextlib.contextmanager
def snapshots(watch: Path, into: Path):
    snap = Snapshots(watch, into)
    previous = set_fault_hook(snap)
    try:
        yield snap
    finally:
        set_fault_hook(previous)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(snap: Snapshots) -> list[str]:
    return [n for n, _ in snap.taken]


# ---------------------------------------------------------------------------------------------- save_pretrained
def bert(heads: int, seed: int) -> fastbert.BertModel:
    torch.manual_seed(seed)
    cfg = fastbert.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=1, num_attention_heads=heads,
                              intermediate_size=32, max_position_embeddings=16)
    return fastbert.BertModel(cfg)


def test_save_pretrained_killed_at_every_step_is_old_or_new(tmp_path):
    old, new = bert(12, 0), bert(16, 1)  # same shapes: a mix would load without a word
    (tmp_path / "w").mkdir()
    old.save_pretrained(tmp_path / "w" / "m")
    with snapshots(tmp_path / "w", tmp_path / "snaps") as snap:
        new.save_pretrained(tmp_path / "w" / "m")
    assert names(snap) == ["write:started", "model:config-written", "model:weights-written", *SWAP_STEPS[1:]]
    seen = set()
    for name, copy in snap.taken:
        loaded = fastbert.BertModel.from_pretrained(copy / "m")  # verifies the manifest, recovers a swap
        ref = {12: old, 16: new}[loaded.config.num_attention_heads]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items()), name
        seen.add(loaded.config.num_attention_heads)
        leftovers = [p.name for p in copy.iterdir() if p.name != "m"]
        assert all(p.startswith(".m.") for p in leftovers), (name, leftovers)  # only hidden temporaries
    assert seen == {12, 16}


def test_save_pretrained_sigkill_between_the_renames_keeps_the_old_folder(tmp_path):
    """A real SIGKILL in a subprocess, at the worst point: the old folder renamed aside, the new not yet in."""
    bert(12, 0).save_pretrained(tmp_path / "m")
    before = sha(tmp_path / "m" / SAFETENSORS_NAME)
    code = ("import torch, fastbert\n"
            "torch.manual_seed(1)\n"
            "cfg = fastbert.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=1, num_attention_heads=16, "
            "intermediate_size=32, max_position_embeddings=16)\n"
            f"fastbert.BertModel(cfg).save_pretrained({str(tmp_path / 'm')!r})\n")
    proc = run_python(code, fault="swap:old-moved-aside")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "m").exists() and (tmp_path / ".m.old").is_dir()  # the state the kill left
    loaded = fastbert.BertModel.from_pretrained(tmp_path / "m")  # put back by the loader
    assert loaded.config.num_attention_heads == 12 and sha(tmp_path / "m" / SAFETENSORS_NAME) == before
    # The next save completes normally over it.
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert fastbert.BertModel.from_pretrained(tmp_path / "m").config.num_attention_heads == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_pretrained_sigkill_after_the_config_leaves_the_old_folder(tmp_path):
    """Where the old code left a new config.json beside the old weights."""
    bert(12, 0).save_pretrained(tmp_path / "m")
    before = {n: sha(tmp_path / "m" / n) for n in (CONFIG_NAME, SAFETENSORS_NAME)}
    code = ("import torch, fastbert\n"
            "cfg = fastbert.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=1, num_attention_heads=16, "
            "intermediate_size=32, max_position_embeddings=16)\n"
            f"fastbert.BertModel(cfg).save_pretrained({str(tmp_path / 'm')!r})\n")
    proc = run_python(code, fault="model:config-written")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {n: sha(tmp_path / "m" / n) for n in before} == before
    assert fastbert.BertModel.from_pretrained(tmp_path / "m").config.num_attention_heads == 12


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_killed_at_every_step_resumes_from_a_complete_one(tmp_path):
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(fastbert.BertConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16).with_fusions(False))
    opt = build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.999), 1e-6)
    sched = build_scheduler(opt, 1, 10)
    weights = {}
    save_checkpoint(tmp_path / "run", 1, model, opt, sched, None, {}, keep=1, run_id="r")
    weights[1] = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    weights[2] = {k: v.clone() for k, v in model.state_dict().items()}
    with snapshots(tmp_path / "run", tmp_path / "snaps") as snap:
        save_checkpoint(tmp_path / "run", 2, model, opt, sched, None, {}, keep=1, run_id="r")
    inner = ["write:started", "model:config-written", "model:weights-written", "write:files-written",
             "write:manifest-written", "swap:done"]  # the model folder inside the new checkpoint (nothing to swap)
    assert names(snap) == ["write:started", *inner, "checkpoint:state-written", "write:files-written",
                           "write:manifest-written", "swap:done", "checkpoint:rotated-out"]
    steps = []
    for name, copy in snap.taken:
        fresh = fastbert.BertForPreTraining(model.config)
        o = build_optimizer(fresh, "adamw", 1e-3, 0.0, (0.9, 0.999), 1e-6)
        warned: list[str] = []
        path, state = load_latest_good(copy, fresh, o, build_scheduler(o, 1, 10), None, warn=warned.append)
        assert not warned, (name, warned)  # never a corrupt-looking checkpoint: incomplete ones are invisible
        step = state["step"]
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights[step].items()), name
        steps.append(step)
    assert steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_killed_at_every_step_is_old_or_new(corpus, tmp_path):
    common = dict(inputs=(str(corpus / "corpus.txt"),), vocab=str(corpus / "vocab.txt"), max_seq_len=32,
                  dupe_factor=1, heldout_fraction=0.05)
    (tmp_path / "w").mkdir()
    old = prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "w" / "d"), seed=1, **common), log=lambda m: None)
    with snapshots(tmp_path / "w", tmp_path / "snaps") as snap:
        new = prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "w" / "d"), seed=2, **common),
                           log=lambda m: None)
    assert "prepare:piece-00000:train.tokens-written" in names(snap) and names(snap)[-5:] == SWAP_STEPS[1:]
    seen = set()
    for name, copy in snap.taken:
        d = copy / "d"
        assert prep.is_prepared(d), name
        verify_manifest(d)  # every byte as written
        meta = json.loads((d / "meta.json").read_text())
        assert meta["splits"] == {1: old, 2: new}[meta["config"]["seed"]]["splits"], name
        for split in prep.SPLITS:
            ds = PretrainingDataset(d, split)
            assert len(ds) == meta["splits"][split]["instances"]
        seen.add(meta["config"]["seed"])
    assert seen == {1, 2}


def test_prepare_sigkill_mid_write_leaves_the_old_output(corpus, tmp_path):
    out = tmp_path / "d"
    argv = [str(corpus / "corpus.txt"), "--vocab", str(corpus / "vocab.txt"), "--max-seq-len", "32",
            "--dupe-factor", "1", "--out-dir", str(out)]
    prep.main([*argv, "--seed", "1"])
    before = {p.relative_to(out): sha(p) for p in out.rglob("*") if p.is_file()}
    proc = run_python(f"import sys\nfrom train.prepare import main\nsys.exit(main({[*argv, '--seed', '2']!r}))",
                      fault="prepare:piece-00000:train.tokens-written")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {p.relative_to(out): sha(p) for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------- fine-tune output
def test_finetune_output_killed_at_every_step_is_old_or_new(tmp_path):
    from train.finetune import FinetuneConfig, finetune

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join([*specials, "good", "bad", "film"]) + "\n")
    rows = ["sentence\tlabel", *(f"{'good' if i % 2 else 'bad'} film\t{i % 2}" for i in range(16))]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(fastbert.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2).with_fusions(False))
    model.save_pretrained(tmp_path / "init")
    shutil.copy(tmp_path / "vocab.txt", tmp_path / "init" / "vocab.txt")
    (tmp_path / "w").mkdir()

    def run(seed: int) -> str:
        cfg = FinetuneConfig(task="sst2", data_dir=str(tmp_path), init=str(tmp_path / "init"), epochs=1,
                             batch_size=8, max_length=8, seed=seed, fused=False, output_dir=str(tmp_path / "w" / "o"),
                             overwrite=True, log_every=100)
        finetune(cfg, log=lambda m: None)
        return sha(tmp_path / "w" / "o" / "model" / SAFETENSORS_NAME)

    shas = {1: run(1)}
    with snapshots(tmp_path / "w", tmp_path / "snaps") as snap:
        shas[2] = run(2)
    assert "finetune:metrics.json-written" in names(snap) and names(snap)[-5:] == SWAP_STEPS[1:]
    seen = set()
    for name, copy in snap.taken:
        o = copy / "o"
        fastbert._atomic.recover(o)
        verify_manifest(o)
        seed = json.loads((o / "metrics.json").read_text())["config"]["seed"]
        assert sha(o / "model" / SAFETENSORS_NAME) == shas[seed], name  # metrics and model of one run
        assert (o / "predictions.json").is_file() and (o / "model" / "vocab.txt").is_file()
        seen.add(seed)
    assert seen == {1, 2}


@pytest.mark.parametrize("point", ["write:manifest-written", "swap:new-in-place"])
def test_sigkill_around_the_swap_of_a_prepare_output(corpus, tmp_path, point):
    """Just before the swap the old output stays; just after it, the new one is complete (the old aside copy
    is removed by the next write)."""
    out = tmp_path / "d"
    argv = [str(corpus / "corpus.txt"), "--vocab", str(corpus / "vocab.txt"), "--max-seq-len", "32",
            "--dupe-factor", "1", "--out-dir", str(out)]
    prep.main([*argv, "--seed", "1"])
    proc = run_python(f"import sys\nfrom train.prepare import main\nsys.exit(main({[*argv, '--seed', '2']!r}))",
                      fault=point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert prep.is_prepared(out)
    verify_manifest(out)
    seed = json.loads((out / "meta.json").read_text())["config"]["seed"]
    assert seed == (1 if point == "write:manifest-written" else 2)
    prep.main([*argv, "--seed", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # temporaries and the aside copy cleaned up
