"""Pretraining data: sentence splitting, instance creation, the stored format, and clear errors on bad input
(the loader, its masking and the batch order: test_dataset.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.helpers import require
from train import prepare as prep
from train.dataset import PretrainingDataset

WORDS = [f"w{i}" for i in range(40)]


def write_vocab(path, n_docs: int) -> None:
    tokens = list(prep.SPECIAL_TOKENS) + WORDS + [f"d{i}" for i in range(n_docs)] + [".", ","]
    path.write_text("\n".join(tokens) + "\n")


def write_corpus(path, n_docs: int, seed: int = 0, sentences=(6, 14), words=(3, 9)) -> None:
    """Documents of short sentences; every sentence of document k carries the marker word `dk`."""
    rng = random.Random(seed)
    docs = []
    for k in range(n_docs):
        lines = []
        for _ in range(rng.randint(*sentences)):
            body = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
            body.insert(rng.randrange(len(body) + 1), f"d{k}")
            lines.append(" ".join(body) + " .")
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    write_vocab(root / "vocab.txt", 120)
    write_corpus(root / "corpus.txt", 120)
    cfg = prep.PrepareConfig(out_dir=str(root / "data"), inputs=(str(root / "corpus.txt"),),
                             vocab=str(root / "vocab.txt"), max_seq_len=48, dupe_factor=3, heldout_fraction=0.1)
    meta = prep.prepare(cfg, log=lambda m: None)
    return root, meta


# ---------------------------------------------------------------------------------------------- sentences
def test_split_sentences_rules():
    text = ('2001: A Space Odyssey is a film by Stanley Kubrick, who wrote it with Arthur C. Clarke.  Its plot '
            'was inspired by "The Sentinel" (1951). The U.S. Navy, e.g. Mr. Smith, went home! Did he? "Yes." '
            'Then 3 more came.')
    assert prep.split_sentences(text) == [
        "2001: A Space Odyssey is a film by Stanley Kubrick, who wrote it with Arthur C. Clarke.",
        'Its plot was inspired by "The Sentinel" (1951).',
        "The U.S. Navy, e.g. Mr. Smith, went home!",
        "Did he?",
        '"Yes."',
        "Then 3 more came.",
    ]
    assert prep.split_sentences("   ") == []
    assert prep.split_sentences("no final stop") == ["no final stop"]


def test_embedded_wikipedia_reads():
    path = require("wiki_corpus")
    docs = prep.read_json_documents(path)
    assert len(docs) > 10000
    n_sent = sum(map(len, docs))
    assert 2.5 * len(docs) < n_sent < 6 * len(docs)  # lead paragraphs: a few sentences each
    assert all(s and s == s.strip() for d in docs[:200] for s in d)


# ---------------------------------------------------------------------------------------------- instances
def test_instances_invariants(corpus):
    root, meta = corpus
    data = root / "data"
    assert meta["max_seq_len"] == 48 and meta["special_ids"]["[CLS]"] == 2
    assert (data / "vocab.txt").read_text() == (root / "vocab.txt").read_text()
    for split in prep.SPLITS:
        offsets = np.load(data / f"{split}.offsets.npy")
        len_a = np.load(data / f"{split}.len_a.npy")
        lengths = np.diff(offsets)
        assert len(len_a) == meta["splits"][split]["instances"] > 0
        assert np.all(len_a >= 1) and np.all(lengths - len_a >= 1)  # both segments non-empty
        assert lengths.max() <= 48 - 3  # room for [CLS] and two [SEP]
        assert np.load(data / f"{split}.tokens.npy").dtype == np.uint16
    # Most instances fill the length; short_seq_prob=0.1 (plus document ends) makes some shorter.
    lengths = np.diff(np.load(data / "train.offsets.npy"))
    assert 0.5 < np.mean(lengths >= 40) < 0.97


def test_nsp_pairs_come_from_the_right_documents(corpus):
    root, meta = corpus
    ds = PretrainingDataset(root / "data", "train")
    n = len(ds)
    marker_base = 5 + len(WORDS)  # ids of d0, d1, ... in the test vocabulary
    same_doc_for_continuation = 0
    for i in range(n):
        ids, types, _, is_random = ds.instance(i)
        la = int(ds.len_a[i])
        docs_a = {int(t) - marker_base for t in ids[1:la + 1] if t >= marker_base and t < marker_base + 120}
        docs_b = {int(t) - marker_base for t in ids[la + 2:-1] if t >= marker_base and t < marker_base + 120}
        assert len(docs_a) <= 1  # A is consecutive text of one document
        if not is_random and docs_a and docs_b:
            assert docs_a == docs_b  # the true continuation comes from the same document
            same_doc_for_continuation += 1
        if is_random and docs_a and docs_b:
            assert docs_a != docs_b  # a random B comes from another document
    assert same_doc_for_continuation > n // 4
    # Above half: a document's last chunk is often one sentence, which always takes a random B.
    assert 0.5 < ds.is_random_next.mean() < 0.7, ds.is_random_next.mean()


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
    ours = [p for s in range(4) for p in prep.create_instances(docs, T, 1, 0.1, random.Random(100 + s))]
    theirs = [p for s in range(4) for p in google_pairs(docs, T, 0.1, random.Random(200 + s))]
    a, b = pair_statistics(ours, T - 3), pair_statistics(theirs, T - 3)
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
    # The earlier variant (cut one-sentence chunks) is the named option and gives a clearly different share.
    cut = [p for s in range(2) for p in prep.create_instances(docs, T, 1, 0.1, random.Random(s), True)]
    assert pair_statistics(cut, T - 3)["random_next"] < a["random_next"] - 0.08


def test_segments_end_at_sentence_ends():
    # Sentence k of document d holds tokens 1000·d + 10·k + j: a boundary is where the sentence number changes.
    rng = random.Random(3)
    docs = [[[1000 * d + 10 * k + j for j in range(rng.randint(2, 9))] for k in range(rng.randint(1, 8))]
            for d in range(80)]
    pairs = prep.create_instances(docs, 40, 2, 0.1, random.Random(5))
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


def test_embedded_wikipedia_random_next_share():
    """Google's rule on the embedded lead paragraphs at 128 tokens: about 64 % random-next pairs."""
    from fastbert.resources import ResourceNotFound, wiki_corpus_path

    try:
        path = wiki_corpus_path()
    except ResourceNotFound as e:
        pytest.skip(str(e))
    from fastbert.tokenizer import Tokenizer

    docs_text = prep.read_json_documents(path)[:3000]
    tok = Tokenizer.from_file(prep.default_vocab_path()).backend_tokenizer
    docs = prep.tokenize_documents(tok, docs_text)
    pairs = prep.create_instances(docs, 128, 1, 0.1, random.Random(0))
    share = np.mean([r for _, _, r in pairs])
    assert 0.60 < share < 0.68, share


