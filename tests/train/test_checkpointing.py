"""Training checkpoints, piece by piece: model, optimizer (AdamW and LAMB), LR scheduler, grad scaler, the RNG
of every device, the data position — each saved, loaded into fresh objects, and shown to continue exactly;
the trainer state loads with weights_only=True; manifests, rotation by run id, fallback to a good checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from fastbert import BertConfig, BertForPreTraining
from fastbert._atomic import MANIFEST_NAME, ManifestError, verify_manifest
from train.checkpointing import (
    STATE_NAME,
    check_plain,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.dataset import StepBatchSampler
from train.optim import build_optimizer, build_scheduler

CFG = dict(vocab_size=53, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
           max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def make(optimizer: str = "adamw", seed: int = 0):
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig(**CFG).with_fusions(False))
    opt = build_optimizer(model, optimizer, 1e-2, 0.01, (0.9, 0.999), 1e-6)
    sched = build_scheduler(opt, 3, 20, 1.0)
    return model, opt, sched


def train_steps(model, opt, sched, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, CFG["vocab_size"], (3, 11), generator=g)
        labels = torch.where(torch.rand(3, 11, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[0, 1] = ids[0, 1]
        out = model(ids, torch.ones_like(ids), torch.zeros_like(ids), labels, torch.tensor([0, 1, 0]))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_model_optimizer_scheduler_round_trip_and_continue_exactly(tmp_path, optimizer):
    model, opt, sched = make(optimizer)
    train_steps(model, opt, sched, 4)
    save_checkpoint(tmp_path, 4, model, opt, sched, None, {"note": "x"}, run_id="r1")
    torch.manual_seed(123)  # the same dropout draws for both continuations (RNG states: tested below)
    train_steps(model, opt, sched, 3, seed=7)  # the uninterrupted continuation

    model2, opt2, sched2 = make(optimizer, seed=99)  # other initial weights: everything must come from the file
    state = load_checkpoint(tmp_path / "checkpoints" / "step_00000004", model2, opt2, sched2, None)
    assert state["step"] == 4 and state["run_id"] == "r1" and state["note"] == "x"
    assert sched2.last_epoch == 4 and sched2.get_last_lr() == pytest.approx(
        [g["lr"] for g in opt2.param_groups])
    for group in opt2.state.values():
        assert all(torch.isfinite(v).all() for v in group.values() if isinstance(v, torch.Tensor))
    torch.manual_seed(123)
    train_steps(model2, opt2, sched2, 3, seed=7)
    a, b = params(model), params(model2)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed model diverged from the uninterrupted one"
    assert sched.last_epoch == sched2.last_epoch


def test_grad_scaler_state_round_trips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    if not scaler.is_enabled():
        pytest.skip("GradScaler on CPU is not enabled in this torch build")
    model, opt, sched = make()
    for _ in range(3):  # growth_interval 2: the scale grows once, the tracker moves
        ids = torch.randint(0, CFG["vocab_size"], (2, 7))
        loss = model(ids, next_sentence_label=torch.tensor([0, 1])).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    save_checkpoint(tmp_path, 3, model, opt, sched, scaler, {}, run_id="r")
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0)
    model2, opt2, sched2 = make()
    load_checkpoint(tmp_path / "checkpoints" / "step_00000003", model2, opt2, sched2, fresh)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == scaler.get_scale() != 256.0


def test_rng_states_of_python_numpy_torch_round_trip(tmp_path):
    model, opt, sched = make()  # (building a model draws random numbers)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # numpy then holds a cached gaussian: that is state too
    random.gauss(0, 1)
    saved = rng_state()
    save_checkpoint(tmp_path, 1, model, opt, sched, None, {}, rng=[saved, saved], run_id="r")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(),
                torch.rand(4).tolist(), torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = read_trainer_state(tmp_path / "checkpoints" / "step_00000001")
    assert len(state["rng"]) == 2  # one per rank, as given: no second, dead "rng" entry
    set_rng_state(state["rng"][1])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(),
           torch.rand(4).tolist(), torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())
    assert got == expected


@pytest.mark.gpu
def test_cuda_rng_states_of_every_device_round_trip(tmp_path):
    torch.cuda.init()
    for d in range(torch.cuda.device_count()):
        torch.cuda.manual_seed_all(11)
        torch.rand(3, device=f"cuda:{d}")
    saved = rng_state()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    model, opt, sched = make()
    save_checkpoint(tmp_path, 1, model, opt, sched, None, {}, rng=[saved], run_id="r")
    expected = [torch.rand(5, device=f"cuda:{d}").tolist() for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(0)
    set_rng_state(read_trainer_state(tmp_path / "checkpoints" / "step_00000001")["rng"][0])
    assert [torch.rand(5, device=f"cuda:{d}").tolist() for d in range(torch.cuda.device_count())] == expected


def test_data_position_is_the_step(tmp_path):
    """The batch order after a resume is the uninterrupted one: the sampler is a pure function of the stored
    step (across an epoch boundary too)."""
    model, opt, sched = make()
    save_checkpoint(tmp_path, 7, model, opt, sched, None, {}, run_id="r")
    step = read_trainer_state(tmp_path / "checkpoints" / "step_00000007")["step"]
    straight = list(StepBatchSampler(50, 4, 2, 1, 0, seed=5, start_step=0, num_steps=12))
    resumed = list(StepBatchSampler(50, 4, 2, 1, 0, seed=5, start_step=step, num_steps=12 - step))
    assert resumed == straight[2 * step:]  # grad_accum 2 micro-batches per step; 6 steps per epoch


def test_trainer_state_loads_with_weights_only(tmp_path):
    model, opt, sched = make("lamb")
    train_steps(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, 2, model, opt, sched, None, {"config": {"lr": 1e-2, "x": None}}, run_id="r")
    state = torch.load(path / STATE_NAME, weights_only=True)  # would raise on any pickled object
    assert state["config"] == {"lr": 1e-2, "x": None} and isinstance(state["rng"][0]["python"], torch.Tensor)
    with pytest.raises(TypeError, match="only tensors, numbers, strings"):
        check_plain({"a": [1, {"b": np.zeros(2)}]})
    with pytest.raises(TypeError, match=r"state\['extra'\]"):
        save_checkpoint(tmp_path, 3, model, opt, sched, None, {"extra": object()}, run_id="r")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]  # the refused one left nothing


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path):
    model, opt, sched = make()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, None, {}, run_id="r")
    marker = tmp_path / "pwned"
    with open(path / STATE_NAME, "wb") as f:
        pickle.dump({"step": 1, "payload": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match="refused, nothing in it was run"):
        read_trainer_state(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="none of the 1 checkpoint"):
        load_latest_good(tmp_path, *make(), None, warn=lambda m: None)
    assert not marker.exists()


def test_manifest_names_the_bad_file_and_resume_falls_back(tmp_path):
    model, opt, sched = make()
    train_steps(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, model, opt, sched, None, {}, keep=0, run_id="r")
    good = params(model)
    train_steps(model, opt, sched, 1)
    newest = save_checkpoint(tmp_path, 2, model, opt, sched, None, {}, keep=0, run_id="r")
    manifest = json.loads((newest / MANIFEST_NAME).read_text())
    assert manifest["fastbert"] == "checkpoint" and manifest["step"] == 2 and manifest["run_id"] == "r"
    assert set(manifest["files"]) == {STATE_NAME, "model/" + MANIFEST_NAME}
    data = (newest / STATE_NAME).read_bytes()
    (newest / STATE_NAME).write_bytes(data[: len(data) // 2])  # truncated, as a full disk leaves it
    with pytest.raises(ManifestError, match=f"{STATE_NAME} has {len(data) // 2} bytes"):
        verify_manifest(newest)

    warnings: list[str] = []
    model2, opt2, sched2 = make(seed=5)
    path, state = load_latest_good(tmp_path, model2, opt2, sched2, None, warn=warnings.append)
    assert path.name == "step_00000001" and state["step"] == 1
    assert len(warnings) == 1 and str(newest / STATE_NAME) in warnings[0] and "previous" in warnings[0]
    b = params(model2)
    assert all(torch.equal(good[k], b[k]) for k in good)

    # The model inside the older one corrupt too (one flipped byte): none is good, one line naming the newest.
    weights = path / "model" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="none of the 2 checkpoint") as e:
        load_latest_good(tmp_path, *make(), None, warn=lambda m: None)
    assert "\n" not in str(e.value) and STATE_NAME in str(e.value)


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    model, opt, sched = make()
    for step in (100, 200):
        save_checkpoint(tmp_path, step, model, opt, sched, None, {}, keep=2, run_id="old")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, None, {}, keep=2, run_id="new")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003", "step_00000100", "step_00000200"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
