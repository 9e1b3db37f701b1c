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

Positions (and words) are ranked by 32-bit keys, which numpy sorts and partitions far faster than 64-bit ones:
31 bits of the position's hash with the column in the lowest ⌈log2 T⌉ of them, so keys never tie. T there is
`max_len` (the widest the rows are ever padded to), not the batch's width: a row's keys, hence its masking, are
then the same in a batch of any width.

Caution: when the k-th and (k + 1)-th smallest random parts of a row tie (31 − ⌈log2 T⌉ bits: 24 at T = 128, 22 at
512; about one row in 130,000 at 128 and one in 8,000 at 512), the lower column is chosen; and the random
replacement is ⌊(32 random bits) · |random_ids| / 2³²⌋, uniform up to |random_ids| / 2³² (7e-6 for BERT's vocabulary).
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
_NEVER = np.uint32(0xFFFFFFFF)  # the rank key of a position that cannot be chosen (a candidate's is below 2³¹)


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


def _rank_keys(h: np.ndarray, candidates: np.ndarray, max_len: int) -> tuple[np.ndarray, np.uint32]:
    """(uint32 [B, T] keys in random order, distinct within a row: 31 bits of the hash h (uint64 [B, T]) with the
    column in the low ⌈log2 max_len⌉ bits — `_NEVER` where `candidates` (bool [B, T]) is False —, the mask of the
    column bits)."""
    T = h.shape[1]
    low = np.uint32((1 << max(1, (max_len - 1).bit_length())) - 1)
    key = (h >> _U64(33)).astype(np.uint32)
    key &= ~low
    key |= np.arange(T, dtype=np.uint32)
    key[~candidates] = _NEVER
    return key, low


def _k_smallest(key: np.ndarray, k: np.ndarray) -> np.ndarray:
    """bool [B, T]: the k[b] smallest keys of each row (uint32 [B, T], distinct within a row); k[b] <= the row's
    keys below `_NEVER`."""
    B, T = key.shape
    kmax = int(k.max(initial=0))
    if kmax == 0:
        return np.zeros((B, T), dtype=bool)
    low = np.sort(np.partition(key, kmax - 1, axis=1)[:, :kmax] if kmax < T else key, axis=1)  # (B, kmax)
    threshold = low[np.arange(B), np.maximum(k, 1) - 1]  # the k-th smallest key of each row
    return (key <= threshold[:, None]) & (k > 0)[:, None]


def _greedy_fit(size: np.ndarray, n_words: np.ndarray, k: np.ndarray, never: int) -> tuple[np.ndarray, np.ndarray]:
    """Google's fit: words taken in order while each fits in k, one that would overflow skipped. size int64 [m, B]
    (tokens of each row's words, in its order); n_words [B] (ranks past it are not words; `never` > any k).
    Returns (taken bool [m, B], tokens taken [B])."""
    m, B = size.shape
    size[np.arange(m)[:, None] >= n_words] = never
    # Up to the first word that does not fit, the fit takes a prefix of the order (a cumsum); from there one word
    # rank at a time across all rows, until every row is full or out of words.
    total = np.cumsum(size, axis=0)  # (m, B)
    taken = total <= k
    first_miss = taken.sum(0)  # (B,) rank of the first word that does not fit
    count = np.where(first_miss > 0, total[np.maximum(first_miss, 1) - 1, np.arange(B)], 0)
    last = n_words - 1
    for j in range(int(first_miss.min(initial=m)), m):
        if ((count >= k) | (last < j)).all():
            break
        grown = count + size[j]
        fits = (grown <= k) & (j > first_miss)  # ranks before a row's first miss are its prefix
        taken[j] |= fits
        np.copyto(count, grown, where=fits)
    return taken, count


def _whole_words(h: np.ndarray, maskable: np.ndarray, word_start: np.ndarray, k: np.ndarray,
                 max_len: int) -> np.ndarray:
    """bool [B, T]: whole words chosen in the order of their start hashes while each fits in k (module
    docstring)."""
    B, T = h.shape
    prev = np.zeros_like(maskable)
    prev[:, 1:] = maskable[:, :-1]
    starts = maskable & (word_start | ~prev)  # a word starts at a non-## token or after [CLS] / [SEP]
    # Word ids across the batch: row b's words are b·(T + 1) + 1, 2, ...; a ## piece has its word's id.
    word = np.cumsum(starts, axis=1) + np.arange(0, B * (T + 1), T + 1)[:, None]  # (B, T)
    size = np.bincount(word[maskable], minlength=B * (T + 1))  # tokens per word id
    n_words = starts.sum(1)
    W = int(n_words.max(initial=0))
    if W == 0:
        return np.zeros((B, T), dtype=bool)
    key, low = _rank_keys(h, starts, max_len)
    # Rows are full after about k words: the first m ranks are ordered and tried; a row that is not full by then
    # (many words that did not fit) has the whole order tried.
    m = min(W, 2 * int(k.max(initial=0)) + 16)
    while True:
        first = np.partition(key, m - 1, axis=1)[:, :m] if m < T else key
        col = np.minimum(np.sort(first, axis=1)[:, :m] & low, T - 1).astype(np.int64)  # (B, m) start columns
        ordered = word.ravel()[col + np.arange(0, B * T, T)[:, None]]  # (B, m) word ids, in random order
        taken, count = _greedy_fit(size[ordered.T], n_words, k, T + 1)  # (m, B), (B,)
        if m == W or not ((count < k) & (n_words > m)).any():
            break
        m = W
    chosen = np.zeros(B * (T + 1), dtype=bool)
    chosen[ordered[taken.T]] = True
    return maskable & chosen[word]


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
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of a padded batch (module docstring).

    ids int64 [B, T]; lengths int [B] (real tokens of each row, [CLS]/[SEP] counted); maskable bool [B, T]
    (real tokens other than [CLS]/[SEP]); keys uint64 [B] (`row_keys`); random_ids int64 [V'] (the ordinary
    tokens a random replacement is drawn from); word_start bool [B, T] (True where the token is not a `##`
    continuation) turns on whole-word masking. max_len (default T): the widest these rows are ever padded to
    (the dataset's max_seq_len); give it so that a row is masked the same in a batch of any width. Returns
    (masked ids int64 [B, T], labels int64 [B, T] with -100 where nothing is predicted)."""
    B, T = ids.shape
    max_len = T if max_len is None else max_len
    if max_len < T:
        raise ValueError(f"max_len {max_len} is below the batch's width {T}")
    keys = np.asarray(keys, dtype=np.uint64)
    k = num_to_predict(lengths, mask_prob, max_predictions)
    h = position_hash(keys[:, None], np.arange(T), CHOOSE)  # (B, T)
    if word_start is None:
        chosen = _k_smallest(_rank_keys(h, maskable, max_len)[0], np.minimum(k, maskable.sum(1)))
    else:
        chosen = _whole_words(h, maskable, word_start, k, max_len)
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
