"""`fastbert.optimize` on transformers and fastbert models: same outputs (and gradients) as the unmodified model.

Runs through Triton's interpreter on CPU, fp32. Padded positions and fully padded rows are excluded from the
comparisons (the reference attends uniformly over padding there, the fused encoder gives zeros); see
fastbert/fused.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastbert
from fastbert.fused import FusedEncoder, fusion_report
from fastbert.optimize import HFFusedEncoder, key_padding_from_hf_mask, optimize
from tests.helpers import assert_within_torch_error, pad_mask, require

transformers = require("transformers")

LENGTHS = [21, 13, 0]
T = 21


def hf_config(layers: int = 1, attn: str = "eager") -> transformers.BertConfig:
    cfg = transformers.BertConfig(
        vocab_size=101, hidden_size=96, num_hidden_layers=layers, num_attention_heads=3, intermediate_size=160,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    cfg._attn_implementation = attn
    return cfg


def batch(vocab: int = 101, lengths=LENGTHS, T: int = T, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    mask = pad_mask(lengths, T)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g).masked_fill(~mask, 0)
    return ids.to(device), mask.long().to(device)


def hf_pair(cls, layers: int = 1, attn: str = "eager", device: str = "cpu"):
    torch.manual_seed(0)
    ref = cls(hf_config(layers, attn)).to(device).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affine
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return optimize(copy.deepcopy(ref)), ref


@pytest.mark.parametrize(
    "cls_name, attn",
    [("BertModel", "eager"), ("BertModel", "sdpa"), ("BertForMaskedLM", "sdpa"),
     ("BertForSequenceClassification", "eager"), ("BertForQuestionAnswering", "sdpa")],
)
def test_transformers_models_forward(cls_name, attn, device):
    fused, ref = hf_pair(getattr(transformers, cls_name), attn=attn, device=device)
    bert = fused if cls_name == "BertModel" else fused.bert
    assert isinstance(bert.encoder, HFFusedEncoder)
    ids, mask = batch(device=device)
    real, rows = mask.bool(), mask.bool().any(1)
    with torch.no_grad():
        out, exp = fused(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
        exp64 = copy.deepcopy(ref).double()(input_ids=ids, attention_mask=mask)
    if cls_name == "BertModel":
        pairs = {"hidden": (real, "last_hidden_state"), "pooled": (rows, "pooler_output")}
    elif cls_name == "BertForMaskedLM":
        pairs = {"logits": (real, "logits")}
    elif cls_name == "BertForSequenceClassification":
        pairs = {"logits": (rows, "logits")}
    else:
        pairs = {"start": (real, "start_logits"), "end": (real, "end_logits")}
    for name, (where, attr) in pairs.items():
        a, r32, r64 = (getattr(o, attr)[where] for o in (out, exp, exp64))
        assert_within_torch_error(a, r64, r32, atol=2e-5, name=name)


def test_transformers_pretraining_loss_and_gradients(device):
    fused, ref = hf_pair(transformers.BertForPreTraining, layers=2, device=device)
    ref64 = copy.deepcopy(ref).double()
    ids, mask = batch(lengths=[21, 13, 5], device=device)  # every row has tokens: NSP sees every pooled output
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 17] = 7
    nsp = torch.tensor([0, 1, 1], device=device)
    grads = []
    for model in (fused, ref, ref64):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
        out.loss.backward()
        grads.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (lf, gf), (l32, g32), (l64, g64) = grads
    assert_within_torch_error(lf, l64, l32, atol=2e-5, name="loss")
    assert set(gf) == set(g64) and len(gf) == len(list(ref.parameters()))
    for name in g64:
        assert_within_torch_error(gf[name], g64[name], g32[name], atol=2e-5, name=f"grad {name}")


def test_minilm_checkpoint_matches_transformers(monkeypatch, device):
    """The real all-MiniLM-L6-v2 checkpoint on real sentences: optimize() vs unmodified transformers.

    All 6 layers, real weights, every fusion on (through the interpreter on CPU)."""
    from tokenizers import Tokenizer

    folder = require("minilm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode_batch(["Fused kernels skip the padding.", "Hello world!"])
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc], device=device)
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc], device=device)
    ref = transformers.BertModel.from_pretrained(str(folder)).to(device).eval()
    fused = optimize(transformers.BertModel.from_pretrained(str(folder)).to(device).eval())
    assert all("fused" in v for k, v in fusion_report(fused).items() if k.startswith("encoder.layer."))
    real = mask.bool()
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=mask)
        exp = ref(input_ids=ids, attention_mask=mask)
        exp64 = copy.deepcopy(ref).double()(input_ids=ids, attention_mask=mask)
    assert_within_torch_error(out.last_hidden_state[real], exp64.last_hidden_state[real],
                              exp.last_hidden_state[real], atol=2e-5, name="last_hidden_state")
    assert_within_torch_error(out.pooler_output, exp64.pooler_output, exp.pooler_output, atol=2e-5, name="pooled")


def test_fastbert_models_keep_parameters_and_outputs(device):
    config = fastbert.BertConfig(
        vocab_size=101, hidden_size=96, num_hidden_layers=1, num_attention_heads=3, intermediate_size=160,
        max_position_embeddings=64,
    ).with_fusions(False)
    for cls, per_token in ((fastbert.BertForSequenceClassification, False), (fastbert.BertForQuestionAnswering, True)):
        torch.manual_seed(0)
        ref = cls(config).to(device).eval()
        model = copy.deepcopy(ref)
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1)  # built before the swap: must still own the parameters
        assert optimize(model, unpad=True) is model
        assert isinstance(model.bert.encoder, FusedEncoder)
        assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
        assert model.config.fused_attention and model.bert.config is model.config
        assert not ref.config.fused_attention, "optimize must not change the caller's config object"
        ids, mask = batch(lengths=[21, 13, 4], device=device)
        out, exp = model(ids, mask), ref(ids, mask)
        where = mask.bool() if per_token else slice(None)  # QA: real tokens only
        first_out, first_exp = out[1][where], exp[1][where]  # logits / start_logits
        torch.testing.assert_close(first_out, first_exp, rtol=1e-4, atol=2e-5)
        first_out.sum().backward()
        optimizer.step()


def test_key_padding_from_hf_masks():
    B, T = 3, 5
    keys = pad_mask([5, 2, 0], T)  # (B, T)
    allowed = keys[:, None, None, :].expand(B, 1, T, T)
    additive = torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for m in (keys.long(), keys, allowed, additive, additive[:, 0], allowed.expand(B, 3, T, T)):
        assert torch.equal(key_padding_from_hf_mask(m, B, T), keys)
    assert key_padding_from_hf_mask(None, B, T) is None
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    with pytest.raises(ValueError, match="key padding masks only"):
        key_padding_from_hf_mask(causal, B, T)
    with pytest.raises(ValueError, match="attention_mask"):
        key_padding_from_hf_mask(keys[:, :4], B, T)


def test_optimize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown fusion flags"):
        optimize(transformers.BertModel(hf_config()), fused_everything=True)
    with pytest.raises(ValueError, match="neither a fastbert model"):
        optimize(torch.nn.Linear(3, 3))
    decoder = hf_config()
    decoder.is_decoder = True
    with pytest.raises(ValueError, match="decoder"):
        optimize(transformers.BertModel(decoder))
    fused, _ = hf_pair(transformers.BertModel)
    with pytest.raises(ValueError, match="cross-attention"):
        fused.encoder(torch.zeros(1, 3, 96), encoder_hidden_states=torch.zeros(1, 3, 96))
    ids, mask = batch()
    with pytest.raises(ValueError, match="output_hidden_states"):
        fused(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=flag):
            fused(input_ids=ids, attention_mask=mask, **{flag: True})
        setattr(fused.config, flag, True)  # set in the config after optimize(): refused the same way
        with pytest.raises(ValueError, match=f"{flag}.*config.{flag}=False"):
            fused(input_ids=ids, attention_mask=mask)
        fused(input_ids=ids, attention_mask=mask, **{flag: False})  # the keyword wins over the config
        setattr(fused.config, flag, False)
    assert fused(input_ids=ids, attention_mask=mask).hidden_states is None


def _train_grads(model, ids, mask, labels, nsp, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_on_the_fused_encoder(dropout, device):
    """gradient_checkpointing_enable() after optimize(): every layer is recomputed in the backward pass and the
    gradients are those of the unfused model (dropout 0) or of the fused model without checkpointing (dropout
    0.1: the recomputation replays the same dropout masks)."""
    cfg = hf_config(layers=2)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    torch.manual_seed(0)
    ref = transformers.BertForPreTraining(cfg).to(device).train()
    plain = optimize(copy.deepcopy(ref)).train()
    ckpt = optimize(copy.deepcopy(ref)).train()
    ckpt.gradient_checkpointing_enable()
    assert ckpt.bert.encoder.gradient_checkpointing and not plain.bert.encoder.gradient_checkpointing
    calls = []
    for layer in ckpt.bert.encoder.layer:
        layer.register_forward_pre_hook(lambda m, a: calls.append(m))  # a pre-hook: the recompute stops early
    ids, mask = batch(lengths=[21, 13, 5], device=device)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    nsp = torch.tensor([0, 1, 1], device=device)
    lc, gc = _train_grads(ckpt, ids, mask, labels, nsp)
    assert len(calls) == 2 * 2  # each of the 2 layers: once forward, once recomputed in the backward pass
    lp, gp = _train_grads(plain, ids, mask, labels, nsp)
    assert set(gc) == set(gp)
    for name in gp:  # same fused arithmetic, same dropout masks: equal up to recomputation order
        torch.testing.assert_close(gc[name], gp[name], rtol=1e-5, atol=1e-6, msg=f"grad {name}")
    torch.testing.assert_close(lc, lp)
    if dropout == 0.0:
        ref64 = copy.deepcopy(ref).double()
        (l32, g32), (l64, g64) = (_train_grads(m, ids, mask, labels, nsp) for m in (ref, ref64))
        assert_within_torch_error(lc, l64, l32, atol=2e-5, name="loss")
        for name in g64:
            assert_within_torch_error(gc[name], g64[name], g32[name], atol=2e-5, name=f"grad {name}")
    # In eval mode or without autograd nothing is recomputed; disabling turns it off.
    calls.clear()
    with torch.no_grad():
        ckpt(input_ids=ids, attention_mask=mask)
    ckpt.gradient_checkpointing_disable()
    _train_grads(ckpt, ids, mask, labels, nsp)
    assert len(calls) == 2 + 2 and not ckpt.bert.encoder.gradient_checkpointing
