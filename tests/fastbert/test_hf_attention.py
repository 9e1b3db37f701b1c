"""`attn_implementation="fastbert"` (fastbert/hf_attention.py) on transformers' encoders, against their eager attention.

Tiny random configs of the seven architectures that call `AttentionInterface` (2 layers, hidden ≤ 64, head dims 16,
32 and 64, T = 13 or 37), fp32 through Triton's interpreter: outputs (≤ 1e-4 relative) and every parameter gradient
(≤ 1e-3) against the same weights with `attn_implementation="eager"` on a padded batch with a short row and a fully
padded one; the three ways in (`from_config`, `from_pretrained`, `set_attn_implementation`); dropout (the p each
architecture passes reaches the kernel, p = 0 in training equals eval, the dropped fraction, repeatable under
`torch.manual_seed`); padding-free batches (the collator's cu_seq_lens keywords, packed `position_ids`) equal to
the padded batch; refusals naming the fallback. Real tokens only are compared: a fully padded row gives zeros here
and an even mix of its padding under eager attention, and the losses leave it out (as in test_hf_parity.py).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastbert.hf_attention import NAME, fastbert_attention
from kernels._attention_dropout import keep_scale
from tests.helpers import launched, pad_mask, require

transformers = require("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on CUDA, interpreted on CPU (conftest)
VOCAB = 61
# architecture -> (config class, its keyword arguments, T). Head dims: bert 16, roberta 32, xlm-roberta 64,
# camembert 16, electra 32, albert 32, distilbert 64 (few heads: the interpreter's time grows with B·h).
ARCHS = {
    "bert": ("BertConfig", dict(hidden_size=32, num_attention_heads=2), 37),
    "roberta": ("RobertaConfig", dict(hidden_size=64, num_attention_heads=2), 13),
    "xlm-roberta": ("XLMRobertaConfig", dict(hidden_size=64, num_attention_heads=1), 37),
    "camembert": ("CamembertConfig", dict(hidden_size=48, num_attention_heads=3), 13),
    "electra": ("ElectraConfig", dict(embedding_size=32, hidden_size=64, num_attention_heads=2), 13),
    "albert": ("AlbertConfig", dict(embedding_size=24, hidden_size=64, num_attention_heads=2), 13),
    "distilbert": ("DistilBertConfig", dict(dim=64, n_heads=1), 37),
}
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # positions count from padding_idx + 1


def make_config(arch: str, attention_p: float = 0.0, **overrides):
    cls, kwargs, _ = ARCHS[arch]
    if arch == "distilbert":
        common = dict(n_layers=2, hidden_dim=80, dropout=0.0, attention_dropout=attention_p)
    else:
        common = dict(num_hidden_layers=2, intermediate_size=80, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=attention_p)
    return getattr(transformers, cls)(vocab_size=VOCAB, max_position_embeddings=64, **{**common, **kwargs, **overrides})


def lengths_for(T: int) -> list[int]:
    return [T, T * 2 // 3, 2, 0]  # a full row, a padded one, a heavily padded one, a fully padded one


def padded_batch(arch: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = ARCHS[arch][2]
    mask = pad_mask(lengths_for(T), T)  # (B, T) True = real token
    ids = torch.randint(3, VOCAB, mask.shape, generator=torch.Generator().manual_seed(1)).masked_fill(~mask, pad_id)
    return ids.to(DEVICE), mask.to(DEVICE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def model_pair(arch: str, attention_p: float = 0.0):
    """(eager model, fastbert model) with the same weights, built with `from_config`."""
    torch.manual_seed(0)
    eager = transformers.AutoModel.from_config(make_config(arch, attention_p), attn_implementation="eager")
    with torch.no_grad():  # non-trivial biases and LayerNorm affine (transformers initialises them to 0 and 1)
        for p in eager.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    fast = transformers.AutoModel.from_config(make_config(arch, attention_p), attn_implementation=NAME)
    fast.load_state_dict(eager.state_dict())
    return eager.to(DEVICE).eval(), fast.to(DEVICE).eval()


def run_with_grads(model, weight: torch.Tensor, real: torch.Tensor | None = None, **inputs):
    """(model output, its real tokens [total, H], d(loss)/d(every parameter) by name), where loss = Σ over the real
    tokens of hidden · weight: the padded batch's unpadded tokens (`real`), or the packed row."""
    output = model(**inputs)
    hidden = output.last_hidden_state
    tokens = hidden[real] if real is not None else hidden[0]  # (total, H)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad((tokens * weight).sum(), params, allow_unused=True)
    return output, tokens.detach(), dict(zip(names, grads, strict=True))


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_case(request):
    """(arch, eager model, fastbert model, ids, mask, loss weights [total, H], eager's (output, tokens, grads))."""
    arch = request.param
    eager, fast = model_pair(arch)
    ids, mask = padded_batch(arch, eager.config.pad_token_id)
    hidden_size = eager.config.dim if arch == "distilbert" else eager.config.hidden_size
    weight = torch.randn(int(mask.sum()), hidden_size, generator=torch.Generator().manual_seed(2))  # (total, H)
    weight = weight.to(DEVICE)
    reference = run_with_grads(eager, weight, mask, input_ids=ids, attention_mask=mask.long())
    return arch, eager, fast, ids, mask, weight, reference


