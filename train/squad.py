"""SQuAD v1.1 span QA: reading the JSON, windowed features, n-best span decoding, the official EM / F1.

Features follow the original BERT `run_squad.py`: the question (cut to `max_query_length` tokens) and a window
of the context make `[CLS] question [SEP] context-window [SEP]`; windows start every `doc_stride` context
tokens (the step between window starts, as the original code — Hugging Face's `stride` is the overlap
instead), and a token seen by several windows is scored only in the window where it has the most context on
both sides ("max context"). Tokens keep their character offsets into the context, so a predicted token span
maps straight back to the context text.

Training windows that do not contain the whole first answer point both positions at [CLS] (index 0).

The metric is the official v1.1 evaluation: answers are normalised (lower case, punctuation removed, the
articles a / an / the removed, whitespace collapsed), then exact match and token-overlap F1 are taken against
each gold answer and the best is kept; both are averaged over questions and reported in percent.

Caution: SQuAD v2.0 (unanswerable questions, `is_impossible`) is not supported.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SquadExample:
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start in context); the first one is trained on


@dataclass
class SquadFeature:
    """One window of one example. Lists have the feature's own length (no padding)."""

    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]  # (start, end) characters in the context; None off the context
    max_context: list[bool]  # True where this window is the token's best-centred one
    start_position: int = 0  # training target; 0 = [CLS] (answer not inside this window)
    end_position: int = 0


# ---------------------------------------------------------------------------------------------- reading
def read_squad(path: str | os.PathLike) -> list[SquadExample]:
    """Every question of a SQuAD v1.1 JSON file. ValueError (naming the place) on malformed content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is accepted
            blob = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("data"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'data' list (SQuAD v1.1 format)")

    def need(obj: object, key: str, kind: type, where: str):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{path}: {where}: missing key {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{path}: {where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
        return value

    examples = []
    for a, article in enumerate(blob["data"]):
        for p, para in enumerate(need(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = need(para, "context", str, where)
            for q, qa in enumerate(need(para, "qas", list, where)):
                qwhere = f"{where}.qas[{q}]"
                if isinstance(qa, dict) and qa.get("is_impossible"):
                    raise ValueError(f"{path}: {qwhere}: is_impossible questions (SQuAD v2.0) are not supported")
                qid = need(qa, "id", str, qwhere)
                question = need(qa, "question", str, qwhere)
                answers = []
                for n, ans in enumerate(need(qa, "answers", list, qwhere)):
                    awhere = f"{qwhere}.answers[{n}]"
                    text = need(ans, "text", str, awhere)
                    start = need(ans, "answer_start", int, awhere)
                    if not 0 <= start <= len(context) - len(text):
                        raise ValueError(
                            f"{path}: {awhere}: answer_start {start} (+ {len(text)} characters) is outside the "
                            f"context ({len(context)} characters)"
                        )
                    answers.append((text, start))
                examples.append(SquadExample(qid, question, context, answers))
    if not examples:
        raise ValueError(f"{path}: no questions")
    return examples


# ---------------------------------------------------------------------------------------------- features
def _special_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return i


def _window_starts(n_tokens: int, window: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of the context windows: every `doc_stride` tokens until one reaches the end."""
    spans, start = [], 0
    while True:
        length = min(n_tokens - start, window)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, doc_stride)


def _is_max_context(spans: list[tuple[int, int]], span_index: int, position: int) -> bool:
    """Whether window `span_index` gives context token `position` its most balanced context (ties: the
    longer window, then the first)."""
    best_score, best_index = None, None
    for i, (start, length) in enumerate(spans):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best_index = score, i
    return best_index == span_index


