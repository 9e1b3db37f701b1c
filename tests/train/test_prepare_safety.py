"""fastbert-prepare's output side: the manifest it writes, a document that is one giant "sentence", and the
sizes check that names a truncated array (the refusal rules are in tests/reliability/test_why_scenarios.py)."""

from __future__ import annotations

import json
import random

import pytest

from fastbert._atomic import MANIFEST_NAME, ManifestError
from train import prepare as prep
from train.dataset import PretrainingDataset

WORDS = [f"w{i}" for i in range(30)]


def write_inputs(root, giant_words: int):
    (root / "vocab.txt").write_text("\n".join([*prep.SPECIAL_TOKENS, *WORDS, "."]) + "\n")
    docs = [" ".join(WORDS[k % 30] for k in range(giant_words))]  # no full stop: one "sentence"
    docs += ["\n".join(f"{WORDS[(i + j) % 30]} {WORDS[(i + 2 * j) % 30]} ." for j in range(6)) for i in range(8)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")


def test_one_giant_sentence_is_cut_into_pieces_not_dropped(tmp_path):
    write_inputs(tmp_path, 300)
    said = []
    meta = prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "d"), inputs=(str(tmp_path / "corpus.txt"),),
                                           vocab=str(tmp_path / "vocab.txt"), max_seq_len=32, dupe_factor=1,
                                           heldout_fraction=0, short_seq_prob=0.0), log=said.append)
    assert any("1 sentence(s) longer than 29 tokens" in m and "cut into 11 pieces" in m for m in said), said
    assert len(PretrainingDataset(tmp_path / "d", "train")) == meta["splits"]["train"]["instances"]
    # Uncut (as before), the giant sentence fills one instance of <= 29 tokens and the other ~270 are dropped;
    # cut, its pieces make instances of their own.
    tok = prep.Tokenizer.from_file(tmp_path / "vocab.txt").backend_tokenizer
    texts = prep.read_documents([str(tmp_path / "corpus.txt")])

    def kept(max_sentence_tokens):
        docs = prep.tokenize_documents(tok, texts, max_sentence_tokens)
        instances = prep.create_instances(docs, 32, 1, 0.0, random.Random(0))
        return sum(len(a) + len(b) for a, b, _ in instances)

    uncut, cut = kept(None), kept(29)
    assert cut > uncut + 150, (uncut, cut)


def test_tokenize_documents_cuts_long_sentences(tmp_path):
    write_inputs(tmp_path, 10)
    tok = prep.Tokenizer.from_file(tmp_path / "vocab.txt").backend_tokenizer
    stats: dict = {}
    docs = prep.tokenize_documents(tok, [["w1 w2 w3 w4 w5 w6 w7", "w8 ."]], 3, stats)
    assert [len(s) for s in docs[0]] == [3, 3, 1, 2] and stats == {"split_sentences": 1, "split_pieces": 3}
    assert [t for s in docs[0][:3] for t in s] == prep.tokenize_documents(tok, [["w1 w2 w3 w4 w5 w6 w7"]])[0][0]


def test_manifest_is_written_and_sizes_are_checked(tmp_path):
    write_inputs(tmp_path, 20)
    cfg = prep.PrepareConfig(out_dir=str(tmp_path / "d"), inputs=(str(tmp_path / "corpus.txt"),),
                             vocab=str(tmp_path / "vocab.txt"), max_seq_len=32, dupe_factor=1, heldout_fraction=0)
    prep.prepare(cfg, log=lambda m: None)
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    assert manifest["fastbert"] == "prepared-data" and manifest["format_version"] == prep.FORMAT_VERSION
    assert set(manifest["files"]) == {"meta.json", "vocab.txt"} | {
        f"{s}.{a}.npy" for s in prep.SPLITS for a in ("tokens", "offsets", "len_a", "is_random_next")}
    offsets = tmp_path / "d" / "train.offsets.npy"
    offsets.write_bytes(offsets.read_bytes()[:-8])
    with pytest.raises(ManifestError, match="train.offsets.npy has .* bytes, its manifest says"):
        prep.is_prepared(tmp_path / "d")


def test_data_of_an_older_format_is_refused_by_name_and_prepared_again(tmp_path):
    """Format 1 data was paired by the earlier NSP rule: the loaders name the version, prepare replaces it."""
    from train.pretrain import PretrainConfig, ensure_data

    write_inputs(tmp_path, 20)
    d = tmp_path / "d"
    cfg = prep.PrepareConfig(out_dir=str(d), inputs=(str(tmp_path / "corpus.txt"),), vocab=str(tmp_path / "vocab.txt"),
                             max_seq_len=32, dupe_factor=1, heldout_fraction=0)
    prep.prepare(cfg, log=lambda m: None)
    meta = (d / "meta.json").read_text()
    key = f'"format_version": {prep.FORMAT_VERSION}'
    assert key in meta and prep.FORMAT_VERSION == 2
    (d / "meta.json").write_text(meta.replace(key, '"format_version": 1'))  # same size: the manifest still agrees
    assert not prep.is_prepared(d)
    with pytest.raises(ValueError, match="format version 1 is not 2; prepare the data again"):
        PretrainingDataset(d, "train")
    with pytest.raises(ValueError, match=r"prepared by another fastbert version \(data format 1; this one reads 2\)"):
        ensure_data(PretrainConfig(data_dir=str(d)), None)
    prep.prepare(cfg, log=lambda m: None)  # its own earlier output: replaced without --overwrite
    assert prep.is_prepared(d) and len(PretrainingDataset(d, "train")) > 0
