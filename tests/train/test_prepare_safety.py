"""fastbert-prepare's output side: the manifest it writes, a document that is one giant "sentence", the sizes check
that names a truncated shard, and data of an older format refused by name and remade (the refusal rules are in
tests/reliability/test_why_scenarios.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastbert._atomic import MANIFEST_NAME, ManifestError
from tests.train.prepared_data import read_split
from train import distributed
from train import instances as inst
from train import prepare as prep
from train.pieces import plan_pieces, read_piece
from train.shards import ARRAYS, shard_path

WORDS = [f"w{i}" for i in range(30)]


def write_inputs(root, giant_words: int):
    (root / "vocab.txt").write_text("\n".join([*prep.SPECIAL_TOKENS, *WORDS, "."]) + "\n")
    docs = [" ".join(WORDS[k % 30] for k in range(giant_words))]  # no full stop: one "sentence"
    docs += ["\n".join(f"{WORDS[(i + j) % 30]} {WORDS[(i + 2 * j) % 30]} ." for j in range(6)) for i in range(8)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")


def small_config(root, **kw) -> prep.PrepareConfig:
    return prep.PrepareConfig(out_dir=str(root / "d"), inputs=(str(root / "corpus.txt"),),
                              vocab=str(root / "vocab.txt"), max_seq_len=32, dupe_factor=1, heldout_fraction=0, **kw)


def test_one_giant_sentence_is_cut_into_pieces_not_dropped(tmp_path):
    write_inputs(tmp_path, 300)
    said = []
    meta = prep.prepare(small_config(tmp_path, short_seq_prob=0.0), log=said.append)
    assert any("1 sentence(s) longer than 29 tokens" in m and "cut into 11 pieces" in m for m in said), said
    assert meta["notes"]["long_sentences"] == 1 and meta["notes"]["long_sentence_pieces"] == 11
    assert len(read_split(tmp_path / "d", "train")["len_a"]) == meta["splits"]["train"]["instances"]
    # Uncut (as before), the giant sentence fills one instance of <= 29 tokens and the other ~270 are dropped;
    # cut, its pieces make instances of their own.
    tok = prep.load_tokenizer(tmp_path / "vocab.txt", True)
    texts = [d for piece in plan_pieces([tmp_path / "corpus.txt"], 1 << 20) for d, _ in read_piece(piece)]

    def kept(max_sentence_tokens):
        docs = inst.TokenDocs()
        for d in inst.tokenize_documents(tok, texts, max_sentence_tokens):
            docs.add(d)
        return sum(a1 - a0 + b1 - b0 for a0, a1, b0, b1, _ in inst.create_instances(docs, 32, 1, 0.0,
                                                                                     random.Random(0)))

    uncut, cut = kept(None), kept(29)
    assert cut > uncut + 150, (uncut, cut)


def test_tokenize_documents_cuts_long_sentences(tmp_path):
    write_inputs(tmp_path, 10)
    tok = prep.load_tokenizer(tmp_path / "vocab.txt", True)
    stats: dict = {}
    docs = inst.tokenize_documents(tok, [["w1 w2 w3 w4 w5 w6 w7", "w8 ."], [], ["."]], 3, stats)
    assert [len(s) for s in docs[0]] == [3, 3, 1, 2] and stats == {"long_sentences": 1, "long_sentence_pieces": 3}
    assert [t for s in docs[0][:3] for t in s] == inst.tokenize_documents(tok, [["w1 w2 w3 w4 w5 w6 w7"]])[0][0]
    assert docs[1] == [] and len(docs[2]) == 1  # one entry per document, empty ones included


def test_manifest_is_written_and_sizes_are_checked(tmp_path):
    write_inputs(tmp_path, 20)
    prep.prepare(small_config(tmp_path, piece_mb=0.0002), log=lambda m: None)
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert manifest["fastbert"] == "prepared-data" and manifest["format_version"] == prep.FORMAT_VERSION == 3
    names = [s["name"] for split in prep.SPLITS for s in meta["splits"][split]["shards"]]
    assert len(names) == 2 * len(plan_pieces([tmp_path / "corpus.txt"], int(0.0002 * (1 << 20)))) > 2
    assert set(manifest["files"]) == {"meta.json", "vocab.txt"} | {
        shard_path(".", name, a).as_posix() for name in names for a in ARRAYS}
    offsets = shard_path(tmp_path / "d", "train-00001", "offsets")
    offsets.write_bytes(offsets.read_bytes()[:-8])
    with pytest.raises(ManifestError, match="shards/train-00001.offsets.npy has .* bytes, its manifest says"):
        prep.is_prepared(tmp_path / "d")


def test_data_of_an_older_format_is_refused_by_name_and_prepared_again(tmp_path, monkeypatch):
    """Format 2 (one file set per split) and 1 are refused by name; prepare replaces its own older output, and
    the pretraining's cache of the embedded corpus is prepared again by itself."""
    from train import pretrain

    write_inputs(tmp_path, 20)
    d = tmp_path / "d"
    cfg = small_config(tmp_path)
    prep.prepare(cfg, log=lambda m: None)
    meta = (d / "meta.json").read_text()
    key = '"format_version": 3'
    assert key in meta
    for old in (2, 1):
        (d / "meta.json").write_text(meta.replace(key, f'"format_version": {old}'))  # same size: manifest agrees
        assert not prep.is_prepared(d) and prep.data_format(d) == old
        with pytest.raises(ValueError, match=rf"prepared by another fastbert version \(data format {old}; this one "
                                             r"reads 3\)"):
            pretrain.ensure_data(pretrain.PretrainConfig(data_dir=str(d)), None)
    prep.prepare(cfg, log=lambda m: None)  # its own earlier output: replaced without --overwrite
    assert prep.is_prepared(d) and (d / "shards").is_dir()

    # The embedded corpus's cache (what `make pretrain` uses) in format 2: ensure_data prepares it again.
    cache = tmp_path / "cache" / "wiki-T64-dupe1-vocab4096"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text('{"format_version": 2}')
    calls = []
    monkeypatch.setattr(pretrain, "prepare", lambda c: calls.append(c))
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    path = pretrain.ensure_data(pretrain.PretrainConfig(data_cache=str(tmp_path / "cache"), max_seq_len=64,
                                                        dupe_factor=1, vocab_size=4096), info)
    assert path == cache and [(c.out_dir, c.max_seq_len, c.vocab_size) for c in calls] == [(str(cache), 64, 4096)]
