"""Bad inputs and configs raise clear errors; config.json round-trips; fully padded rows stay finite."""

from __future__ import annotations

import json

import pytest
import torch

import fastbert
from fastbert.config import FUSION_FLAGS
from tests.helpers import require

REFERENCE = {flag: False for flag in FUSION_FLAGS}
SMALL = dict(vocab_size=211, hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=200,
             max_position_embeddings=64, type_vocab_size=2, **REFERENCE)


@pytest.fixture(scope="module")
def model() -> fastbert.BertModel:
    torch.manual_seed(0)
    return fastbert.BertModel(fastbert.BertConfig(**SMALL)).eval()


def ids_and_mask(B: int = 3, T: int = 37):
    ids = torch.randint(0, 211, (B, T))
    return ids, torch.ones(B, T, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- model inputs
def test_float_ids(model):
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="int64 or int32 token ids, got torch.float32"):
        model(ids.float(), mask)


def test_sequence_longer_than_positions(model):
    ids, mask = ids_and_mask(T=65)
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings \\(64\\)"):
        model(ids, mask)


def test_mask_shape_mismatch(model):
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="attention_mask has shape \\(3, 36\\) but input_ids has \\(3, 37\\)"):
        model(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(ids, mask, token_type_ids=torch.zeros(3, 1, dtype=torch.long))


def test_additive_mask_rejected(model):
    ids, mask = ids_and_mask()
    additive = (1.0 - mask.float()) * -10000.0
    additive[0, 30:] = -10000.0
    with pytest.raises(ValueError, match="1 for real tokens and 0 for padding"):
        model(ids, additive)


@pytest.mark.parametrize("bad", [-1, 211])
def test_ids_out_of_range(model, bad):
    ids, mask = ids_and_mask()
    ids[1, 5] = bad
    with pytest.raises(ValueError, match="input_ids must lie in \\[0, vocab_size=211\\)"):
        model(ids, mask)


def test_token_types_out_of_range(model):
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        model(ids, mask, token_type_ids=torch.full_like(ids, 2))


def test_ids_not_2d(model):
    with pytest.raises(ValueError, match="\\[batch, seq_len\\]"):
        model(torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- configs
def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden_size \\(100\\) is not divisible by num_attention_heads \\(3\\)"):
        fastbert.BertConfig(hidden_size=100, num_attention_heads=3)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        fastbert.BertConfig.from_preset("huge")
    assert fastbert.BertConfig.from_preset("tiny", num_labels=3).hidden_size == 128


def test_bad_hidden_act():
    with pytest.raises(ValueError, match="hidden_act must be one of .* got 'swish'"):
        fastbert.BertConfig(hidden_act="swish")


def test_config_json_round_trip(tmp_path):
    transformers = require("transformers")
    hf_dict = json.loads((require("minilm") / "config.json").read_text())
    cfg = fastbert.BertConfig.from_dict(hf_dict)
    d = cfg.to_dict()
    hf = transformers.BertConfig(**d)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id"):
        assert getattr(hf, key) == hf_dict[key] == getattr(cfg, key), key
    assert hf.num_labels == cfg.num_labels
    assert fastbert.BertConfig.from_dict(d) == cfg
    assert fastbert.BertConfig.from_dict(hf.to_dict()) == cfg  # and back from transformers' own dict
    cfg.to_json_file(tmp_path / "config.json")
    assert fastbert.BertConfig.from_json_file(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        fastbert.BertConfig.from_dict({**hf_dict, "model_type": "roberta"})


# ---------------------------------------------------------------------------------------------- padded rows
# fp16 and bf16 always run: torch >= 2.1 has CPU kernels for every op of the reference encoder in both (an
# op that lacks one fails the test, it is not dropped).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fully_padded_row_is_finite(dtype):
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**SMALL)).to(dtype).eval()
    ids, mask = ids_and_mask(B=4, T=37)
    mask[1] = 0  # fully padded
    mask[2, 20:] = 0
    hidden, pooled = model(ids, mask)
    assert hidden.dtype == dtype
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    if dtype == torch.float32:
        hidden.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
