"""Pretraining data: sentence splitting, instance creation (Google's rules), the sharded format read back with
numpy, the embedded corpus prepared in pieces against the one-piece figures, and clear errors on bad input
(the loader, its masking and the batch order: test_dataset.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.helpers import require
from tests.train.prepared_data import MARKER_BASE, instances, read_split, write_corpus, write_vocab
from train import instances as inst
from train import prepare as prep
from train.pieces import split_sentences
from train.shards import ARRAYS, FORMAT_VERSION, shard_path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 documents of ~300 bytes prepared at T = 48 in pieces of 3 KB (12 shards per split)."""
    root = tmp_path_factory.mktemp("prep")
    write_vocab(root / "vocab.txt", 120)
    write_corpus(root / "corpus.txt", 120)
    cfg = prep.PrepareConfig(out_dir=str(root / "data"), inputs=(str(root / "corpus.txt"),),
                             vocab=str(root / "vocab.txt"), max_seq_len=48, dupe_factor=3, heldout_fraction=0.1,
                             piece_mb=3 / 1024, workers=1)
    meta = prep.prepare(cfg, log=lambda m: None)
    return root, meta


def token_docs(docs) -> inst.TokenDocs:
    out = inst.TokenDocs()
    for d in docs:
        out.add(d)
    return out


def as_lists(docs: inst.TokenDocs, instances_) -> list[tuple[list[int], list[int], bool]]:
    toks = docs.tokens.tolist()
    return [(toks[a0:a1], toks[b0:b1], r) for a0, a1, b0, b1, r in instances_]


# ---------------------------------------------------------------------------------------------- sentences
def test_split_sentences_rules():
    text = ('2001: A Space Odyssey is a film by Stanley Kubrick, who wrote it with Arthur C. Clarke.  Its plot '
            'was inspired by "The Sentinel" (1951). The U.S. Navy, e.g. Mr. Smith, went home! Did he? "Yes." '
            'Then 3 more came.')
    assert split_sentences(text) == [
        "2001: A Space Odyssey is a film by Stanley Kubrick, who wrote it with Arthur C. Clarke.",
        'Its plot was inspired by "The Sentinel" (1951).',
        "The U.S. Navy, e.g. Mr. Smith, went home!",
        "Did he?",
        '"Yes."',
        "Then 3 more came.",
    ]
    assert split_sentences("   ") == []
    assert split_sentences("no final stop") == ["no final stop"]


# ---------------------------------------------------------------------------------------------- instances
def test_instances_invariants(corpus):
    root, meta = corpus
    data = root / "data"
    assert meta["format_version"] == FORMAT_VERSION == 3 and meta["max_seq_len"] == 48
    assert meta["special_ids"]["[CLS]"] == 2
    assert (data / "vocab.txt").read_text() == (root / "vocab.txt").read_text()
    for split in prep.SPLITS:
        shards = meta["splits"][split]["shards"]
        assert len(shards) > 10 and [s["name"] for s in shards] == [f"{split}-{k:05d}" for k in range(len(shards))]
        s = read_split(data, split)
        lengths = np.diff(s["offsets"])
        assert len(s["len_a"]) == meta["splits"][split]["instances"] == sum(x["instances"] for x in shards) > 0
        assert len(s["tokens"]) == meta["splits"][split]["tokens"]
        assert int(s["is_random_next"].sum()) == meta["splits"][split]["random_next"]
        assert np.all(s["len_a"] >= 1) and np.all(lengths - s["len_a"] >= 1)  # both segments non-empty
        assert lengths.max() <= 48 - 3  # room for [CLS] and two [SEP]
        assert s["tokens"].dtype == np.uint16 and s["offsets"].dtype == np.int64 and s["len_a"].dtype == np.int32
    # Most instances fill the length; short_seq_prob=0.1 (plus document ends) makes some shorter.
    lengths = np.diff(read_split(data, "train")["offsets"])
    assert 0.5 < np.mean(lengths >= 40) < 0.97


