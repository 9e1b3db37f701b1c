"""Sentence-pair instances by the rules of Google's `create_pretraining_data.py`, over documents held flat.

    TokenDocs            tokenized documents: one token array, with sentence and document boundaries
    tokenize_documents   text documents → token ids per sentence (a sentence longer than a segment is cut)
    create_instances     (A, B, is_random_next) of every document, `dupe_factor` times, shuffled
    instance_arrays      the four shard arrays of train/shards.py, from those instances

A segment is always a contiguous run of tokens: A is whole sentences of one document, B the rest of the chunk or
consecutive sentences of another document, and trimming a segment at either end keeps it one. So an instance is
four integers, ranges [lo, hi) into `TokenDocs.tokens`, and the tokens are copied once, into the shard arrays.
The random draws are the original's, one for one (the same `random.Random` calls in the same order as the
list-based port this replaced), so the instances are the same; only the bookkeeping is cheaper.

Caution: pure Python, about 200 k instances per second per core (the tokenizer, not this, bounds a preparation).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np

from .shards import token_dtype

# (a_lo, a_hi, b_lo, b_hi, is_random_next): A = tokens[a_lo:a_hi], B = tokens[b_lo:b_hi]
Instance = tuple[int, int, int, int, bool]


class TokenDocs:
    """Documents of tokenized sentences, flat: sentence s is tokens[starts[s]:starts[s + 1]], document d is
    sentences doc_sents[d] .. doc_sents[d + 1] - 1. Empty sentences and documents are not kept."""

    def __init__(self) -> None:
        self.starts: list[int] = [0]
        self.doc_sents: list[int] = [0]
        self._pending: list[int] = []
        self._parts: list[np.ndarray] = []

    def add(self, document: Sequence[Sequence[int]]) -> None:
        """Append one document (its sentences as token ids)."""
        before = len(self.starts)
        for sentence in document:
            if len(sentence):
                self._pending.extend(sentence)
                self.starts.append(self.starts[-1] + len(sentence))
        if len(self.starts) > before:
            self.doc_sents.append(len(self.starts) - 1)
        if len(self._pending) >= 1 << 20:
            self._parts.append(np.array(self._pending, dtype=np.int32))
            self._pending = []

    @property
    def tokens(self) -> np.ndarray:
        """int32 [n_tokens], every sentence back to back."""
        if self._pending or len(self._parts) != 1:
            self._parts = [np.concatenate([*self._parts, np.array(self._pending, dtype=np.int32)])]
            self._pending = []
        return self._parts[0]

    def __len__(self) -> int:
        return len(self.doc_sents) - 1


def tokenize_documents(tok, documents: Sequence[Sequence[str]], max_sentence_tokens: int | None = None,
                       stats: dict | None = None) -> list[list[list[int]]]:
    """Documents of sentences → documents of token-id lists, one (possibly empty) entry per document.

    A sentence longer than `max_sentence_tokens` (a document that is one giant "sentence": no punctuation the
    splitter knows, a table, a list) is cut into consecutive pieces of at most that many tokens, so no instance
    has to drop most of it; `stats["long_sentences"]` / `["long_sentence_pieces"]` count them (added to)."""
    flat = [s for d in documents for s in d]
    ids = [e.ids for e in tok.encode_batch(flat, add_special_tokens=False)] if flat else []
    out, i, n_long, n_pieces = [], 0, 0, 0
    for d in documents:
        sentences = []
        for s in ids[i:i + len(d)]:
            if max_sentence_tokens is not None and len(s) > max_sentence_tokens:
                pieces = [s[k:k + max_sentence_tokens] for k in range(0, len(s), max_sentence_tokens)]
                n_long, n_pieces = n_long + 1, n_pieces + len(pieces)
                sentences.extend(pieces)
            elif s:
                sentences.append(s)
        i += len(d)
        out.append(sentences)
    if stats is not None:
        stats["long_sentences"] = stats.get("long_sentences", 0) + n_long
        stats["long_sentence_pieces"] = stats.get("long_sentence_pieces", 0) + n_pieces
    return out


# ---------------------------------------------------------------------------------------------- instances
def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """a, b: token ranges [lo, hi], trimmed in place. The longer (b when they are equal) loses one token at a time,
    from the front or the back at random, until they fit — the original BERT's rule."""
    while a[1] - a[0] + b[1] - b[0] > max_num_tokens:
        longer = a if a[1] - a[0] > b[1] - b[0] else b
        if rng.random() < 0.5:
            longer[0] += 1
        else:
            longer[1] -= 1


def _random_b(docs: TokenDocs, doc_index: int, target_len: int, rng: random.Random) -> list[int]:
    """The token range of consecutive sentences of another document (10 draws to avoid this one), from a random
    sentence on, until `target_len` tokens (at least one sentence)."""
    other = doc_index
    for _ in range(10):
        other = rng.randrange(len(docs))
        if other != doc_index:
            break
    first, last = docs.doc_sents[other], docs.doc_sents[other + 1]
    start = first + rng.randrange(last - first)
    lo = hi = docs.starts[start]
    for s in range(start, last):
        hi = docs.starts[s + 1]
        if hi - lo >= target_len:
            break
    return [lo, hi]


