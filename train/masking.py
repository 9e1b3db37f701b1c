"""BERT's masked-LM masking of a whole batch at once, in numpy, with counter-based randomness.

Every random draw is a hash of (seed, epoch, index, position): `row_keys` mixes (seed, epoch, index) into one
64-bit key per sequence, `position_hash` mixes that key with a position (splitmix64's finaliser, a bijection
of 64-bit words with good avalanche, applied to key + (position + 1) · golden ratio, as splitmix64 steps its
state). No generator is made per sequence, and a sequence's masking depends on its key and its tokens only —
not on the batch, the worker or the rank it lands in, nor on how wide the batch is padded.

The rule (Google's `create_pretraining_data.py`), per sequence of n tokens ([CLS] and [SEP] counted):
    count     k = round(mask_prob · n) (round half to even), at least 1, at most `max_predictions`
    choice    k positions among the real tokens other than [CLS] / [SEP] (padding never): the k smallest
              hashes of the candidate positions, i.e. a uniform k-subset
    80/10/10  each chosen token becomes [MASK] (0.8), a uniform random ordinary token (0.1), or stays (0.1),
              decided by a second hash stream of its position; its label is the original id, -100 elsewhere
    words     with `word_start` (True where a token is not a `##` continuation): words — a start piece and the
              `##` pieces after it — are taken in the order of the hashes of their start positions, each while
              it fits in k; a word that would overflow k is skipped and the next tried (Google's rule); a `##`
              piece right after [SEP] starts a word (Google's code would join it to segment A's last word).

Caution: the random replacement is drawn as ⌊(32 random bits) · |random_ids| / 2³²⌋, uniform up to a bias of
|random_ids| / 2³² (7e-6 for BERT's vocabulary). Ties between two 64-bit hashes of one row (probability ~T²/2⁶⁵)
are broken by argsort's order.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE_INDEX = -100

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = _U64(30), _U64(27), _U64(31), _U64(32)
# Independent streams of one row key: which positions are chosen, and what becomes of a chosen token.
CHOOSE, REPLACE = _U64(0x243F6A8885A308D3), _U64(0x13198A2E03707344)
_MASK_BELOW = _U64(int(0.8 * 2**32))  # of the top 32 bits of the REPLACE hash: [MASK] below 0.8 · 2³²,
_RANDOM_BELOW = _U64(int(0.9 * 2**32))  # a random token from 0.8 to 0.9 · 2³², unchanged above
_LOW32 = _U64(0xFFFFFFFF)
_NEVER = np.iinfo(np.uint64).max  # the hash of a position that cannot be chosen


def default_max_predictions(max_seq_len: int, mask_prob: float = 0.15) -> int:
    """ceil(mask_prob × max_seq_len): 20 at 128, 77 at 512, 10 at 64 (at 15 %)."""
    return max(1, math.ceil(round(mask_prob * max_seq_len, 6)))


def num_to_predict(length: int | np.ndarray, mask_prob: float, max_predictions: int) -> np.ndarray:
    """Google's count: round(mask_prob × all tokens of the sequence), at least 1, at most max_predictions."""
    return np.minimum(max_predictions, np.maximum(1, np.round(np.asarray(length) * mask_prob).astype(np.int64)))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def row_keys(seed: int, epoch: np.ndarray, index: np.ndarray) -> np.ndarray:
    """One 64-bit key per sequence from (seed, epoch, index): uint64 [B]."""
    z = np.full(len(index), seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    for v in (epoch, index):
        z += _GOLDEN
        _mix(z)
        z ^= np.asarray(v).astype(np.uint64)
    z += _GOLDEN
    return _mix(z)


def position_hash(keys: np.ndarray, positions: np.ndarray, stream: np.uint64) -> np.ndarray:
    """Hash of (key, stream, position) for broadcastable keys and positions (uint64 result of their shape)."""
    z = (keys ^ stream) + (positions.astype(np.uint64) + _U64(1)) * _GOLDEN
    return _mix(z)


def _k_smallest(h: np.ndarray, k: np.ndarray) -> np.ndarray:
    """bool [B, T]: the k[b] smallest entries of each row of h (uint64 [B, T]); k[b] <= the row's entries
    below `_NEVER`."""
    B, T = h.shape
    kmax = int(k.max(initial=0))
    if kmax == 0:
        return np.zeros((B, T), dtype=bool)
    low = np.sort(np.partition(h, kmax - 1, axis=1)[:, :kmax] if kmax < T else h, axis=1)  # (B, kmax)
    threshold = low[np.arange(B), np.maximum(k, 1) - 1]  # the k-th smallest hash of each row
    return (h <= threshold[:, None]) & (k > 0)[:, None]


def _whole_words(h: np.ndarray, maskable: np.ndarray, word_start: np.ndarray, k: np.ndarray) -> np.ndarray:
    """bool [B, T]: whole words chosen in the order of their start hashes while each fits in k (module
    docstring)."""
    B, T = h.shape
    prev = np.zeros_like(maskable)
    prev[:, 1:] = maskable[:, :-1]
    starts = maskable & (word_start | ~prev)  # a word starts at a non-## token or after [CLS] / [SEP]
    word = np.cumsum(starts, axis=1) - 1  # (B, T) word number of each position (of its word, for ## pieces)
    n_words = starts.sum(1)
    W = int(n_words.max(initial=0))
    # Tokens per word: bincount over (row, word) of the maskable positions.
    flat = (np.arange(B)[:, None] * T + word)[maskable]
    size = np.bincount(flat, minlength=B * T).reshape(B, T)[:, :W]  # (B, W)
    order = np.argsort(np.where(starts, h, _NEVER), axis=1)[:, :W]  # (B, W) start positions, random order
    ordered = np.take_along_axis(word, order, 1)  # (B, W) word numbers in that order
    ordered_size = np.take_along_axis(size, ordered, 1)
    # Google's greedy fit, one word rank at a time across all rows; most rows are full after about k words.
    taken = np.zeros((B, W), dtype=bool)
    count = np.zeros(B, dtype=np.int64)
    for j in range(W):
        fits = (count + ordered_size[:, j] <= k) & (j < n_words)
        taken[:, j] = fits
        count += np.where(fits, ordered_size[:, j], 0)
        if np.all((count >= k) | (j + 1 >= n_words)):
            break
    chosen_word = np.zeros((B, T), dtype=bool)
    rows = np.broadcast_to(np.arange(B)[:, None], (B, W))
    chosen_word[rows[taken], ordered[taken]] = True
    return maskable & np.take_along_axis(chosen_word, np.maximum(word, 0), 1)


def mask_batch(
    ids: np.ndarray,
    lengths: np.ndarray,
    maskable: np.ndarray,
    keys: np.ndarray,
    *,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    max_predictions: int = 20,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of a padded batch (module docstring).

    ids int64 [B, T]; lengths int [B] (real tokens of each row, [CLS]/[SEP] counted); maskable bool [B, T]
    (real tokens other than [CLS]/[SEP]); keys uint64 [B] (`row_keys`); random_ids int64 [V'] (the ordinary
    tokens a random replacement is drawn from); word_start bool [B, T] (True where the token is not a `##`
    continuation) turns on whole-word masking. Returns (masked ids int64 [B, T], labels int64 [B, T] with -100
    where nothing is predicted)."""
    B, T = ids.shape
    keys = np.asarray(keys, dtype=np.uint64)
    k = num_to_predict(lengths, mask_prob, max_predictions)
    h = position_hash(keys[:, None], np.arange(T), CHOOSE)  # (B, T)
    if word_start is None:
        h[~maskable] = _NEVER
        chosen = _k_smallest(h, np.minimum(k, maskable.sum(1)))
    else:
        chosen = _whole_words(h, maskable, word_start, k)
    rows, cols = np.nonzero(chosen)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    labels[rows, cols] = ids[rows, cols]
    r = position_hash(keys[rows], cols, REPLACE)  # (n_chosen,)
    top = r >> _S32
    out = ids.copy()
    out[rows[top < _MASK_BELOW], cols[top < _MASK_BELOW]] = mask_id
    swap = (top >= _MASK_BELOW) & (top < _RANDOM_BELOW)
    pick = ((r[swap] & _LOW32) * _U64(len(random_ids))) >> _S32  # uniform in [0, |random_ids|)
    out[rows[swap], cols[swap]] = random_ids[pick.astype(np.int64)]
    return out, labels