def answer_token_span(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int] | None:
    """First and last context token overlapping the characters [char_start, char_end); None if none does."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > char_start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < char_end), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def make_features(
    examples: list[SquadExample],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    training: bool = False,
) -> list[SquadFeature]:
    """Windowed features of `examples` (see the module docstring). `tokenizer` is a `tokenizers` BERT
    tokenizer with truncation and padding off (`train.finetune.load_tokenizer` gives one)."""
    if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
        raise ValueError("the tokenizer must have truncation and padding off (call no_truncation(), no_padding())")
    if doc_stride < 1 or max_query_length < 1:
        raise ValueError(f"doc_stride and max_query_length must be >= 1, got {doc_stride}, {max_query_length}")
    cls_id, sep_id = _special_id(tokenizer, "[CLS]"), _special_id(tokenizer, "[SEP]")
    features, unmatched = [], 0
    for ex_index, ex in enumerate(examples):
        q_ids = tokenizer.encode(ex.question, add_special_tokens=False).ids[:max_query_length]
        ctx = tokenizer.encode(ex.context, add_special_tokens=False)
        ctx_ids, ctx_offsets = ctx.ids, [tuple(o) for o in ctx.offsets]
        n_window = max_length - len(q_ids) - 3
        if n_window < 1:
            raise ValueError(
                f"question {ex.qid!r}: max_length ({max_length}) leaves no room for context after its "
                f"{len(q_ids)} question tokens and 3 special tokens (lower max_query_length or raise max_length)"
            )
        spans = _window_starts(len(ctx_ids), n_window, doc_stride)

        answer_tokens = None
        if training and ex.answers:
            text, char_start = ex.answers[0]
            if ex.context[char_start : char_start + len(text)] != text:
                unmatched += 1
            else:
                answer_tokens = answer_token_span(ctx_offsets, char_start, char_start + len(text))
        if training and answer_tokens is None:
            continue  # no usable answer: nothing to learn from this example

        for span_index, (start, length) in enumerate(spans):
            head = len(q_ids) + 2  # [CLS] question [SEP]
            input_ids = [cls_id, *q_ids, sep_id, *ctx_ids[start : start + length], sep_id]
            token_type_ids = [0] * head + [1] * (length + 1)
            offsets: list[tuple[int, int] | None] = [None] * head + ctx_offsets[start : start + length] + [None]
            max_context = [False] * head + [_is_max_context(spans, span_index, start + i) for i in range(length)]
            max_context.append(False)
            feature = SquadFeature(ex_index, input_ids, token_type_ids, offsets, max_context)
            if answer_tokens is not None and start <= answer_tokens[0] and answer_tokens[1] < start + length:
                feature.start_position = head + answer_tokens[0] - start
                feature.end_position = head + answer_tokens[1] - start
            features.append(feature)
    if unmatched:
        warnings.warn(
            f"{unmatched} training answer(s) do not match the context at answer_start; those questions are skipped",
            stacklevel=2,
        )
    return features


# ---------------------------------------------------------------------------------------------- decoding
def decode_predictions(
    examples: list[SquadExample],
    features: list[SquadFeature],
    start_logits: list[np.ndarray] | np.ndarray,
    end_logits: list[np.ndarray] | np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Best answer text per question id, and the n-best list ({text, score, probability}) behind it.

    For every window, the `n_best` highest start and end logits are paired; a pair is valid when both lie in
    the context, the start token is in its max-context window, end ≥ start and the span has at most
    `max_answer_length` tokens. Score = start logit + end logit. A question with no valid span gets "".
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"got {len(start_logits)} start / {len(end_logits)} end logit rows for {len(features)} features"
        )
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best and max_answer_length must be >= 1, got {n_best}, {max_answer_length}")
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for i, f in enumerate(features):
        by_example[f.example_index].append(i)

    predictions, nbest_json = {}, {}
    for ex_index, ex in enumerate(examples):
        candidates = []
        for fi in by_example.get(ex_index, []):
            f = features[fi]
            n = len(f.input_ids)
            sl = np.asarray(start_logits[fi], dtype=np.float64)[:n]
            el = np.asarray(end_logits[fi], dtype=np.float64)[:n]
            for s in np.argsort(-sl, kind="stable")[:n_best]:
                if f.offsets[s] is None or not f.max_context[s]:
                    continue
                for e in np.argsort(-el, kind="stable")[:n_best]:
                    if f.offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((sl[s] + el[e], f.offsets[s][0], f.offsets[e][1]))
        candidates.sort(key=lambda c: -c[0])
        seen, best = set(), []
        for score, c0, c1 in candidates:
            if (c0, c1) in seen:
                continue
            seen.add((c0, c1))
            best.append((score, ex.context[c0:c1]))
            if len(best) == n_best:
                break
        if best:
            scores = np.array([s for s, _ in best])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            nbest_json[ex.qid] = [
                {"text": t, "score": float(s), "probability": float(p)}
                for (s, t), p in zip(best, probs, strict=True)
            ]
            predictions[ex.qid] = best[0][1]
        else:
            nbest_json[ex.qid] = []
            predictions[ex.qid] = ""
    return predictions, nbest_json


# ---------------------------------------------------------------------------------------------- official metric
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a / an / the, collapse whitespace (official v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], gold: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 in percent over the questions of `gold` (id → gold answer texts), each the best
    over its gold answers; a question without a prediction scores 0."""
    if not gold:
        raise ValueError("no gold answers to score against")
    em = f1 = 0.0
    for qid, answers in gold.items():
        if not answers:
            raise ValueError(f"question {qid!r} has no gold answer")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match_score(pred, a) for a in answers)
        f1 += max(f1_score(pred, a) for a in answers)
    return {"exact_match": 100.0 * em / len(gold), "f1": 100.0 * f1 / len(gold)}


def gold_answers(examples: list[SquadExample]) -> dict[str, list[str]]:
    return {ex.qid: [text for text, _ in ex.answers] for ex in examples}
