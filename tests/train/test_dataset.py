"""The pretraining loader: the global index over uneven and empty shards, the batch path (`__getitems__`) against
single items and `collate`, masking statistics (count, cap, 80/10/10, never special or padding, whole words), the
(seed, epoch, index) invariance across batches, data-loader workers and ranks, the step sampler, and bad input.

The prepared folders are written directly from synthetic instances (`fastbert.bench.data.write_sharded`), so these
tests do not depend on how `fastbert-prepare` cuts its pieces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fastbert.bench.data import write_sharded
from fastbert.tokenizer import SPECIAL_TOKENS
from train.dataset import IGNORE_INDEX, PretrainingDataset, StepBatchSampler, collate, keep_batch
from train.masking import CHOOSE, default_max_predictions, mask_batch, num_to_predict, position_hash, row_keys

T = 48
VOCAB = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(40)), "##x", "##y", "##z", "."]
PIECES = {VOCAB.index(p) for p in ("##x", "##y", "##z")}
TRAIN_SHARDS = (900, 0, 350, 1, 1250)  # uneven, one empty, one of a single instance


def instances(n: int, rng: np.random.Generator, full: float = 0.8, length: int | None = None) -> list:
    """n (A, B, is_random_next): 80 % full length (T − 3 body tokens) as prepare makes most of them; ~30 % of the
    tokens are `##` pieces, so words of 1 to 4 tokens."""
    out = []
    for _ in range(n):
        L = length or (T - 3 if rng.random() < full else int(rng.integers(2, T - 3)))
        body = np.where(rng.random(L) < 0.3, rng.choice(sorted(PIECES), L), rng.integers(5, 45, L))
        la = int(rng.integers(1, L))
        out.append((body[:la].tolist(), body[la:].tolist(), bool(rng.random() < 0.5)))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of 2,501 train instances in 5 shards and 40 held-out ones; and the instances, in global order."""
    rng = np.random.default_rng(0)
    train = [instances(n, rng) for n in TRAIN_SHARDS]
    folder = write_sharded(tmp_path_factory.mktemp("data") / "d", {"train": train, "heldout": [instances(40, rng), []]},
                           VOCAB, T)
    return folder, [inst for shard in train for inst in shard]