def test_heldout_documents_are_disjoint_from_training(corpus):
    root, meta = corpus
    marker_base = 5 + len(WORDS)

    def doc_markers(split):
        toks = np.load(root / "data" / f"{split}.tokens.npy").astype(int)
        return set(toks[(toks >= marker_base) & (toks < marker_base + 120)].tolist())

    held, train = doc_markers("heldout"), doc_markers("train")
    assert meta["splits"]["heldout"]["documents"] == 12 and len(held) == 12
    assert not held & train


def test_deterministic_given_seed(corpus, tmp_path):
    root, _ = corpus
    cfg = prep.PrepareConfig(out_dir=str(tmp_path / "again"), inputs=(str(root / "corpus.txt"),),
                             vocab=str(root / "vocab.txt"), max_seq_len=48, dupe_factor=3, heldout_fraction=0.1)
    prep.prepare(cfg, log=lambda m: None)
    for name in ("train.tokens.npy", "train.len_a.npy", "heldout.is_random_next.npy"):
        np.testing.assert_array_equal(np.load(root / "data" / name), np.load(tmp_path / "again" / name))


def test_train_new_vocabulary(corpus, tmp_path):
    root, _ = corpus
    cfg = prep.PrepareConfig(out_dir=str(tmp_path / "v"), inputs=(str(root / "corpus.txt"),), vocab_size=150,
                             max_seq_len=32, dupe_factor=1, heldout_fraction=0.0)
    meta = prep.prepare(cfg, log=lambda m: None)
    vocab = (tmp_path / "v" / "vocab.txt").read_text().split()
    assert meta["vocab_size"] == len(vocab) <= 150
    assert all(t in vocab for t in prep.SPECIAL_TOKENS) and "w7" in vocab
    assert meta["splits"]["heldout"]["instances"] == 0 and meta["splits"]["train"]["instances"] > 0
    # The same ids in another process (the trainer's own order of equal-frequency tokens is hash order).
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from train import prepare as p; "
            "p.train_vocab(p.read_documents([sys.argv[1]]), 150, Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(root / "corpus.txt"), str(tmp_path / "again")], check=True,
                   cwd=str(prep.Path(prep.__file__).resolve().parents[1]))
    assert (tmp_path / "again" / "vocab.txt").read_text().split() == vocab
    assert vocab[:5] == list(prep.SPECIAL_TOKENS) and vocab[5:] == sorted(vocab[5:])


