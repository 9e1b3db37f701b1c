"""Checkpoint load/save: exact round trips through `transformers`, cross-model loading, clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastbert
from fastbert._atomic import MANIFEST_NAME
from fastbert.checkpoint import CONFIG_NAME, PYTORCH_NAME, SAFETENSORS_NAME
from fastbert.config import FUSION_FLAGS
from tests.helpers import require

transformers = require("transformers")

SMALL = dict(vocab_size=211, hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=200,
             max_position_embeddings=64)


def small_model(cls_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small model whose every tensor is random (biases and LayerNorms too), so equality means something."""
    torch.manual_seed(seed)
    model = getattr(fastbert, cls_name)(fastbert.BertConfig(**{**SMALL, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def load_quietly(cls, folder, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = cls.from_pretrained(folder, **kw)
    return model, [str(w.message) for w in record if str(w.message).startswith("loading ")]


@pytest.mark.parametrize(
    "cls_name, overrides",
    [
        ("BertForPreTraining", {}),
        ("BertModel", {}),
        ("BertForMaskedLM", {}),
        ("BertForSequenceClassification", {"num_labels": 3}),
        ("BertForQuestionAnswering", {}),
    ],
)
def test_round_trip_through_transformers_is_exact(tmp_path, monkeypatch, cls_name, overrides):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = small_model(cls_name, **overrides)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [CONFIG_NAME, MANIFEST_NAME, SAFETENSORS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # no temporary folders left beside it

    theirs, info = getattr(transformers, cls_name).from_pretrained(
        tmp_path / "ours", output_loading_info=True, local_files_only=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs_state = theirs.state_dict()
    for key, t in ours.state_dict().items():
        assert torch.equal(theirs_state[key], t), key
    if cls_name in ("BertForPreTraining", "BertForMaskedLM"):
        assert theirs.cls.predictions.decoder.weight is theirs.bert.embeddings.word_embeddings.weight

    theirs.save_pretrained(tmp_path / "theirs")
    back, messages = load_quietly(getattr(fastbert, cls_name), tmp_path / "theirs")
    assert not messages, messages
    assert back.config == ours.config
    back_state = back.state_dict()
    assert back_state.keys() == ours.state_dict().keys()
    for key, t in ours.state_dict().items():
        assert torch.equal(back_state[key], t), key
    if cls_name in ("BertForPreTraining", "BertForMaskedLM"):
        assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
        assert back.cls.predictions.bias is back.cls.predictions.decoder.bias


def test_saved_file_stores_tied_tensors_once(tmp_path):
    small_model("BertForPreTraining").save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / SAFETENSORS_NAME)).keys()
    assert "cls.predictions.decoder.weight" not in keys and "cls.predictions.decoder.bias" not in keys
    assert "cls.predictions.bias" in keys and "bert.embeddings.word_embeddings.weight" in keys
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    assert not set(FUSION_FLAGS) & config.keys()


def test_base_checkpoint_loads_into_heads_and_back(tmp_path):
    base = small_model("BertModel")
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="freshly initialised") as record:
        pre = fastbert.BertForPreTraining.from_pretrained(tmp_path / "base")
    message = str(record[0].message)
    for head in ("cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"):
        assert head in message
    assert "bert.embeddings" not in message and "cls.predictions.decoder.weight" not in message
    for key, t in base.state_dict().items():
        assert torch.equal(pre.state_dict()["bert." + key], t), key
    assert pre.cls.predictions.decoder.weight is pre.bert.embeddings.word_embeddings.weight
    assert not pre.training

    pre.save_pretrained(tmp_path / "pre")
    with pytest.warns(UserWarning, match="in the file but unused") as record:
        back = fastbert.BertModel.from_pretrained(tmp_path / "pre")
    assert "cls.seq_relationship.weight" in str(record[0].message)
    for key, t in base.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key


def test_minilm_loads_into_task_models():
    folder = require("minilm")
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = fastbert.BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert model.config.hidden_size == 384 and model.classifier.out_features == 2
    raw = load_file(str(folder / SAFETENSORS_NAME))
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, raw["encoder.layer.5.output.dense.weight"])


def test_legacy_pytorch_bin_with_tf_names(tmp_path):
    """pytorch_model.bin, `bert.` prefix, LayerNorm gamma/beta, a stored decoder weight and position_ids."""
    ours = small_model("BertForPreTraining")
    legacy = {}
    for key, t in ours.state_dict().items():
        if key == "cls.predictions.decoder.bias":
            continue  # old files stored the bias once, as cls.predictions.bias
        if "LayerNorm." in key:
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[key] = t.clone()
    legacy["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(legacy, tmp_path / PYTORCH_NAME)
    ours.config.to_json_file(tmp_path / CONFIG_NAME)

    back, messages = load_quietly(fastbert.BertForPreTraining, tmp_path)
    assert not messages, messages
    for key, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key


def test_config_overrides_and_explicit_config(tmp_path):
    small_model("BertModel").save_pretrained(tmp_path)
    model = fastbert.BertModel.from_pretrained(tmp_path, hidden_dropout_prob=0.0, fused_attention=False)
    assert model.config.hidden_dropout_prob == 0.0 and not model.config.fused_attention
    (tmp_path / CONFIG_NAME).unlink()
    model = fastbert.BertModel.from_pretrained(tmp_path, config=fastbert.BertConfig(**SMALL))
    assert model.config.hidden_size == 96
    with pytest.raises(ValueError, match="unknown config override"):
        fastbert.BertModel.from_pretrained(tmp_path, config=fastbert.BertConfig(**SMALL), hiden_size=3)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    small_model("BertModel", seed=1).save_pretrained(tmp_path)
    before = (tmp_path / SAFETENSORS_NAME).read_bytes()

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("fastbert.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        small_model("BertModel", seed=2).save_pretrained(tmp_path)
    assert (tmp_path / SAFETENSORS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, MANIFEST_NAME, SAFETENSORS_NAME]


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path) -> Path:
    """A folder as `transformers` writes it: no fastbert manifest, so the loader's own checks are what is tested
    (tests/fastbert/test_checkpoint_manifest.py covers the manifest)."""
    small_model("BertModel").save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        fastbert.BertModel.from_pretrained(tmp_path / "nope")


def test_missing_config(saved):
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        fastbert.BertModel.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / SAFETENSORS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        fastbert.BertModel.from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / SAFETENSORS_NAME).read_bytes()
    (saved / SAFETENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        fastbert.BertModel.from_pretrained(saved)


def test_corrupt_pytorch_bin(saved):
    (saved / SAFETENSORS_NAME).unlink()
    (saved / PYTORCH_NAME).write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ValueError, match="corrupt"):
        fastbert.BertModel.from_pretrained(saved)


def test_invalid_json_config(saved):
    (saved / CONFIG_NAME).write_text('{"hidden_size": 96,')
    with pytest.raises(ValueError, match="not valid JSON"):
        fastbert.BertModel.from_pretrained(saved)


def test_config_and_weights_disagree(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["intermediate_size"] = 128
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        fastbert.BertModel.from_pretrained(saved)
    msg = str(e.value)
    assert "encoder.layer.0.intermediate.dense.weight: file (200, 96) vs config (128, 96)" in msg, msg


def test_not_a_bert_checkpoint(saved):
    torch.save({"foo.weight": torch.zeros(3)}, saved / PYTORCH_NAME)
    (saved / SAFETENSORS_NAME).unlink()
    with pytest.raises(ValueError, match="is this a BERT checkpoint"):
        fastbert.BertModel.from_pretrained(saved)