def assert_grads_close(fast_grads: dict, eager_grads: dict, tol: float = 1e-3) -> None:
    assert fast_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        f = fast_grads[name]
        assert (f is None) == (g is None), name
        if g is not None:
            assert (f - g).norm() <= tol * g.norm() + 1e-7, (name, rel_err(f, g))


def assert_attention_kernels_ran(backward: bool) -> None:
    ran = set(launched("kernels.attention"))
    assert "_attn_fwd_kernel" in ran, ran
    if backward:
        assert ran & {"_attn_bwd_kernel", "_attn_bwd_dkdv_kernel"}, ran


# ------------------------------------------------------------------------------------------------------ parity


def test_outputs_and_gradients_match_eager(arch_case):
    arch, eager, fast, ids, mask, weight, (ref_output, ref, ref_grads) = arch_case
    output, out, grads = run_with_grads(fast, weight, mask, input_ids=ids, attention_mask=mask.long())
    assert rel_err(out, ref) <= 1e-4, (arch, rel_err(out, ref))
    assert_grads_close(grads, ref_grads)
    assert torch.isfinite(output.last_hidden_state).all()  # the fully padded row too
    if getattr(output, "pooler_output", None) is not None:  # rows with a [CLS] token
        assert rel_err(output.pooler_output[:-1], ref_output.pooler_output[:-1]) <= 1e-4
    assert_attention_kernels_ran(backward=True)


def test_three_ways_in_and_p0_training(arch_case, tmp_path):
    """from_pretrained and set_attn_implementation route through the kernel too; so does training mode with dropout
    p = 0, which gives the eval result."""
    arch, eager, fast, ids, mask, _, _ = arch_case
    ids, mask = ids[1:3], mask[1:3].long()  # the padded and the short row
    eager.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation=NAME).to(DEVICE).eval()
    switched = copy.deepcopy(eager)
    switched.set_attn_implementation(NAME)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        outs = []
        for model in (loaded, switched, copy.deepcopy(fast).train()):
            assert model.config._attn_implementation == NAME
            outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()])
    assert rel_err(outs[0], expected) <= 1e-4
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # same weights, same kernel
    assert eager.config._attn_implementation == "eager"  # the copy switched alone
    assert_attention_kernels_ran(backward=False)


@pytest.mark.no_kernel
def test_mask_function_hands_on_the_key_padding_mask():
    """The model's mask preparation gives the kernel's [B, T] bool mask (None without one), never [B, 1, T, T]."""
    from transformers.masking_utils import create_bidirectional_mask

    config = make_config("bert")
    config._attn_implementation = NAME
    mask = pad_mask([7, 3, 0], 7)  # (B, T)
    embeds = torch.zeros(3, 7, 8)
    made = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask.long())
    assert made.dtype == torch.bool and torch.equal(made, mask)
    assert create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=None) is None


# ----------------------------------------------------------------------------------------------- padding-free