def rows_by_key(batch: dict, keys: list) -> dict:
    """key → (input_ids, labels, token_type_ids) of its row, cut to the row's real length."""
    n = batch["attention_mask"].sum(1)
    return {k: tuple(batch[f][r, :n[r]].tolist() for f in ("input_ids", "labels", "token_type_ids"))
            for r, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------- layout
def test_global_index_across_uneven_and_empty_shards(data):
    folder, truth = data
    ds = PretrainingDataset(folder, "train", seed=1)
    assert len(ds) == len(truth) == sum(TRAIN_SHARDS) and [len(s.len_a) for s in ds.shards] == list(TRAIN_SHARDS)
    assert ds.is_random_next.tolist() == [int(r) for _, _, r in truth]
    assert ds.len_a.tolist() == [len(a) for a, _, _ in truth]
    # Every instance, through the single-item and the batch path: [CLS] A [SEP] B [SEP], types 0 then 1.
    for i in (0, 899, 900, 1249, 1250, 1251, 2500):
        a, b, r = truth[i]
        ids, types, maskable, is_random = ds.instance(i)
        assert ids.tolist() == [ds.cls_id, *a, ds.sep_id, *b, ds.sep_id] and is_random == r
        assert types.tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert maskable.sum() == len(a) + len(b) and not maskable[[0, len(a) + 1, -1]].any()
    keys = [(0, int(i)) for i in np.random.default_rng(1).permutation(len(ds))[:300]]
    batch = ds.batch(keys)
    for (_, i), (ids, labels, types) in rows_by_key(batch, keys).items():
        a, b, _ = truth[i]
        original = np.where(np.array(labels) != IGNORE_INDEX, labels, ids)  # the masked tokens put back
        assert original.tolist() == [ds.cls_id, *a, ds.sep_id, *b, ds.sep_id]
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert batch["next_sentence_label"].tolist() == [int(truth[i][2]) for _, i in keys]


def test_batch_equals_collate_of_items_and_items_equal_rows(data):
    folder, _ = data
    for wwm in (False, True):
        ds = PretrainingDataset(folder, "train", seed=5, whole_word_mask=wwm)
        ds.set_epoch(3)
        keys = [7, (2, 900), 1250, (0, 7), 2500, 3, (3, 7)]  # bare indices take epoch 3: 7 and (3, 7) agree
        batch = ds.batch(keys)
        items = [ds[k] for k in keys]
        ref = collate(items)
        assert list(batch) == list(ref)
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"):
            assert batch[k].dtype == torch.int64 and torch.equal(batch[k], ref[k]), k
        for f in ("cu_seqlens", "token_indices", "labelled_positions"):
            assert torch.equal(getattr(batch["packed"], f), getattr(ref["packed"], f)), f
        for f in ("max_seqlen", "num_labelled", "seq_len", "lengths", "label_range"):
            assert getattr(batch["packed"], f) == getattr(ref["packed"], f), f
        assert torch.equal(batch["labels"][0], batch["labels"][6]) and items[0]["input_ids"].shape == (T,)
        batch["packed"].check(batch["input_ids"], batch["attention_mask"])


def test_a_batch_is_padded_to_its_longest_row_rounded_to_8(data):
    folder, truth = data
    ds = PretrainingDataset(folder, "train")
    short = [i for i, (a, b, _) in enumerate(truth) if len(a) + len(b) < 20][:3]
    longest = max(len(truth[i][0]) + len(truth[i][1]) + 3 for i in short)
    assert ds.batch(short)["input_ids"].shape == (3, -(-longest // 8) * 8)
    assert ds.batch([*short, 0])["input_ids"].shape == (4, T)  # never past max_seq_len


# ---------------------------------------------------------------------------------------------- masking
def test_masking_statistics(data):
    """Count, cap, never special or padding, labels = the original tokens, 80/10/10, uniform positions."""
    folder, truth = data
    ds = PretrainingDataset(folder, "train", seed=3)
    assert ds.max_predictions == default_max_predictions(T) == 8 and ds.cap_binds == 0.0
    b = ds.batch(list(range(len(ds))))
    x, lab, real = b["input_ids"].numpy(), b["labels"].numpy(), b["attention_mask"].numpy().astype(bool)
    n = real.sum(1)
    original = np.where(lab != IGNORE_INDEX, lab, x)
    chosen = lab != IGNORE_INDEX
    assert (chosen.sum(1) == np.minimum(8, np.maximum(1, np.round(0.15 * n)))).all()  # Google's count, per row
    assert abs(chosen.sum() / n.sum() - 0.15) < 0.01
    assert not (chosen & ~real).any() and not chosen[:, 0].any()  # never padding, never [CLS]
    assert not np.isin(original[chosen], [ds.cls_id, ds.sep_id]).any()  # never [SEP]
    assert (x[~chosen] == original[~chosen]).all()  # what is not chosen is untouched
    picked, got = original[chosen], x[chosen]
    frac = {"mask": np.mean(got == ds.mask_id), "keep": np.mean(got == picked),
            "random": np.mean((got != ds.mask_id) & (got != picked))}
    swapped = got[(got != ds.mask_id) & (got != picked)]
    assert set(swapped.tolist()) == set(ds.random_ids.tolist())  # every ordinary token, and only those, ...
    counts = np.bincount(swapped)[ds.random_ids]
    assert counts.max() < 2 * counts.mean() < 4 * counts.min()  # ... about equally often
    hit = 0.1 / len(ds.random_ids)  # a random replacement that draws the original token keeps it
    for name, p in (("mask", 0.8), ("keep", 0.1 + hit), ("random", 0.1 - hit)):
        assert abs(frac[name] - p) < 4 * np.sqrt(p * (1 - p) / len(picked)), (name, frac[name])
    # Uniform positions: in full-length rows each of the 45 body positions is chosen 7 / 45 of the time.
    full = n == T
    rate = chosen[full][:, 1:-1].sum(0)
    rate = rate[rate > 0] / full.sum()  # the [SEP] between A and B moves: its column is chosen less often
    assert abs(rate.mean() - 7 / 45) < 0.02 and np.abs(rate - 7 / 45).max() < 5 * np.sqrt(0.16 * 0.84 / full.sum())


def test_the_cap_binds_and_warns(data):
    folder, _ = data
    with pytest.warns(UserWarning, match=r"max_predictions=3 caps .* raise max_predictions to 8"):
        ds = PretrainingDataset(folder, "train", max_predictions=3)
    assert ds.cap_binds > 0.8
    lab = ds.batch(list(range(200)))["labels"]
    assert ((lab != IGNORE_INDEX).sum(1) <= 3).all() and ((lab != IGNORE_INDEX).sum(1) == 3).float().mean() > 0.8


def test_a_cap_equal_to_the_count_does_not_bind(tmp_path, recwarn):
    """Sequences of 40 tokens want round(0.15 · 40) = 6 predictions: a cap of 6 does not bind, 5 does (on all)."""
    folder = write_sharded(tmp_path / "d", {"train": [instances(30, np.random.default_rng(0), length=37)]}, VOCAB, T)
    assert PretrainingDataset(folder, max_predictions=6).cap_binds == 0.0
    assert not [w for w in recwarn if "max_predictions" in str(w.message)]
    with pytest.warns(UserWarning, match="max_predictions=5 caps the masked count of 100%"):
        assert PretrainingDataset(folder, max_predictions=5).cap_binds == 1.0


def test_whole_word_masking_takes_words_whole(data):
    folder, _ = data
    ds = PretrainingDataset(folder, "train", seed=2, whole_word_mask=True)
    b = ds.batch(list(range(len(ds))))
    x, lab, real = b["input_ids"].numpy(), b["labels"].numpy(), b["attention_mask"].numpy().astype(bool)
    chosen = lab != IGNORE_INDEX
    original = np.where(chosen, lab, x)
    k = np.minimum(8, np.maximum(1, np.round(0.15 * real.sum(1))))
    assert (chosen.sum(1) <= k).all() and chosen.sum() / k.sum() > 0.97  # rarely short of the count
    assert not (chosen & ~real).any() and not np.isin(original[chosen], [ds.cls_id, ds.sep_id]).any()
    # A ## piece is chosen with the token before it, unless that token is [CLS] / [SEP] (the piece starts a word).
    piece = np.isin(original[:, 1:], list(PIECES)) & ~np.isin(original[:, :-1], [ds.cls_id, ds.sep_id])
    assert piece.sum() > 5000 and (chosen[:, 1:][piece] == chosen[:, :-1][piece]).all()
    assert abs(np.mean(x[chosen] == ds.mask_id) - 0.8) < 0.02


def test_whole_words_that_do_not_fit_are_skipped():
    """[CLS] a ##b ##c d ##e [SEP] ##g ##h [SEP] with k = round(0.5 · 10) = 5: words {1,2,3} {4,5} | {7,8}, taken
    in a random order while they fit — 3 + 2 = 5, or 2 + 2 = 4 with the 3-token word skipped. Were {4,5} and {7,8}
    one word (Google's code joins a ## after [SEP] to segment A's last word) the sizes would be 3 or 4."""
    B = 400
    ids = np.tile(np.arange(100, 110), (B, 1))
    maskable = np.ones((B, 10), bool)
    maskable[:, [0, 6, 9]] = False
    word_start = np.tile(np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 1], bool), (B, 1))
    _, labels = mask_batch(ids, np.full(B, 10), maskable, row_keys(0, np.zeros(B), np.arange(B)), mask_id=1,
                           random_ids=np.arange(50, 60), mask_prob=0.5, word_start=word_start)
    chosen = labels != IGNORE_INDEX
    for w in ([1, 2, 3], [4, 5], [7, 8]):
        assert (chosen[:, w].all(1) | ~chosen[:, w].any(1)).all()  # a word is masked whole or not at all
    sizes = chosen.sum(1)
    assert set(sizes.tolist()) == {4, 5} and 0.2 < np.mean(sizes == 4) < 0.5  # word orders: 1/3 put {1,2,3} last


def googles_choice(order_key: np.ndarray, maskable: np.ndarray, word_start: np.ndarray, k: np.ndarray) -> np.ndarray:
    """A plain per-row port of Google's whole-word loop, words taken in the order of `order_key` at their start."""
    chosen = np.zeros(maskable.shape, bool)
    for b in range(len(k)):
        words: list[list[int]] = []
        for c in np.flatnonzero(maskable[b]):
            if words and c - 1 == words[-1][-1] and not word_start[b, c]:
                words[-1].append(c)  # a ## piece right after a maskable token joins its word
            else:
                words.append([c])
        count = 0
        for w in sorted(words, key=lambda w: order_key[b, w[0]]):
            if count >= k[b]:
                break
            if count + len(w) > k[b]:
                continue
            chosen[b, w] = True
            count += len(w)
    return chosen


def test_whole_word_choice_equals_googles_loop():
    """The vectorised fit (a prefix, then rank by rank, only the first ranks unless a row is not full) against a
    row-by-row loop: random layouts at odd lengths, long words, and words of 2 tokens with an odd count (a row is
    full only if it takes its one word of 1 token, often ranked past the first ranks tried)."""
    rng = np.random.default_rng(0)
    for T, start_share, B in ((13, 0.6, 64), (64, 0.3, 64), (64, 0.05, 32), (128, 0.5, 64)):
        n = rng.integers(5, T + 1, B)
        col = np.arange(T)
        la = rng.integers(1, n - 3)
        maskable = (col < (n - 1)[:, None]) & (col != 0) & (col != (la + 1)[:, None])
        word_start = rng.random((B, T)) < start_share
        if T == 128:  # 62 words of 2 tokens and one of 1, k = round(0.15 · 127) = 19: a row is full only with the 1
            n[:], maskable = T - 1, np.tile((col > 0) & (col < T - 2), (B, 1))
            word_start = np.tile(col % 2 == 1, (B, 1))
        keys = row_keys(1, np.zeros(B), np.arange(B))
        k = num_to_predict(n, 0.15, 10**6)
        _, labels = mask_batch(np.tile(col + 100, (B, 1)), n, maskable, keys, mask_id=1, random_ids=np.arange(50, 60),
                               max_predictions=10**6, word_start=word_start)
        order_key = position_hash(keys[:, None], col, CHOOSE) >> np.uint64(33)
        assert ((labels != IGNORE_INDEX) == googles_choice(order_key, maskable, word_start, k)).all(), T


# ---------------------------------------------------------------------------------------------- invariance
def test_masking_depends_on_seed_epoch_and_index_only(data):
    folder, _ = data
    ds = PretrainingDataset(folder, "train", seed=1, whole_word_mask=True)
    keys = [(e, int(i)) for e in (0, 1) for i in np.random.default_rng(2).permutation(len(ds))[:64]]
    whole = rows_by_key(ds.batch(keys), keys)
    # Other batch compositions (orders, sizes, neighbours, padded widths): the same rows.
    for part in (keys[::-1], keys[5:9], [keys[3]], [*keys[10:20], (0, 2500), (1, 3)]):
        for k, row in rows_by_key(ds.batch(part), part).items():
            if k in whole:
                assert row == whole[k], k
    again = PretrainingDataset(folder, "train", seed=1, whole_word_mask=True)  # another copy (another worker)
    assert rows_by_key(again.batch(keys), keys) == whole
    # A new draw for another epoch or seed; fixed masking ignores the epoch.
    assert sum(whole[(0, i)][1] != whole[(1, i)][1] for _, i in keys[:64]) > 50
    other = rows_by_key(PretrainingDataset(folder, "train", seed=2, whole_word_mask=True).batch(keys), keys)
    assert sum(other[k][1] != whole[k][1] for k in keys) > 100
    fixed = PretrainingDataset(folder, "heldout", seed=1, fixed_masking=True)
    assert torch.equal(fixed[(0, 2)]["labels"], fixed[(7, 2)]["labels"])
    ds.set_epoch(1)
    assert rows_by_key(ds.batch([keys[70][1]]), [keys[70]]) == {keys[70]: whole[keys[70]]}


def test_a_rows_masking_does_not_depend_on_the_batch_width():
    """Row 30546 (seed 0, 100 tokens) has two candidates whose hashes tie in the 22 random bits of a 512-wide key
    but not in the 24 of a 104-wide one: ranked by the batch's width, its choice changes with the padding; ranked
    by max_len, it does not."""
    L, key = 100, row_keys(0, np.zeros(1), np.array([30546]))

    def labels(width: int, max_len: int | None) -> np.ndarray:
        ids = np.zeros((1, width), np.int64)
        ids[0, :L] = np.arange(L) + 10
        maskable = np.zeros((1, width), bool)
        maskable[0, 1:L - 1] = True
        return mask_batch(ids, np.array([L]), maskable, key, mask_id=4, random_ids=np.arange(5, 1000),
                          max_predictions=77, max_len=max_len)[1][0, :L]

    assert not np.array_equal(labels(104, None), labels(512, None))  # the tie is real
    assert np.array_equal(labels(104, 512), labels(512, 512))
    with pytest.raises(ValueError, match="below the batch's width"):
        labels(104, 96)


def test_data_loader_workers_and_ranks_see_the_same_batches(data):
    folder, _ = data
    ds = PretrainingDataset(folder, "train", seed=4)

    def loader(workers: int, world: int = 1, rank: int = 0, micro: int = 24) -> list[dict]:
        sampler = StepBatchSampler(len(ds), micro, 1, world, rank, seed=9, start_step=100, num_steps=4)
        return list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=keep_batch,
                                                num_workers=workers))

    single = loader(0)
    for a, b in zip(single, loader(2), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "token_type_ids", "attention_mask"))
        assert a["packed"].lengths == b["packed"].lengths
    # Two ranks of 12 = one process of 24: rank r's rows are rows [12 r, 12 r + 12) of the single batch.
    ranks = [loader(0, 2, r, 12) for r in (0, 1)]
    for step, one in enumerate(single):
        for r in (0, 1):
            part = ranks[r][step]
            width = part["input_ids"].shape[1]
            assert torch.equal(part["labels"], one["labels"][12 * r:12 * r + 12, :width])
            assert not one["attention_mask"][12 * r:12 * r + 12, width:].any()


