"""SQuAD v1.1: the official EM / F1, JSON reading, windowed features with document stride, n-best decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.finetune import load_tokenizer
from train.squad import (
    SquadExample,
    decode_predictions,
    exact_match_score,
    f1_score,
    make_features,
    normalize_answer,
    read_squad,
    squad_metrics,
)

WORDS = ("the cat sat on a mat in old town near river bank while dog ran far away from big red house "
         "where who did").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?",
                                                 *WORDS, "##s"]) + "\n")
    return load_tokenizer(folder / "vocab.txt")


# ---------------------------------------------------------------------------------------------- official metric
@pytest.mark.parametrize(
    "raw, normalized",
    [("The Cat", "cat"), ("  a   cat, sat!  ", "cat sat"), ("An apple; the pear.", "apple pear"),
     ("theatre", "theatre"), ("Ann's  \t  Rock-n-Roll", "anns rocknroll"), ("THE", "")],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_and_f1():
    assert exact_match_score("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # pred tokens {eiffel, tower, paris}, gold {eiffel, tower}: P = 2/3, R = 1 → F1 = 0.8
    assert f1_score("the Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    assert f1_score("Paris", "Eiffel Tower") == 0.0
    assert f1_score("a", "the") == 0.0  # both normalise to nothing: no overlap
    # Repeated tokens count with multiplicity: pred {x, x, y}, gold {x, y, y} → overlap 2, P = R = 2/3.
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)


def test_squad_metrics_takes_best_gold_and_scores_missing_as_zero():
    gold = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["1990"], "q3": ["blue"]}
    preds = {"q1": "Broncos", "q2": "in 1990 and 1991"}  # q3 missing
    m = squad_metrics(preds, gold)
    # q1: EM 1 (matches "the Broncos"), F1 1; q2: EM 0, F1: P = 1/4, R = 1 → 0.4; q3: 0.
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 0.4) / 3)
    with pytest.raises(ValueError, match="no gold answers"):
        squad_metrics(preds, {})


# ---------------------------------------------------------------------------------------------- reading
def squad_json(context, question, answer, start, qid="q1"):
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": question,
                                      "answers": [{"text": answer, "answer_start": start}]}]}]}]}


def test_read_squad(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad_json("the cat sat.", "who sat?", "cat", 4)))
    (ex,) = read_squad(path)
    assert (ex.qid, ex.question, ex.context, ex.answers) == ("q1", "who sat?", "the cat sat.", [("cat", 4)])


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "'data' list"),
        (json.dumps({"data": [{"title": "t"}]}), r"data\[0\]: missing key 'paragraphs'"),
        (json.dumps(squad_json("ctx", "q", "ctx", 7)), r"answers\[0\]: answer_start 7 .* outside the context"),
        (json.dumps(squad_json("ctx", "q", "ctx", "0")), "'answer_start' must be int, got str"),
        (json.dumps({"data": []}), "no questions"),
    ],
)
def test_read_squad_malformed(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_squad(path)


def test_read_squad_rejects_v2(tmp_path):
    blob = squad_json("ctx", "q", "ctx", 0)
    blob["data"][0]["paragraphs"][0]["qas"][0]["is_impossible"] = True
    (tmp_path / "v2.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="SQuAD v2.0"):
        read_squad(tmp_path / "v2.json")


# ---------------------------------------------------------------------------------------------- features
CONTEXT = ("The cat sat on a mat in old town, near the river bank. The dog ran far away from the big red house "
           "while the cats sat.")  # 26 context tokens ("cats" = cat ##s)
ANSWER = "big red house"


def test_features_with_document_stride_map_back_to_the_answer(tokenizer):
    ex = SquadExample("q", "where did the dog run?", CONTEXT, [(ANSWER, CONTEXT.index(ANSWER))])
    n_ctx = len(tokenizer.encode(CONTEXT, add_special_tokens=False).ids)
    n_q = len(tokenizer.encode(ex.question, add_special_tokens=False).ids)
    max_length, stride = 17, 3
    window = max_length - n_q - 3
    feats = make_features([ex], tokenizer, max_length=max_length, doc_stride=stride, max_query_length=8,
                          training=True)
    # Windows start every `stride` tokens until one reaches the end of the context.
    starts = [0]
    while starts[-1] + window < n_ctx:
        starts.append(starts[-1] + stride)
    assert len(feats) == len(starts) > 2
    ctx_offsets = [tuple(o) for o in tokenizer.encode(CONTEXT, add_special_tokens=False).offsets]
    a0, a1 = CONTEXT.index(ANSWER), CONTEXT.index(ANSWER) + len(ANSWER)
    holding = 0
    for f, s0 in zip(feats, starts, strict=True):
        length = min(window, n_ctx - s0)
        assert len(f.input_ids) == n_q + 3 + length == len(f.token_type_ids) == len(f.offsets) <= max_length
        assert f.input_ids[0] == tokenizer.token_to_id("[CLS]") and f.input_ids[-1] == tokenizer.token_to_id("[SEP]")
        assert f.token_type_ids == [0] * (n_q + 2) + [1] * (length + 1)
        assert [o for o in f.offsets if o is not None] == ctx_offsets[s0 : s0 + length]
        inside = ctx_offsets[s0][0] <= a0 and ctx_offsets[s0 + length - 1][1] >= a1
        if inside:
            holding += 1
            s, e = f.offsets[f.start_position], f.offsets[f.end_position]
            assert CONTEXT[s[0] : e[1]] == ANSWER
        else:
            assert f.start_position == f.end_position == 0  # [CLS]
    assert holding >= 2  # overlapping windows: the answer sits whole in more than one
    # Every context token is the max-context token of exactly one window.
    owner = {}
    for fi, f in enumerate(feats):
        for o, is_max in zip(f.offsets, f.max_context, strict=True):
            if is_max:
                assert o is not None and o not in owner
                owner[o] = fi
    assert len(owner) == n_ctx
    # A token in the middle of the overlap belongs to the window where it is most central.
    mid = starts[1] + stride // 2  # seen by windows 0 and 1 (and maybe 2)
    seen = [i for i, s0 in enumerate(starts) if s0 <= mid < s0 + window]
    best = max(seen, key=lambda i: (min(mid - starts[i], starts[i] + window - 1 - mid), -i))
    assert owner[ctx_offsets[mid]] == best


def test_features_errors(tokenizer):
    ex = SquadExample("q", "who sat?", "the cat sat.", [("cat", 4)])
    with pytest.raises(ValueError, match="leaves no room for context"):
        make_features([ex], tokenizer, max_length=6, max_query_length=8)
    tokenizer.enable_truncation(8)
    try:
        with pytest.raises(ValueError, match="truncation and padding off"):
            make_features([ex], tokenizer)
    finally:
        tokenizer.no_truncation()


def test_unmatched_training_answer_is_skipped_with_a_warning(tokenizer):
    good = SquadExample("a", "who sat?", "the cat sat.", [("cat", 4)])
    bad = SquadExample("b", "who sat?", "the cat sat.", [("dog", 4)])
    with pytest.warns(UserWarning, match="1 training answer"):
        feats = make_features([good, bad], tokenizer, max_length=32, training=True)
    assert [f.example_index for f in feats] == [0]
    assert len(make_features([good, bad], tokenizer, max_length=32, training=False)) == 2


# ---------------------------------------------------------------------------------------------- decoding
def test_nbest_decoding_picks_the_best_valid_span(tokenizer):
    context = "the cat sat on a mat near the river bank"
    ex = SquadExample("q", "who sat?", context, [("cat", 4)])
    (f,) = make_features([ex], tokenizer, max_length=32)
    ctx = [i for i, o in enumerate(f.offsets) if o is not None]  # positions of the 10 context tokens
    start, end = np.zeros(len(f.input_ids)), np.zeros(len(f.input_ids))
    start[0] = end[0] = 20.0  # [CLS]: not in the context, never an answer
    start[ctx[5]], start[ctx[0]], start[ctx[1]] = 15.0, 12.0, 9.0  # "mat", "the", "cat"
    end[ctx[2]], end[ctx[9]], end[ctx[6]] = 13.0, 14.0, 11.0  # "sat", "bank", "near"
    # Valid with max_answer_length 4: mat..near 26, the..sat 25, cat..sat 22. Invalid: mat..sat (end before
    # start), mat..bank 29 (5 tokens), the..bank 26 (10 tokens).
    preds, nbest = decode_predictions([ex], [f], [start], [end], n_best=5, max_answer_length=4)
    assert preds == {"q": "mat near"}
    texts = [c["text"] for c in nbest["q"]]
    assert texts[:3] == ["mat near", "the cat sat", "cat sat"] and context not in texts
    assert sum(c["probability"] for c in nbest["q"]) == pytest.approx(1.0)
    scores = [c["score"] for c in nbest["q"]]
    assert scores == sorted(scores, reverse=True)
    # With room for 10 tokens and "mat" no longer a likely start, the..bank (26) beats the..sat (25).
    start[ctx[5]] = -5.0
    preds, _ = decode_predictions([ex], [f], [start], [end], n_best=5, max_answer_length=10)
    assert preds == {"q": context}


def test_decoding_skips_starts_outside_their_max_context_window(tokenizer):
    ex = SquadExample("q", "where?", CONTEXT, [(ANSWER, CONTEXT.index(ANSWER))])
    feats = make_features([ex], tokenizer, max_length=14, doc_stride=3, max_query_length=4)
    # In every window, put the highest score on its first context token as a one-token span.
    starts, ends = [], []
    for f in feats:
        s, e = np.zeros(len(f.input_ids)), np.zeros(len(f.input_ids))
        first = next(i for i, o in enumerate(f.offsets) if o is not None)
        s[first] = e[first] = 10.0 if not f.max_context[first] else 1.0
        starts.append(s)
        ends.append(e)
    preds, nbest = decode_predictions([ex], feats, starts, ends, n_best=3, max_answer_length=3)
    # The 10-point spans are all at non-max-context starts (except the first window), so they never win.
    for cand in nbest["q"]:
        assert cand["score"] < 20.0
    assert preds["q"] != ""
    with pytest.raises(ValueError, match="logit rows"):
        decode_predictions([ex], feats, starts[:-1], ends, n_best=3)