def test_nsp_pairs_come_from_the_right_documents(corpus):
    root, meta = corpus
    pairs = instances(root / "data", "train")
    same_doc_for_continuation = 0

    def markers(segment):
        return {t - MARKER_BASE for t in segment if MARKER_BASE <= t < MARKER_BASE + 120}

    for a, b, is_random in pairs:
        docs_a, docs_b = markers(a), markers(b)
        assert len(docs_a) <= 1  # A is consecutive text of one document
        if not is_random and docs_a and docs_b:
            assert docs_a == docs_b  # the true continuation comes from the same document
            same_doc_for_continuation += 1
        if is_random and docs_a and docs_b:
            assert docs_a != docs_b  # a random B comes from another document (of the same piece)
    assert same_doc_for_continuation > len(pairs) // 4
    # Above half: a document's last chunk is often one sentence, which always takes a random B.
    share = np.mean([r for _, _, r in pairs])
    assert 0.5 < share < 0.7, share


# A second port of Google's create_pretraining_data.py selection rules, written separately from the package's
# (per-document target length; chunk to target; A = first a_end sentences; random B with p = 1/2 or always for a
# one-sentence chunk, unused sentences put back; trim the longer side at a random end).
def google_pairs(docs, max_seq_len, short_seq_prob, rng):
    out = []
    for d, doc in enumerate(docs):
        room = max_seq_len - 3
        target = rng.randint(2, room) if rng.random() < short_seq_prob else room
        start = 0
        while start < len(doc):
            end, size = start, 0
            while end < len(doc):  # take sentences until the target is reached or the document ends
                size += len(doc[end])
                end += 1
                if size >= target:
                    break
            chunk = doc[start:end]
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
            a = sum(chunk[:a_end], [])
            if len(chunk) == 1 or rng.random() < 0.5:
                other = d
                for _ in range(10):
                    other = rng.randint(0, len(docs) - 1)
                    if other != d:
                        break
                b, k = [], rng.randint(0, len(docs[other]) - 1)
                while k < len(docs[other]) and len(b) < target - len(a) or not b:
                    b += docs[other][k]
                    k += 1
                random_next, start = True, start + a_end  # the rest of the chunk is put back
            else:
                b, random_next, start = sum(chunk[a_end:], []), False, end
            while len(a) + len(b) > room:
                side = a if len(a) > len(b) else b
                side.pop(0 if rng.random() < 0.5 else -1)
            out.append((a, b, random_next))
    return out


def short_token_documents(n_docs, seed):
    """Token documents like lead paragraphs: 1-6 sentences of 3-30 tokens (id = document, to trace B)."""
    rng = random.Random(seed)
    return [[[d] * rng.randint(3, 30) for _ in range(rng.randint(1, 6))] for d in range(n_docs)]


def pair_statistics(pairs, room):
    lengths = np.array([len(a) + len(b) for a, b, _ in pairs])
    rand = np.array([r for _, _, r in pairs], dtype=float)
    return {"n": len(pairs), "random_next": rand.mean(), "mean_len": lengths.mean(), "len_sd": lengths.std(),
            "full": np.mean(lengths == room)}


def test_instances_follow_google_selection_rules_in_distribution():
    docs = short_token_documents(600, seed=1)
    T = 64
    flat = token_docs(docs)

    def ours(seed, split_single_sentence=False):
        return as_lists(flat, inst.create_instances(flat, T, 1, 0.1, random.Random(seed), split_single_sentence))

    mine = [p for s in range(4) for p in ours(100 + s)]
    theirs = [p for s in range(4) for p in google_pairs(docs, T, 0.1, random.Random(200 + s))]
    a, b = pair_statistics(mine, T - 3), pair_statistics(theirs, T - 3)
    # The instance counts differ only through the random draws: within a few percent.
    assert abs(a["n"] - b["n"]) < 0.03 * b["n"], (a["n"], b["n"])
    # Random-next fraction: two binomial estimates, 4 standard errors of their difference (instances of a
    # document are correlated, hence the generous factor).
    p = (a["random_next"] + b["random_next"]) / 2
    se = np.sqrt(p * (1 - p) * (1 / a["n"] + 1 / b["n"]))
    assert abs(a["random_next"] - b["random_next"]) < 4 * se, (a["random_next"], b["random_next"])
    assert a["random_next"] > 0.55  # short documents: one-sentence chunks always take a random B
    se_len = np.sqrt(a["len_sd"] ** 2 / a["n"] + b["len_sd"] ** 2 / b["n"])
    assert abs(a["mean_len"] - b["mean_len"]) < 4 * se_len, (a["mean_len"], b["mean_len"])
    se_full = np.sqrt(b["full"] * (1 - b["full"]) * (1 / a["n"] + 1 / b["n"]))
    assert abs(a["full"] - b["full"]) < 4 * se_full + 0.01, (a["full"], b["full"])
    # B of a random pair comes from another document (ids trace documents here).
    assert all(a_[0] != b_[0] for a_, b_, r in mine if r)
    # The earlier variant (cut one-sentence chunks) is the named option and gives a clearly different share.
    cut = [p for s in range(2) for p in ours(s, True)]
    assert pair_statistics(cut, T - 3)["random_next"] < a["random_next"] - 0.08