def packed_inputs(arch: str, ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> dict:
    """The padded batch's sequences flattened into one row by transformers' collator, with its flash keywords."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": row[m].tolist()} for row, m in zip(ids, mask, strict=True) if m.any()])
    batch.pop("labels")
    if arch in ROBERTA_LIKE:  # positions count from padding_idx + 1 there
        batch["position_ids"] = batch["position_ids"] + pad_id + 1
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_padding_free_equals_padded(arch_case):
    arch, eager, fast, ids, mask, weight, (_, ref, ref_grads) = arch_case
    packed = packed_inputs(arch, ids, mask, eager.config.pad_token_id)
    assert packed["input_ids"].shape == (1, int(mask.sum())) and packed["cu_seq_lens_q"].dtype == torch.int32
    _, out, grads = run_with_grads(fast, weight, **packed)
    assert rel_err(out, ref) <= 1e-4, (arch, rel_err(out, ref))
    without_pooler = lambda g: {n: x for n, x in g.items() if "pooler" not in n}  # it reads one token per row
    assert_grads_close(without_pooler(grads), without_pooler(ref_grads))
    assert "_attn_fwd_kernel" in launched("kernels.attention")
    if arch == "distilbert":
        return  # DistilBERT does not hand position_ids to its layers: the cu_seq_lens keywords are its only way
    with torch.no_grad():  # the position_ids form: positions restart within the row
        by_positions = fast(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).last_hidden_state[0]
    assert rel_err(by_positions, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dropout_p_reaches_the_kernel(arch, monkeypatch):
    import fastbert.hf_attention as backend

    seen = []
    kernel = backend.fused_attention

    def spy(*args, dropout_p, **kwargs):
        seen.append(dropout_p)
        return kernel(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(backend, "fused_attention", spy)
    eager, fast = model_pair(arch, attention_p=0.3)
    ids, mask = padded_batch(arch, fast.config.pad_token_id)
    ids, mask = ids[1:3, :9], mask[1:3, :9].long()
    with torch.no_grad():
        evaluated = eager(input_ids=ids, attention_mask=mask).last_hidden_state  # eval: no dropout
        dropped = fast.train()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen == [0.3, 0.3]  # one per layer
    assert not torch.allclose(dropped, evaluated, atol=1e-3)


class _Encoder(nn.Module):
    is_causal = False


def test_dropout_drops_the_right_fraction_repeatably():
    """q = k = 0 makes every probability 1/T; v = one-hot key index reads them back: dropped entries are 0 and kept
    ones 1/T scaled by the exact keep probability. The seed comes from torch's generator: `manual_seed` repeats."""
    B, h, T, d, p = 2, 4, 13, 16, 0.25
    q = k = torch.zeros(B, h, T, d, device=DEVICE)
    v = torch.eye(d, device=DEVICE)[:T].expand(B, h, T, d).contiguous()  # (B, h, T, d): key j → e_j
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out, weights = fastbert_attention(_Encoder(), q, k, v, None, dropout=p, scaling=1.0)
        assert weights is None and out.shape == (B, T, h, d)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    probs = outs[0][..., :T]  # (B, T, h, T) dropped-out attention probabilities
    kept = probs != 0
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - p) <= 4 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(probs[kept], torch.full_like(probs[kept], keep_scale(p) / T))
    assert_attention_kernels_ran(backward=False)


# --------------------------------------------------------------------------------------------------- refusals


def _qkv(B: int = 2, h: int = 2, T: int = 5, d: int = 16, Tk: int | None = None, hk: int | None = None):
    """q, k, v [B, h, T, d] (k, v: [B, hk, Tk, d])."""
    q = torch.randn(B, h, T, d)
    k = torch.randn(B, hk or h, Tk or T, d)
    return q, k, k.clone()


def _direct(**kwargs):
    """A call of the attention function itself, on q, k, v of the shape `B`, `Tk`, `hk` say, with `kwargs`."""
    shape = {n: kwargs.pop(n) for n in ("B", "Tk", "hk") if n in kwargs}
    return lambda: fastbert_attention(_Encoder(), *_qkv(**shape), None, **kwargs)