def test_step_batch_sampler_shards_and_resumes():
    one = StepBatchSampler(50, micro_batch=3, grad_accum=2, world_size=2, rank=0, seed=7, start_step=0,
                           num_steps=20)
    single = StepBatchSampler(50, micro_batch=6, grad_accum=2, world_size=1, rank=0, seed=7, start_step=0,
                              num_steps=20)
    assert one.steps_per_epoch == 4  # 50 // 12, the incomplete global batch dropped
    for step in (0, 3, 4, 9):
        r0 = StepBatchSampler(50, 3, 2, 2, 0, 7, 0, 20).step_indices(step)
        r1 = StepBatchSampler(50, 3, 2, 2, 1, 7, 0, 20).step_indices(step)
        ranks = sorted(k for mb in r0 + r1 for k in mb)
        assert ranks == sorted(k for mb in single.step_indices(step) for k in mb)  # same global batch
        assert len({i for _, i in ranks}) == 12 and {e for e, _ in ranks} == {step // 4}
    # Each epoch sees distinct instances, in a new order.
    e0 = [i for s in range(4) for mb in single.step_indices(s) for _, i in mb]
    e1 = [i for s in range(4, 8) for mb in single.step_indices(s) for _, i in mb]
    assert len(set(e0)) == 48 and e0 != e1
    # A sampler started at step 5 yields exactly the tail of the full stream.
    full = list(StepBatchSampler(50, 3, 2, 2, 1, 7, 0, 10))
    tail = list(StepBatchSampler(50, 3, 2, 2, 1, 7, 5, 5))
    assert tail == full[10:] and len(full) == 20


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_folders_are_refused_by_name(data, tmp_path):
    folder, _ = data
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    meta = json.loads((bad / "meta.json").read_text())

    def with_meta(**changes):
        (bad / "meta.json").write_text(json.dumps({**meta, **changes}))

    for path in (bad / "shards").glob("train-00001.*"):  # the empty shard: its files are not needed
        path.unlink()
    assert len(PretrainingDataset(bad)) == sum(TRAIN_SHARDS)
    with_meta(format_version=2)
    with pytest.raises(ValueError, match=r"format version 2 is not 3; prepare the data again"):
        PretrainingDataset(bad)
    shards = meta["splits"]["train"]["shards"]
    with_meta(splits={**meta["splits"], "train": {"shards": [{**shards[0], "name": "../../etc"}]}})
    with pytest.raises(ValueError, match="bad shard entry"):
        PretrainingDataset(bad)
    with_meta(splits={**meta["splits"], "train": {"shards": [{**shards[0], "instances": 901}]}})
    with pytest.raises(ValueError, match=r"train-00000.offsets.npy: int64 \(901,\), meta.json says \(902,\)"):
        PretrainingDataset(bad)
    with_meta()
    for array in ("offsets", "tokens"):  # a per-instance array, and the token array (read lazily)
        path = bad / "shards" / f"train-00002.{array}.npy"
        kept = path.read_bytes()
        path.write_bytes(kept[:-100])
        with pytest.raises(ValueError, match=rf"train-00002.{array}.npy is truncated or corrupt"):
            PretrainingDataset(bad)
        path.write_bytes(kept)
    (bad / "shards" / "train-00002.offsets.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00002.offsets.npy is missing"):
        PretrainingDataset(bad)
    with pytest.raises(FileNotFoundError, match="run fastbert-prepare first"):
        PretrainingDataset(tmp_path)
    with pytest.raises(ValueError, match="split"):
        PretrainingDataset(folder, "test")


def test_bad_keys_and_token_ids(data, tmp_path):
    folder, _ = data
    ds = PretrainingDataset(folder, "train")
    for key in (len(ds), -1, (0, len(ds))):
        with pytest.raises(IndexError, match=f"out of range for {len(ds)} instances"):
            ds[key]
    with pytest.raises(IndexError, match="out of range"):
        ds.batch([0, 1, len(ds)])
    with pytest.raises(ValueError, match="non-empty list"):
        ds.batch([])
    rogue = write_sharded(tmp_path / "r", {"train": [[([5, 6], [7], False), ([5, len(VOCAB) + 3], [7], True)]]},
                          VOCAB, T)
    ds = PretrainingDataset(rogue)
    assert ds.instance(0)[0].tolist() == [2, 5, 6, 3, 7, 3] and ds[0]["attention_mask"].sum() == 6
    with pytest.raises(ValueError, match=r"train-00000.tokens.npy: token id 52 outside the vocabulary of 49"):
        ds[1]