def test_segments_end_at_sentence_ends():
    # Sentence k of document d holds tokens 1000·d + 10·k + j: a boundary is where the sentence number changes.
    rng = random.Random(3)
    docs = [[[1000 * d + 10 * k + j for j in range(rng.randint(2, 9))] for k in range(rng.randint(1, 8))]
            for d in range(80)]
    flat = token_docs(docs)
    pairs = as_lists(flat, inst.create_instances(flat, 40, 2, 0.1, random.Random(5)))
    whole = 0
    for a, b, random_next in pairs:
        if len(a) + len(b) == 37:  # may have been trimmed: nothing to check at the ends
            continue
        whole += 1
        assert a[0] % 10 == 0 and b[0] % 10 == 0  # both segments start at a sentence start
        assert a[-1] + 1 not in {t for s in docs[a[-1] // 1000] for t in s}  # A ends at a sentence end
        if not random_next:
            assert b[0] // 1000 == a[0] // 1000 and b[0] // 10 == a[-1] // 10 + 1  # the very next sentence
        else:
            assert b[0] // 1000 != a[0] // 1000
    assert whole > 50


def test_truncate_seq_pair_tie_trims_b():
    """Google: `trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b` — on a tie, B."""
    for seed in range(8):
        a, b = [0, 5], [10, 15]
        inst.truncate_seq_pair(a, b, 9, random.Random(seed))
        assert a == [0, 5] and b[1] - b[0] == 4, (a, b)
        a, b = [0, 6], [10, 15]  # A longer: A loses one, then the tie (5, 5) costs B one
        inst.truncate_seq_pair(a, b, 9, random.Random(seed))
        assert (a[1] - a[0], b[1] - b[0]) == (5, 4)


def test_random_b_stops_at_target_length():
    """B takes sentences until it holds at least the target: a sentence that reaches it exactly ends B."""
    docs = token_docs([[[1, 1, 1]], [[2] * 4] * 6])  # document 1: six sentences of 4 tokens
    seen = set()
    for seed in range(40):
        lo, hi = inst._random_b(docs, 0, 8, random.Random(seed))
        seen.add(hi - lo)
        assert docs.tokens[lo:hi].tolist() == [2] * (hi - lo)
    # 8 tokens (two sentences reach the target exactly), or 4 when B starts at the last sentence; never 12.
    assert seen == {4, 8}, seen


def test_instances_of_a_lone_document_take_b_from_itself():
    """A piece (or split) with one document: Google's 10 draws cannot avoid it, B comes from the same text."""
    docs = token_docs([[[d] * 5 for d in range(1, 9)]])
    pairs = as_lists(docs, inst.create_instances(docs, 16, 2, 0.0, random.Random(0)))
    assert pairs and all(a and b and len(a) + len(b) <= 13 for a, b, _ in pairs)
    assert inst.create_instances(token_docs([]), 16, 2, 0.0, random.Random(0)) == []


# ---------------------------------------------------------------------------------------------- embedded corpus
# The one-piece figures of the previous preparation (one process, every document in memory, held-out documents
# by a shuffle) on the embedded corpus at T = 128, dupe_factor 1, seed 12345: 17,772 instances from 4.886 MB of
# text (3,637.7 per MB), 89.14 tokens per instance, 64.65 % random next. (At dupe_factor 5: 18,147 per MB,
# 89.23 tokens, 64.65 %.)
ONE_PIECE = {"instances_per_mb": 3637.7, "tokens_per_instance": 89.14, "random_next": 0.6465}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded Wikipedia corpus prepared once in four pieces of 1.25 MB by two worker processes."""
    require("wiki_corpus")
    require("minilm")
    out = tmp_path_factory.mktemp("embedded") / "wiki"
    meta = prep.prepare(prep.PrepareConfig(out_dir=str(out), max_seq_len=128, dupe_factor=1, piece_mb=1.25,
                                           workers=2), log=lambda m: None)
    return out, meta


def test_embedded_corpus_in_pieces_keeps_the_one_piece_statistics(embedded):
    out, meta = embedded
    splits = meta["splits"]
    assert len(splits["train"]["shards"]) == len(splits["heldout"]["shards"]) == 4
    n = sum(s["instances"] for s in splits.values())
    ours = {"instances_per_mb": n / (meta["input_bytes"] / 1e6),
            "tokens_per_instance": sum(s["tokens"] for s in splits.values()) / n,
            "random_next": sum(s["random_next"] for s in splits.values()) / n}
    for k, v in ONE_PIECE.items():
        assert abs(ours[k] / v - 1) < 0.03, (k, ours[k], v)
    documents = splits["train"]["documents"] + splits["heldout"]["documents"]
    assert documents > 10000 and 150 < splits["heldout"]["documents"] < 260  # ~2 % held out, by hash
    assert 4.8e6 < meta["input_bytes"] < 5e6  # the text of the extracts
    s = read_split(out, "heldout")
    assert len(s["len_a"]) == splits["heldout"]["instances"] and np.diff(s["offsets"]).max() <= 125


def test_heldout_documents_are_disjoint_from_training(corpus):
    root, meta = corpus

    def doc_markers(split):
        toks = read_split(root / "data", split)["tokens"].astype(int)
        return set(toks[(toks >= MARKER_BASE) & (toks < MARKER_BASE + 120)].tolist())

    held, train = doc_markers("heldout"), doc_markers("train")
    assert 4 <= meta["splits"]["heldout"]["documents"] <= 22 and len(held) == meta["splits"]["heldout"]["documents"]
    assert not held & train and len(held | train) == 120
    # The held-out choice is a hash of the document's text and the seed: the same documents for any pieces.
    sentences = [[f"w1 w{k} ."] for k in range(400)]
    chosen = [prep.is_heldout(s, 12345, 0.1) for s in sentences]
    assert 20 < sum(chosen) < 60 and chosen == [prep.is_heldout(s, 12345, 0.1) for s in sentences]
    assert chosen != [prep.is_heldout(s, 1, 0.1) for s in sentences]


def test_train_new_vocabulary(corpus, tmp_path):
    root, _ = corpus
    said = []
    cfg = prep.PrepareConfig(out_dir=str(tmp_path / "v"), inputs=(str(root / "corpus.txt"),), vocab_size=150,
                             max_seq_len=32, dupe_factor=1, heldout_fraction=0.0, vocab_sample_mb=0.01,
                             piece_mb=0.005)
    meta = prep.prepare(cfg, log=said.append)
    vocab = (tmp_path / "v" / "vocab.txt").read_text().split()
    assert meta["vocab_size"] == len(vocab) <= 150 and meta["config"]["vocab"] is None
    assert all(t in vocab for t in prep.SPECIAL_TOKENS) and "w7" in vocab
    assert meta["splits"]["heldout"]["instances"] == 0 and meta["splits"]["train"]["instances"] > 0
    # Special tokens first, the rest sorted: the trainer's own order of equal-frequency tokens is hash order
    # (that the same tokens come out in another process is checked by the kill-and-resume test).
    assert vocab[:5] == list(prep.SPECIAL_TOKENS) and vocab[5:] == sorted(vocab[5:])
    # A bounded sample: about 0.01 MB spread over the corpus's 7 pieces, and the log says how much it read.
    line = next(m for m in said if m.startswith("trained a WordPiece vocabulary"))
    assert "documents) of the corpus's 0.034 MB" in line, line
    read_mb = float(line.split(" on ")[1].split(" MB")[0])
    assert 0.01 <= read_mb <= 0.013, line


def test_json_and_json_lines_input(tmp_path, corpus):
    root, _ = corpus
    entries = {f"T{k}": {"title": f"T{k}", "extract": " ".join(f"w{k} w{j} d{k}." for j in range(6))}
               for k in range(10)}
    (tmp_path / "wiki.json").write_text(json.dumps(entries))
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps({"id": k, "text": e["extract"]}) + "\n"
                                                 for k, e in enumerate(entries.values())))
    common = dict(vocab=str(root / "vocab.txt"), max_seq_len=16, dupe_factor=1, heldout_fraction=0.0)
    metas = {out: prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / out), inputs=(str(tmp_path / name),),
                                                  piece_mb=piece_mb, **common), log=lambda m: None)
             for out, name, piece_mb in (("many", "wiki.json", 0.0001), ("json", "wiki.json", 1.0),
                                         ("jsonl", "wiki.jsonl", 1.0))}
    for meta in metas.values():
        assert meta["splits"]["train"]["documents"] == 10
    assert len(metas["many"]["splits"]["train"]["shards"]) > 3 and len(metas["json"]["splits"]["train"]["shards"]) == 1
    # The same documents in one piece: the same instances from either format.
    assert instances(tmp_path / "json", "train") == instances(tmp_path / "jsonl", "train")


# ---------------------------------------------------------------------------------------------- errors
def test_errors_on_bad_files(tmp_path, corpus):
    root, _ = corpus
    vocab = str(root / "vocab.txt")

    def run(inputs, **kw):
        cfg = prep.PrepareConfig(out_dir=str(tmp_path / "out"), inputs=tuple(map(str, inputs)), vocab=vocab, **kw)
        prep.prepare(cfg, log=lambda m: None)

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        run([tmp_path / "empty.txt"])
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        run([root / "corpus.txt", tmp_path / "blank.txt"])
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="no documents"):
        run([tmp_path / "empty.json"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        run([tmp_path / "bad.json"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        run([tmp_path / "list.json"])
    (tmp_path / "noextract.json").write_text('{"a": {"title": "a"}}')
    with pytest.raises(ValueError, match="'extract'"):
        run([tmp_path / "noextract.json"])
    (tmp_path / "bad.jsonl").write_text('{"text": "w1 w2 ."}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: the line at byte 20 is not a JSON object with a 'text'"):
        run([tmp_path / "bad.jsonl"])
    (tmp_path / "one.txt").write_text("w1 w2 .\nw3 w4 .\n")
    with pytest.raises(ValueError, match="at least 2"):
        run([tmp_path / "one.txt"], heldout_fraction=0.0)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        run([tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="vocab file not found"):
        prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "o"), inputs=(str(root / "corpus.txt"),),
                                        vocab=str(tmp_path / "nope.txt")))
    (tmp_path / "novocab.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "o"), inputs=(str(root / "corpus.txt"),),
                                        vocab=str(tmp_path / "novocab.txt")), log=lambda m: None)
    # Nothing half-written: no output, no temporary folder; only the hidden work folders of the runs that got
    # as far as preparing pieces, kept for the next run (removed by the next complete one).
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".")) == [".out.work"] * 3
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(max_seq_len=4), "max_seq_len"), (dict(dupe_factor=0), "dupe_factor"),
    (dict(short_seq_prob=1.5), "short_seq_prob"), (dict(heldout_fraction=0.7), "heldout_fraction"),
    (dict(vocab="v.txt", vocab_size=200), "not both"), (dict(vocab_size=-1), "vocab_size"),
    (dict(vocab_size=50), "at least 105"), (dict(piece_mb=0), "piece_mb"), (dict(workers=-1), "workers"),
])
def test_errors_on_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        prep.PrepareConfig(**bad).validate()


def test_cli(tmp_path, corpus, capsys):
    root, _ = corpus
    out = tmp_path / "cli"
    rc = prep.main([str(root / "corpus.txt"), "--vocab", str(root / "vocab.txt"), "--out-dir", str(out),
                    "--max-seq-len", "24", "--dupe-factor", "1", "--piece-mb", "0.012", "--workers", "1"])
    assert rc == 0 and prep.is_prepared(out)
    assert json.loads((out / "meta.json").read_text())["max_seq_len"] == 24
    said = capsys.readouterr()
    # Not a terminal: plain progress lines (the last one at least), no carriage-return bar.
    assert "prepare: 3/3 pieces, 0.03 of 0.03 MB," in said.out and " MB/s, 00:00 left" in said.out
    assert "\r" not in said.out + said.err
    assert {p.name for p in tmp_path.iterdir()} == {"cli"}  # the work folder is gone
    assert {p.name for p in out.iterdir()} == {"fastbert-manifest.json", "meta.json", "vocab.txt", "shards"}
    assert len(list((out / "shards").iterdir())) == 3 * 2 * len(ARRAYS)
    assert shard_path(out, "heldout-00002", "tokens").is_file()
    (tmp_path / "empty.txt").write_text("")
    rc = prep.main([str(tmp_path / "empty.txt"), "--vocab", str(root / "vocab.txt"), "--out-dir", str(out)])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = prep.main([str(root / "corpus.txt"), "--vocab", str(root / "vocab.txt"), "--max-seq-len", "2"])
    assert rc == 2 and "max_seq_len" in capsys.readouterr().err