def test_json_input(tmp_path, corpus):
    root, _ = corpus
    entries = {f"T{k}": {"title": f"T{k}", "extract": " ".join(f"w{k} w{j} d{k}." for j in range(6))}
               for k in range(10)}
    (tmp_path / "wiki.json").write_text(json.dumps(entries))
    meta = prep.prepare(prep.PrepareConfig(out_dir=str(tmp_path / "j"), inputs=(str(tmp_path / "wiki.json"),),
                                           vocab=str(root / "vocab.txt"), max_seq_len=16, dupe_factor=1,
                                           heldout_fraction=0.0), log=lambda m: None)
    assert meta["splits"]["train"]["documents"] == 10


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
    with pytest.raises(ValueError, match="empty"):
        run([tmp_path / "blank.txt"])
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
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match="fastbert-prepare"):
        PretrainingDataset(tmp_path)
    with pytest.raises(ValueError, match="split"):
        PretrainingDataset(root / "data", "test")


@pytest.mark.parametrize("bad, match", [
    (dict(max_seq_len=4), "max_seq_len"), (dict(dupe_factor=0), "dupe_factor"),
    (dict(short_seq_prob=1.5), "short_seq_prob"), (dict(heldout_fraction=0.7), "heldout_fraction"),
    (dict(vocab="v.txt", vocab_size=100), "not both"), (dict(vocab_size=-1), "vocab_size"),
])
def test_errors_on_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        prep.PrepareConfig(**bad).validate()


def test_cli(tmp_path, corpus, capsys):
    root, _ = corpus
    out = tmp_path / "cli"
    rc = prep.main([str(root / "corpus.txt"), "--vocab", str(root / "vocab.txt"), "--out-dir", str(out),
                    "--max-seq-len", "24", "--dupe-factor", "1"])
    assert rc == 0 and prep.is_prepared(out)
    assert json.loads((out / "meta.json").read_text())["max_seq_len"] == 24
    (tmp_path / "empty.txt").write_text("")
    rc = prep.main([str(tmp_path / "empty.txt"), "--vocab", str(root / "vocab.txt"), "--out-dir", str(out)])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = prep.main([str(root / "corpus.txt"), "--vocab", str(root / "vocab.txt"), "--max-seq-len", "2"])
    assert rc == 2 and "max_seq_len" in capsys.readouterr().err
