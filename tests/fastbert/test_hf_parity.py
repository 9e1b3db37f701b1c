"""The reference model and tokenizer against Hugging Face `transformers`.

- the real all-MiniLM-L6-v2 checkpoint: hidden states, pooled output and token ids (fp32);
- random odd-sized configs: every head's logits, loss and every parameter gradient (float64);
- a `transformers` model still builds and runs with fastbert's top-level `kernels` package importable.

Fully padded rows. fastbert fills masked scores with the dtype's minimum, so a row whose every key is padding
attends uniformly over its keys (finite). `transformers`' eager attention does exactly the same (checked in
`test_fully_padded_row_vs_transformers`). Its default SDPA path passes a boolean mask to
`torch.nn.functional.scaled_dot_product_attention`, whose math backend returns a zero attention context for
a row with no allowed key, so that row's hidden states differ from fastbert's (real rows do not). The
parity tests therefore compare real tokens only and give the fully padded row label -100 (ignored) in every
loss that can ignore a row; the MSE regression loss cannot, so that case runs against eager attention.

Gradients through a fully padded row differ even from eager attention: transformers adds the mask
(`scores + finfo.min`), which rounds to a uniform softmax in the forward pass but still passes a non-zero
gradient to that row's scores (the derivative of softmax(s + c), a constant shift, is that of softmax(s));
fastbert's `masked_fill` makes the scores constant, so their gradient is zero, consistent with the forward
value. Gradients are therefore compared through losses that leave the fully padded row out.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastbert
from fastbert.config import FUSION_FLAGS
from fastbert.tokenizer import Tokenizer
from tests.helpers import require

transformers = require("transformers")

REFERENCE = {flag: False for flag in FUSION_FLAGS}  # the plain PyTorch model, whatever fusions exist

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT was pre-trained on Wikipedia and the BooksCorpus.",
    "Hi!",
    "Tokenizers split unaffordable words like antidisestablishmentarianism into word pieces, don't they?",
    "Naïve café owners in Zürich serve crème brûlée — 3.5 francs.",
    "A short one.",
]
PAIRS = [
    "It was sleeping in the sun.",
    "Google released it in 2018.",
    "Hello there, how are you doing today?",
    "Yes.",
    "Ça coûte cher.",
    "And a somewhat longer second sentence to pair with it, so that truncation has work to do.",
]


@pytest.fixture(scope="module")
def minilm_folder():
    return require("minilm")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- MiniLM
def test_minilm_matches_transformers(minilm_folder, offline):
    tok = Tokenizer.from_file(minilm_folder)
    batch = tok.encode(SENTENCES)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the batch must contain padding"

    ours = fastbert.BertModel.from_pretrained(minilm_folder, **REFERENCE)
    theirs = transformers.BertModel.from_pretrained(minilm_folder, local_files_only=True).eval()
    assert ours.config.hidden_size == 384 and ours.config.num_hidden_layers == 6
    with torch.no_grad():
        hidden, pooled = ours(**batch)
        ref = theirs(**batch)
    diff = (hidden - ref.last_hidden_state).abs()[mask]  # real tokens only
    assert diff.max().item() <= 1e-5, f"hidden states differ by {diff.max().item():.2e}"
    assert (pooled - ref.pooler_output).abs().max().item() <= 1e-5
    assert hidden.abs().max() > 0.1  # a real model, not zeros


def test_minilm_tokenizer_matches_transformers(minilm_folder, offline):
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_folder, local_files_only=True)
    # Make sure transformers really read the MiniLM vocabulary (it can silently fall back to an empty one).
    vocab_lines = (minilm_folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(theirs) == len(vocab_lines) == 30522
    assert theirs.convert_tokens_to_ids(["[MASK]", "fox", "##ing"]) == [
        vocab_lines.index("[MASK]"), vocab_lines.index("fox"), vocab_lines.index("##ing")
    ]

    for source in ("tokenizer.json", "vocab.txt"):
        ours = Tokenizer.from_file(minilm_folder / source)
        assert ours.vocab_size == len(theirs)
        assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id, ours.unk_id) == (
            theirs.pad_token_id, theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id, theirs.unk_token_id
        )
        for pairs, max_length in ((None, 128), (PAIRS, 128), (PAIRS, 20), (None, 9)):
            got = ours.encode(SENTENCES, pairs, max_length=max_length)
            want = theirs(
                SENTENCES, pairs, max_length=max_length, padding="longest", truncation="longest_first",
                return_tensors="pt",
            )
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                assert torch.equal(got[key], want[key]), f"{source}, pairs={pairs is not None}, {key}"
        ids = ours.encode(SENTENCES[4])["input_ids"][0]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- random configs
def make_pair(model_cls: str, dtype=torch.float64, attn="sdpa", **config):
    """A fastbert model (reference path) and the transformers model with the same weights, dropout off."""
    cfg = fastbert.BertConfig(
        vocab_size=211, num_hidden_layers=2, max_position_embeddings=64, **REFERENCE, **config
    )
    torch.manual_seed(0)
    ours = getattr(fastbert, model_cls)(cfg).to(dtype).eval()
    hf_cfg = transformers.BertConfig(**cfg.to_dict())  # also checks that transformers accepts our config
    hf_cfg._attn_implementation = attn
    theirs = getattr(transformers, model_cls)(hf_cfg).to(dtype).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ours, theirs


def random_batch(B: int, T: int, vocab: int, seed: int):
    """ids, token types and a padding mask with one full row, one fully padded row, random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (B,), generator=g)
    lengths[0], lengths[2] = T, 0  # row 2 is fully padded
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    ids = torch.randint(1, vocab, (B, T), generator=g).masked_fill(~mask, 0)
    types = (torch.arange(T)[None, :] >= (lengths // 2)[:, None]).long() * mask
    return ids, types, mask.long(), g


def assert_grads_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours_p = dict(ours.named_parameters(remove_duplicate=False))
    theirs_p = dict(theirs.named_parameters(remove_duplicate=False))
    assert set(ours_p) == set(theirs_p)
    for name, p in ours_p.items():
        q = theirs_p[name]
        assert p.grad is not None and q.grad is not None, name
        # float64 on both sides: only summation order differs.
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert any(p.grad.abs().max() > 0 for p in ours_p.values())


SIZES = [dict(hidden_size=96, num_attention_heads=3, intermediate_size=200),
         dict(hidden_size=160, num_attention_heads=5, intermediate_size=333, hidden_act="gelu_new")]


@pytest.mark.parametrize("size, attn", [(SIZES[0], "sdpa"), (SIZES[1], "eager")], ids=["h96-sdpa", "h160-eager"])
def test_pretraining_matches_transformers(size, attn):
    ours, theirs = make_pair("BertForPreTraining", attn=attn, **size)
    B, T = 5, 37
    ids, types, mask, g = random_batch(B, T, 211, seed=1)
    labels = torch.where(
        (torch.rand(B, T, generator=g) < 0.3) & mask.bool(), torch.randint(0, 211, (B, T), generator=g), -100
    )
    nsp = torch.randint(0, 2, (B,), generator=g)
    nsp[2] = -100  # the fully padded row (see the module docstring)
    a = ours(ids, mask, types, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    real = mask.bool()
    torch.testing.assert_close(a.prediction_logits[real], b.prediction_logits[real], rtol=1e-10, atol=1e-12)
    rows = real.any(1)
    torch.testing.assert_close(a.seq_relationship_logits[rows], b.seq_relationship_logits[rows],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    a.loss.backward()
    b.loss.backward()
    assert_grads_equal(ours, theirs)


@pytest.mark.parametrize("num_labels, attn", [(3, "sdpa"), (1, "eager")], ids=["classes", "regression"])
def test_sequence_classification_matches_transformers(num_labels, attn):
    ours, theirs = make_pair("BertForSequenceClassification", attn=attn, num_labels=num_labels, **SIZES[1])
    B, T = 6, 37
    ids, types, mask, g = random_batch(B, T, 211, seed=2)
    if num_labels == 1:
        labels = torch.randn(B, generator=g, dtype=torch.float64)
    else:
        labels = torch.randint(0, num_labels, (B,), generator=g)
        labels[2] = -100
    a = ours(ids, mask, types, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    rows = mask.bool().any(1)
    if num_labels == 1:
        # Eager: every row's logit and the loss over all rows agree. The gradient is compared through the
        # real rows only (see the module docstring for why a fully padded row's gradient differs).
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
        loss_a = torch.nn.functional.mse_loss(a.logits[rows, 0], labels[rows])
        loss_b = torch.nn.functional.mse_loss(b.logits[rows, 0], labels[rows])
    else:
        torch.testing.assert_close(a.logits[rows], b.logits[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
        loss_a, loss_b = a.loss, b.loss
    loss_a.backward()
    loss_b.backward()
    assert_grads_equal(ours, theirs)


def test_question_answering_matches_transformers():
    ours, theirs = make_pair("BertForQuestionAnswering", **SIZES[0])
    B, T = 6, 37
    ids, types, mask, g = random_batch(B, T, 211, seed=3)
    start = torch.randint(0, T, (B,), generator=g)
    end = torch.randint(0, T, (B,), generator=g)
    start[1], end[4] = T + 5, -3  # out of range: clamped (start ignored, end to 0), as transformers does
    start[2] = end[2] = T  # the fully padded row: ignored
    a = ours(ids, mask, types, start_positions=start, end_positions=end)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=start,
               end_positions=end)
    real = mask.bool()
    torch.testing.assert_close(a.start_logits[real], b.start_logits[real], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.end_logits[real], b.end_logits[real], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    a.loss.backward()
    b.loss.backward()
    assert_grads_equal(ours, theirs)


def test_fully_padded_row_vs_transformers():
    """What transformers does on a row with no real token (see the module docstring): eager attention
    equals fastbert exactly; SDPA gives the row a zero attention context, so its hidden states differ."""
    ours, eager = make_pair("BertModel", attn="eager", **SIZES[0])
    _, sdpa = make_pair("BertModel", attn="sdpa", **SIZES[0])
    sdpa.load_state_dict(ours.state_dict())
    ids, types, mask, _ = random_batch(4, 37, 211, seed=4)
    with torch.no_grad():
        h = ours(ids, mask, types).last_hidden_state
        h_eager = eager(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        h_sdpa = sdpa(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(h, h_eager, rtol=1e-10, atol=1e-12)  # every position, padded row included
    torch.testing.assert_close(h[real], h_sdpa[real], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(h_sdpa).all()
    assert (h[2] - h_sdpa[2]).abs().max() > 1e-3  # the documented difference


# ---------------------------------------------------------------------------------------------- package names
def test_transformers_works_with_fastbert_kernels_package():
    """fastbert's top-level package is named `kernels`, like the unrelated hub package `transformers` probes
    for (`is_kernels_available`). With ours importable, transformers must still build and run a BERT.

    Run in a fresh interpreter: the probe is cached per process, so only a new process shows what a user
    who imports fastbert first gets."""
    code = textwrap.dedent(
        """
        import fastbert, kernels
        import torch, transformers
        from transformers.utils import import_utils
        assert not import_utils.is_kernels_available(), "transformers mistook fastbert's kernels for the hub's"
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=1,
                                      num_attention_heads=3, intermediate_size=64)
        model = transformers.BertModel(cfg).eval()
        ids = torch.randint(0, 97, (2, 11))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert out.shape == (2, 11, 48) and torch.isfinite(out).all()
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