def instances_from_document(
    docs: TokenDocs, doc_index: int, max_seq_len: int, short_seq_prob: float, rng: random.Random,
    split_single_sentence: bool = False,
) -> list[Instance]:
    """The instances of one document, by the selection rules of the original BERT:

    - one target length per document: max_seq_len − 3, or with probability `short_seq_prob` a uniform length in
      [2, max_seq_len − 3];
    - sentences are gathered into a chunk until it reaches the target (or the document ends); A is the first
      `a_end` sentences of the chunk (a_end uniform in [1, sentences − 1]), so segments end at sentence ends;
    - B is the rest of the chunk (true next), or — with probability 1/2, and always when the chunk holds a single
      sentence — a span of another document (random next), in which case the chunk's unused sentences are put
      back and start the next chunk;
    - the pair is trimmed to fit by `truncate_seq_pair`.

    `split_single_sentence=True` is fastbert's earlier variant: a one-sentence chunk is cut inside the sentence
    and gets a true-next B with probability 1/2, which keeps NSP near 50/50 on short documents (Google's rule
    gives ~64 % random pairs on the embedded lead paragraphs) at the price of true-next pairs cut mid-sentence
    while random B segments always start at a sentence start.
    """
    starts = docs.starts
    last = docs.doc_sents[doc_index + 1]
    max_num_tokens = max_seq_len - 3  # [CLS] A [SEP] B [SEP]
    target = max_num_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_num_tokens)
    instances: list[Instance] = []
    chunk_start = i = docs.doc_sents[doc_index]  # the chunk is sentences chunk_start .. i
    while i < last:
        if i == last - 1 or starts[i + 1] - starts[chunk_start] >= target:
            bounds = starts[chunk_start:i + 2]  # piece p of the chunk is tokens[bounds[p]:bounds[p + 1]]
            rewindable = True
            if split_single_sentence and len(bounds) == 2 and bounds[1] - bounds[0] >= 2:
                bounds = [bounds[0], bounds[0] + rng.randint(1, bounds[1] - bounds[0] - 1), bounds[1]]
                rewindable = False
            n_pieces = len(bounds) - 1
            a_end = rng.randint(1, n_pieces - 1) if n_pieces >= 2 else 1
            a = [bounds[0], bounds[a_end]]
            if n_pieces == 1 or rng.random() < 0.5:
                is_random = True
                b = _random_b(docs, doc_index, target - (a[1] - a[0]), rng)
                if rewindable:
                    i -= n_pieces - a_end  # the unused sentences of this chunk start the next one
            else:
                is_random = False
                b = [bounds[a_end], bounds[-1]]
            truncate_seq_pair(a, b, max_num_tokens, rng)
            if a[1] > a[0] and b[1] > b[0]:
                instances.append((a[0], a[1], b[0], b[1], is_random))
            chunk_start = i + 1
        i += 1
    return instances


def create_instances(
    docs: TokenDocs, max_seq_len: int, dupe_factor: int, short_seq_prob: float, rng: random.Random,
    split_single_sentence: bool = False,
) -> list[Instance]:
    """Every document `dupe_factor` times (different packing and random B each time), then shuffled. A lone
    document draws its random B from itself (as Google's code does)."""
    instances: list[Instance] = []
    for _ in range(dupe_factor):
        for d in range(len(docs)):
            instances.extend(
                instances_from_document(docs, d, max_seq_len, short_seq_prob, rng, split_single_sentence)
            )
    rng.shuffle(instances)
    return instances


def instance_arrays(docs: TokenDocs, instances: Sequence[Instance], vocab_size: int) -> dict[str, np.ndarray]:
    """The arrays of one shard (train/shards.py: tokens, offsets, len_a, is_random_next), in instance order."""
    n = len(instances)
    ranges = np.fromiter(itertools.chain.from_iterable(instances), dtype=np.int64, count=5 * n).reshape(n, 5)
    # The segments in output order (A then B of each instance): where each starts in `docs.tokens`, its length,
    # and where it starts in the output.
    seg_start = ranges[:, [0, 2]].ravel()  # (2n,)
    seg_len = (ranges[:, [1, 3]] - ranges[:, [0, 2]]).ravel()  # (2n,)
    seg_out = np.zeros(2 * n + 1, dtype=np.int64)
    np.cumsum(seg_len, out=seg_out[1:])
    tokens = np.empty(int(seg_out[-1]), dtype=token_dtype(vocab_size))
    source = docs.tokens
    step = 1 << 14  # segments per gather: its index arrays stay a few MB
    for s in range(0, 2 * n, step):
        e = min(s + step, 2 * n)
        # token t of the chunk comes from source[seg_start[k] + (t - first output position of segment k)]
        index = np.repeat(seg_start[s:e] - (seg_out[s:e] - seg_out[s]), seg_len[s:e])
        index += np.arange(seg_out[s], seg_out[e]) - seg_out[s]
        tokens[seg_out[s]:seg_out[e]] = source[index]
    return {"tokens": tokens, "offsets": seg_out[::2].copy(), "len_a": seg_len[::2].astype(np.int32),
            "is_random_next": ranges[:, 4].astype(np.uint8)}
