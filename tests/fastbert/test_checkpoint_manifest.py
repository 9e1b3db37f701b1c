"""save_pretrained is folder-atomic with a manifest: the loader verifies the files it reads and names the one
that differs; a folder holding anything but a saved model is not replaced without overwrite=True."""

from __future__ import annotations

import json

import pytest
import torch

import fastbert
from fastbert._atomic import MANIFEST_NAME, ManifestError, read_manifest
from fastbert.checkpoint import CONFIG_NAME, SAFETENSORS_NAME, save_pretrained

SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=1, intermediate_size=64, max_position_embeddings=32)


def model(heads: int, seed: int) -> fastbert.BertModel:
    torch.manual_seed(seed)
    return fastbert.BertModel(fastbert.BertConfig(**SMALL, num_attention_heads=heads))


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    model(12, 0).save_pretrained(tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    assert manifest["fastbert"] == "model" and set(manifest["files"]) == {CONFIG_NAME, SAFETENSORS_NAME}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (tmp_path / "m" / name).stat().st_size and len(entry["sha256"]) == 64


def test_new_config_over_old_weights_is_refused_naming_the_file(tmp_path):
    """The mix a kill between the two file replacements used to leave: a 16-head config beside 12-head weights
    (same shapes, so it loaded without a word)."""
    model(12, 0).save_pretrained(tmp_path / "a")
    model(16, 1).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / CONFIG_NAME).write_bytes((tmp_path / "b" / CONFIG_NAME).read_bytes())
    with pytest.raises(ManifestError, match=f"{CONFIG_NAME} has .* bytes|{CONFIG_NAME} does not match") as e:
        fastbert.BertModel.from_pretrained(tmp_path / "a")
    assert str(tmp_path / "a" / CONFIG_NAME) in str(e.value)
    weights = bytearray((tmp_path / "b" / SAFETENSORS_NAME).read_bytes())
    weights[-3] ^= 0x01  # one bit, same size: only the sha256 sees it
    (tmp_path / "b" / SAFETENSORS_NAME).write_bytes(bytes(weights))
    with pytest.raises(ManifestError, match=f"{SAFETENSORS_NAME} does not match the sha256"):
        fastbert.BertModel.from_pretrained(tmp_path / "b")


def test_explicit_config_skips_the_config_file_but_not_the_weights(tmp_path):
    model(12, 0).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{}")
    loaded = fastbert.BertModel.from_pretrained(tmp_path, config=fastbert.BertConfig(**SMALL, num_attention_heads=12))
    assert loaded.config.num_attention_heads == 12
    (tmp_path / SAFETENSORS_NAME).write_bytes(b"")
    with pytest.raises(ManifestError, match="has 0 bytes"):
        fastbert.BertModel.from_pretrained(tmp_path, config=fastbert.BertConfig(**SMALL, num_attention_heads=12))


def test_corrupt_manifest_is_named(tmp_path):
    model(12, 0).save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"files": ')
    with pytest.raises(ManifestError, match=f"{MANIFEST_NAME} is corrupt"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_foreign_folder_is_not_replaced_without_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a saved model \(notes.txt\)"):
        model(12, 0).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    save_pretrained(model(12, 0), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, MANIFEST_NAME, SAFETENSORS_NAME]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_pretrained(model(12, 0), tmp_path / "f")


def test_a_hugging_face_folder_is_replaced_but_not_the_users_extra_files(tmp_path):
    """A folder of config.json + model.safetensors (as transformers writes it, no manifest) is a saved model:
    replaced. A file save_pretrained did not write (a tokenizer the user put there) stops it."""
    model(12, 0).save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    model(16, 1).save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["num_attention_heads"] == 16
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        model(12, 2).save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_text() == "[PAD]\n"
    # A model saved with its tokenizer (listed in the manifest) is replaced whole.
    save_pretrained(model(12, 0), tmp_path / "t", extra_files=lambda d: (d / "vocab.txt").write_text("[CLS]\n"))
    model(16, 1).save_pretrained(tmp_path / "t")
    assert not (tmp_path / "t" / "vocab.txt").exists()