def _model_call(arch: str, config_overrides: dict, **inputs):
    def call():
        model = transformers.AutoModel.from_config(make_config(arch, **config_overrides), attn_implementation=NAME)
        ids = torch.randint(3, VOCAB, (2, 7))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)

    return call


def _decoder_with_cross_attention():
    model = transformers.AutoModel.from_config(make_config("bert", is_decoder=True, add_cross_attention=True),
                                               attn_implementation=NAME)
    ids = torch.randint(3, VOCAB, (2, 7))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=torch.randn(2, 5, 64))


def _prepared_4d_mask():
    model = transformers.AutoModel.from_config(make_config("electra"), attn_implementation=NAME)
    model(input_ids=torch.randint(3, VOCAB, (2, 7)), attention_mask=torch.zeros(2, 1, 7, 7))


def _output_attentions_from_config():
    config = make_config("roberta")
    config.output_attentions = True  # transformers allows it with eager only: set, then switch
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    model.set_attn_implementation(NAME)
    model(input_ids=torch.randint(3, VOCAB, (2, 7)))


REFUSALS = {
    "decoder (causal mask)": (_model_call("bert", dict(is_decoder=True)), "causal"),
    "decoder with cross-attention": (_decoder_with_cross_attention, "causal"),
    "cross-attention": (_direct(Tk=9), "cross-attention"),
    "causal module": (_direct(is_causal=True), "causal"),
    "grouped-query attention": (_direct(hk=1), "grouped-query"),
    "head dim 8": (_model_call("bert", dict(hidden_size=16, num_attention_heads=2)), "head dim 8"),
    "head dim 256": (_model_call("distilbert", dict(dim=256, n_heads=1)), "head dim 256"),
    "output_attentions keyword": (_model_call("albert", {}, output_attentions=True), "output_attentions"),
    "output_attentions in the config": (_output_attentions_from_config, "output_attentions"),
    "a prepared 4-D mask": (_prepared_4d_mask, "prepared attention mask"),
    "softcap": (_direct(softcap=30.0), "softcap"),
    "cu_seq_lens_k differs": (
        _direct(B=1, cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32), max_length_q=3, max_length_k=3,
                cu_seq_lens_k=torch.tensor([0, 3, 5], dtype=torch.int32)), "cross-attention"),
}


@pytest.mark.no_kernel
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_fallback(case):
    call, what = REFUSALS[case]
    fallback = "eager" if "output_attentions" in case else "sdpa"
    with pytest.raises(ValueError, match=f'(?s){what}.*attn_implementation="{fallback}"'):
        call()


@pytest.mark.no_kernel
def test_padding_free_keywords_all_or_none():
    with pytest.raises(ValueError, match="give all of"):
        _direct(cu_seq_lens_q=torch.tensor([0, 5], dtype=torch.int32))()


# ------------------------------------------------------------------------------------------------------- import


@pytest.mark.reference_path
def test_import_fastbert_alone_registers_when_transformers_loads():
    """In a fresh interpreter (no TRITON_INTERPRET: the CPU reference path): `import fastbert` does not import
    transformers, and after it `from_config(..., attn_implementation="fastbert")` works and matches eager."""
    code = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import fastbert, torch
        assert "transformers" not in sys.modules, "import fastbert imported transformers"
        import transformers
        cfg = dict(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
        eager = transformers.AutoModel.from_config(transformers.BertConfig(**cfg), attn_implementation="eager")
        fast = transformers.AutoModel.from_config(transformers.BertConfig(**cfg), attn_implementation="fastbert")
        fast.load_state_dict(eager.state_dict())
        from transformers import modeling_utils
        assert type(modeling_utils.__loader__).__module__ != "fastbert.hf_attention", "the hook left its loader"
        assert not any(type(f).__module__ == "fastbert.hf_attention" for f in sys.meta_path), "the hook stayed"
        ids = torch.randint(3, 61, (2, 11)); mask = torch.ones_like(ids); mask[1, 6:] = 0
        a = eager.eval()(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        b = fast.eval()(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        assert (a - b).norm() <= 1e-5 * a.norm(), (a - b).norm()
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
