"""A non-finite loss says what it saw: at the first step (the starting weights or the data, not the lr), or
after some finite steps at a given lr (training diverged), or labels holding NaN (fine-tuning)."""

from __future__ import annotations

import math

import pytest
import torch

import fastbert
from train.finetune import nan_loss_message
from train.pretrain import PretrainConfig, pretrain

from .conftest import MICRO


def test_pretrain_nan_at_the_first_step_blames_the_start_not_the_lr(corpus, tmp_path):
    cfg = fastbert.BertConfig(vocab_size=47, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64)
    model = fastbert.BertForPreTraining(cfg)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.fill_(math.nan)
    model.save_pretrained(tmp_path / "nan-model")
    opts = dict(MICRO, data_dir=str(corpus / "data"), max_steps=4, log_every=2, eval_every=0,
                init_from=str(tmp_path / "nan-model"))
    with pytest.raises(FloatingPointError, match=r"not finite at step 1, the first step of this run, before any "
                                                 r"update: the starting weights \(the weights from --init-from"):
        pretrain(PretrainConfig(**opts, out_dir=str(tmp_path / "run")))
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # no checkpoint of NaN weights


def test_pretrain_divergence_names_the_step_and_the_lr(corpus, tmp_path):
    opts = dict(MICRO, data_dir=str(corpus / "data"), max_steps=40, log_every=40, eval_every=0, lr=1e9,
                warmup_steps=0, clip_grad_norm=0.0, checkpoint_every=0)
    with pytest.raises(FloatingPointError, match=r"not finite at step (\d+), after \d+ finite step\(s\) of this "
                                                 r"run, at lr .*: training diverged; lower --lr") as e:
        pretrain(PretrainConfig(**opts, out_dir=str(tmp_path / "run")))
    assert "step 1," not in str(e.value)


def test_finetune_messages():
    nan_labels = {"labels": torch.tensor([0.5, math.nan])}
    assert "labels hold NaN or inf (the data is at fault)" in nan_loss_message(math.nan, 3, nan_labels, 1e-3)
    assert "at the first step, before any update" in nan_loss_message(math.nan, 0, {"labels": torch.tensor([1])}, 1)
    assert "after 7 finite step(s), at lr 0.002: lower --lr" in nan_loss_message(math.inf, 7, {}, 2e-3)
