"""Fused model vs the plain PyTorch reference, through Triton's interpreter on CPU (compiled on a GPU).

Tiny, odd configs (hidden 96, 3 heads of 32, T = 37, intermediate 160, vocabulary 101) with random padding
and one fully padded sequence. The reference attends uniformly over the padding of a fully padded row and the
fused path gives zeros there, so outputs are compared at real tokens only, the pooled output / NSP on rows with
a real token, and the loss is built from those (gradients then agree for every parameter).

Dropout: the fused model runs with the kernels' own seeds; the test records each seed as it is drawn, rebuilds
each kernel's keep-mask with the kernels' bit-exact PyTorch helpers, and feeds those masks into the reference's
dropout modules — so fused and reference drop exactly the same elements, and outputs, loss and every gradient
are compared with dropout on.

Tolerance rule (tests/helpers.py): the fused fp32 error against a float64 reference is at most 2× the error of
the fp32 reference plus a small atol.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert.fused as fused_module
from fastbert import BertConfig, BertForPreTraining, BertModel, modeling
from fastbert.fused import (
    FusedEncoder,
    FusedLMPredictionHead,
    apply_fusions,
    fusion_report,
)
from fastbert.optimize import optimize
from kernels._attention_dropout import attention_dropout_mask_varlen
from kernels.bias_dropout_add_layernorm import bias_dropout_add_layernorm_dropout_mask
from tests.helpers import assert_within_torch_error, pad_mask

# The op modules themselves (kernels/__init__ re-exports a function under the name of its module).
attention_kernels = importlib.import_module("kernels.attention")
bdaln_kernels = importlib.import_module("kernels.bias_dropout_add_layernorm")

B, T = 4, 37
LENGTHS = [37, 23, 0, 9]  # one full row, one fully padded row


def tiny_config(**overrides) -> BertConfig:
    base = dict(
        vocab_size=101, hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=160,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**base, **overrides})


def make_models(config: BertConfig, device: str = "cpu", seed: int = 0, **fusions: bool):
    """(fused fp32, reference fp32, reference fp64) with identical weights, on `device`."""
    torch.manual_seed(seed)
    ref = BertForPreTraining(config.with_fusions(False)).to(device)
    with torch.no_grad():  # non-zero biases and LayerNorm affine, so every parameter matters
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.05 * torch.randn_like(p))
    fused = optimize(copy.deepcopy(ref), **fusions)
    return fused, ref, copy.deepcopy(ref).double()


def make_batch(config: BertConfig, device: str = "cpu", lengths=LENGTHS, T=T, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = pad_mask(lengths, T)  # (B, T) bool
    ids = torch.randint(1, config.vocab_size, (len(lengths), T), generator=g).masked_fill(~mask, 0)
    types = (torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() & mask.long()
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & mask
    labels[chosen] = torch.randint(0, config.vocab_size, (int(chosen.sum()),), generator=g)
    nsp = torch.randint(0, 2, (len(lengths),), generator=g)
    return tuple(t.to(device) for t in (ids, mask.long(), types, labels, nsp))


def run(model: nn.Module, batch, real_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward + backward; loss = MLM (labels at real tokens only) + NSP over rows with a real token."""
    ids, mask, types, labels, nsp = batch
    model.zero_grad(set_to_none=True)
    seen = []
    hook = model.bert.register_forward_hook(lambda mod, args, output: seen.append(output))
    out = model(ids, mask, types, labels=labels, masked_only=True)
    hook.remove()
    hidden, pooled = seen[0]
    nsp_loss = F.cross_entropy(out.seq_relationship_logits[real_rows].double(), nsp[real_rows])
    loss = out.mlm_loss.double() + nsp_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(hidden=hidden, pooled=pooled[real_rows], mlm_loss=out.mlm_loss, loss=loss,
                correct=out.mlm_correct, count=out.mlm_count, grads=grads)


def assert_matches(fused: dict, ref32: dict, ref64: dict, real: torch.Tensor, atol: float = 2e-5) -> None:
    for key in ("pooled", "mlm_loss", "loss"):
        assert_within_torch_error(fused[key], ref64[key], ref32[key], atol=atol, name=key)
    assert_within_torch_error(fused["hidden"][real], ref64["hidden"][real], ref32["hidden"][real], atol=atol,
                              name="hidden (real tokens)")
    assert int(fused["count"]) == int(ref32["count"])
    assert set(fused["grads"]) == set(ref64["grads"])
    for name, g64 in ref64["grads"].items():
        assert_within_torch_error(fused["grads"][name], g64, ref32["grads"][name], atol=atol, name=f"grad {name}")


def test_pretraining_matches_reference_with_padding(device):
    config = tiny_config()
    fused, ref, ref64 = make_models(config, device)
    batch = make_batch(config, device)
    real = batch[1].bool()
    rows = real.any(1)
    out_f, out_r, out_64 = run(fused, batch, rows), run(ref, batch, rows), run(ref64, batch, rows)
    assert out_f["hidden"][~real].abs().max() == 0, "unpadded encoder must give zeros at padded positions"
    assert_matches(out_f, out_r, out_64, real)


class _FixedMaskDropout(nn.Module):
    """Dropout with a given keep-mask (the one the fused kernel used)."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p)


def _recording_draw_seed(log: list, original):
    def draw(seed):
        s = original(seed)
        log.append(s.clone())
        return s

    return draw


def run_with_the_kernels_keep_masks(monkeypatch, config: BertConfig, device: str, dtype=torch.float32,
                                    lengths=LENGTHS, T: int = T):
    """Fused model (in `dtype`) with dropout on, then the reference in `dtype` and in float64 fed exactly the
    keep-masks the fused kernels drew: (fused, reference, reference64), each (outputs, loss, grads), and the rows with
    a real token. Also used by the bf16 GPU check (tests/kernels/test_gpu_gaps.py)."""
    p_hidden, p_attn = config.hidden_dropout_prob, config.attention_probs_dropout_prob
    fused, ref, ref64 = make_models(config, device)
    fused, ref = fused.to(dtype), ref.to(dtype)
    batch = make_batch(config, device, lengths, T)
    real = batch[1].bool().cpu()
    rows = real.any(1).to(device)
    B = len(lengths)
    # Record every dropout seed the fused kernels draw, in call order.
    ln_seeds, attn_seeds = [], []
    monkeypatch.setattr(bdaln_kernels, "draw_seed", _recording_draw_seed(ln_seeds, bdaln_kernels.draw_seed))
    monkeypatch.setattr(attention_kernels, "draw_seed", _recording_draw_seed(attn_seeds, attention_kernels.draw_seed))
    for m in (fused, ref, ref64):
        m.train()
    # The embeddings' dropout is plain PyTorch on both paths: give all models one fixed mask.
    emb_keep = torch.rand(B, T, config.hidden_size, generator=torch.Generator().manual_seed(3)) >= p_hidden
    fused.bert.embeddings.dropout = _FixedMaskDropout(emb_keep, p_hidden)
    torch.manual_seed(5)
    ids, mask, types, labels, nsp = batch
    fused.zero_grad()
    out_f = fused(ids, mask, types, labels=labels, masked_only=True)
    nsp_loss = F.cross_entropy(out_f.seq_relationship_logits[rows].double(), nsp[rows])
    loss_f = out_f.mlm_loss.double() + nsp_loss
    loss_f.backward()
    # Seeds, in order: per layer the attention-output and FFN-output LayerNorms, then the MLM head's LayerNorm
    # (p = 0). Attention: one per layer.
    L, H, h = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    assert len(attn_seeds) == L and len(ln_seeds) >= 2 * L
    N = int(real.sum())
    indices = torch.nonzero(real.reshape(-1)).reshape(-1)
    cu = F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    max_len = int(real.sum(1).max())

    def packed_to_padded(keep_packed: torch.Tensor) -> torch.Tensor:  # (N, H) -> (B, T, H), kept at padding
        full = torch.ones(B * T, H, dtype=torch.bool)
        full[indices] = keep_packed
        return full.view(B, T, H)

    def attn_keep(seed) -> torch.Tensor:  # varlen mask in padded form (right padding: token i at position i)
        m = attention_dropout_mask_varlen(seed, cu, h, max_len, p_attn)  # (B, h, M, M)
        full = torch.ones(B, h, T, T, dtype=torch.bool)
        full[:, :, :max_len, :max_len] = m
        return full

    for model in (ref, ref64):
        model.bert.embeddings.dropout = _FixedMaskDropout(emb_keep, p_hidden)
        for i, layer in enumerate(model.bert.encoder.layer):
            layer.attention.self.dropout = _FixedMaskDropout(attn_keep(attn_seeds[i]), p_attn)
            keep_attn_out = bias_dropout_add_layernorm_dropout_mask(ln_seeds[2 * i], (N, H), p_hidden)
            keep_ffn_out = bias_dropout_add_layernorm_dropout_mask(ln_seeds[2 * i + 1], (N, H), p_hidden)
            dropped = 1.0 - keep_ffn_out.float().mean().item()
            assert abs(dropped - p_hidden) < 0.03, f"dropout dropped {dropped:.3f}, expected ~{p_hidden}"
            layer.attention.output.dropout = _FixedMaskDropout(packed_to_padded(keep_attn_out), p_hidden)
            layer.output.dropout = _FixedMaskDropout(packed_to_padded(keep_ffn_out), p_hidden)
    outs = [(out_f, loss_f, {n: p.grad for n, p in fused.named_parameters() if p.grad is not None})]
    for model in (ref, ref64):
        model.zero_grad()
        o = model(ids, mask, types, labels=labels, masked_only=True)
        loss = o.mlm_loss.double() + F.cross_entropy(o.seq_relationship_logits[rows].double(), nsp[rows])
        loss.backward()
        outs.append((o, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return (*outs, rows)


def assert_dropout_run_matches(fused, ref, ref64, rows, *, atol: float, k: float = 2.0, grad_atol=None) -> None:
    """The fused run within k × the same-dtype reference's error (+ atol) of the float64 one: MLM loss, NSP logits,
    loss and every parameter gradient."""
    (out_f, loss_f, g_f), (o32, l32, g32), (o64, l64, g64) = fused, ref, ref64
    assert_within_torch_error(out_f.mlm_loss, o64.mlm_loss, o32.mlm_loss, k=k, atol=atol, name="mlm_loss")
    assert_within_torch_error(
        out_f.seq_relationship_logits[rows], o64.seq_relationship_logits[rows],
        o32.seq_relationship_logits[rows], k=k, atol=atol, name="nsp logits",
    )
    assert_within_torch_error(loss_f, l64, l32, k=k, atol=atol, name="loss")
    assert set(g_f) == set(g64)
    for name in g64:
        assert_within_torch_error(g_f[name], g64[name], g32[name], k=k, atol=atol if grad_atol is None else grad_atol,
                                  name=f"grad {name}")


def test_dropout_matches_reference_with_the_kernels_keep_masks(monkeypatch, device):
    config = tiny_config(hidden_dropout_prob=0.15, attention_probs_dropout_prob=0.2)
    fused, ref, ref64, rows = run_with_the_kernels_keep_masks(monkeypatch, config, device)
    assert_dropout_run_matches(fused, ref, ref64, rows, atol=2e-5)


@pytest.mark.parametrize("flag", ["fused_qkv", "fused_attention", "fused_bias_gelu", "fused_bias_dropout_layernorm",
                                  "fused_mlm_loss", "unpad"])
def test_each_fusion_switches_off_alone(flag, device):
    """Every flag off on its own still gives the reference (one layer, forward and loss)."""
    config = tiny_config(num_hidden_layers=1)
    fused, ref, ref64 = make_models(config, device, **{flag: False})
    lengths = [19, 7, 0]
    ids, mask, types, labels, _ = make_batch(config, device, lengths, T=19)
    real = mask.bool()
    with torch.no_grad():
        outs = [m(ids, mask, types, labels=labels, masked_only=True) for m in (fused, ref, ref64)]
        hid = [m.bert(ids, mask, types).last_hidden_state[real] for m in (fused, ref, ref64)]
    assert_within_torch_error(outs[0].mlm_loss, outs[2].mlm_loss, outs[1].mlm_loss, atol=2e-5, name="mlm_loss")
    assert_within_torch_error(hid[0], hid[2], hid[1], atol=2e-5, name="hidden")
    report = fusion_report(fused)
    if flag == "unpad":
        assert report["bert.encoder"].startswith("padded")
    if flag == "fused_mlm_loss":
        assert outs[0].prediction_logits is not None  # the reference scoring returns logits
    else:
        assert outs[0].prediction_logits is None  # the fused loss never materialises logits


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_inference_keeps_no_autograd_state_and_eval_disables_dropout(grad_off, device):
    config = tiny_config(num_hidden_layers=1, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    fused, ref, _ = make_models(config, device)
    fused.eval()
    ref.eval()
    ids, mask, types, labels, _ = make_batch(config, device, [11, 5, 0], T=11)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t), grad_off():
        out = fused(ids, mask, types, labels=labels, masked_only=True)
        hidden = fused.bert(ids, mask, types).last_hidden_state
        again = fused.bert(ids, mask, types).last_hidden_state  # eval: dropout off, deterministic
    assert out.mlm_loss.grad_fn is None and hidden.grad_fn is None
    assert packed == [], f"{len(packed)} tensors saved for backward with autograd off"
    with torch.no_grad():
        expect = ref.bert(ids, mask, types).last_hidden_state
    real = mask.bool()
    assert torch.equal(again, hidden)
    torch.testing.assert_close(hidden[real], expect[real], rtol=1e-5, atol=2e-5)


@pytest.mark.reference_path
def test_cpu_without_interpreter_is_the_reference(monkeypatch):
    """Real CPU use: no Triton, every fused module calls the reference forward (bit-identical)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = tiny_config(num_hidden_layers=1)
    fused, ref, _ = make_models(config)
    ids, mask, types, labels, _ = make_batch(config, "cpu", [13, 4, 0], T=13)
    with torch.no_grad():
        a = fused(ids, mask, types, labels=labels, masked_only=True)
        b = ref(ids, mask, types, labels=labels, masked_only=True)
    assert torch.equal(a.prediction_logits, b.prediction_logits) and torch.equal(a.mlm_loss, b.mlm_loss)
    report = fusion_report(fused)
    assert all(v.startswith("reference") for v in report.values()), report


def test_unsupported_head_dim_falls_back_loudly(device):
    """head_dim 8 is below the attention kernel's minimum: padded path with materialised scores and the
    softmax-dropout kernel, a warning, and the same result at real tokens."""
    config = tiny_config(hidden_size=24, num_attention_heads=3, intermediate_size=40, num_hidden_layers=1)
    fused, ref, ref64 = make_models(config, device)
    ids, mask, types, labels, _ = make_batch(config, device, [15, 6, 0], T=15)
    real = mask.bool()
    report = fusion_report(fused)
    assert "FALLBACK" in report["bert.encoder.layer.0"] and report["bert.encoder"].startswith("padded")
    fused_module._WARNED.clear()  # warned once per process: forget earlier tests' warnings
    with pytest.warns(RuntimeWarning, match="falls back"), torch.no_grad():
        hid = fused.bert(ids, mask, types).last_hidden_state
    with warnings.catch_warnings(record=True) as later, torch.no_grad():  # ... and only once
        warnings.simplefilter("always")
        fused.bert(ids, mask, types)
    assert not [w for w in later if "falls back" in str(w.message)]
    with torch.no_grad():
        expect = [m.bert(ids, mask, types).last_hidden_state for m in (ref, ref64)]
    assert_within_torch_error(hid[real], expect[1][real], expect[0][real], atol=2e-5, name="hidden")


@pytest.mark.no_kernel("module swapping and state_dict keys only")
def test_swap_keeps_parameters_keys_and_ties():
    config = tiny_config(num_hidden_layers=1)
    torch.manual_seed(0)
    ref = BertForPreTraining(config.with_fusions(False))
    params = dict(ref.named_parameters())
    keys = list(ref.state_dict())
    fused = apply_fusions(ref, config)
    assert fused is ref
    assert isinstance(ref.bert.encoder, FusedEncoder)
    assert isinstance(ref.cls.predictions, FusedLMPredictionHead)
    assert list(ref.state_dict()) == keys
    for name, p in ref.named_parameters():
        assert p is params[name], f"{name} is a new parameter object"
    assert ref.cls.predictions.decoder.weight is ref.bert.embeddings.word_embeddings.weight
    assert ref.cls.predictions.bias is ref.cls.predictions.decoder.bias
    before = {n: type(m) for n, m in ref.named_modules()}
    apply_fusions(ref, config)  # idempotent
    assert {n: type(m) for n, m in ref.named_modules()} == before
    # A state_dict moves both ways between fused and reference.
    plain = BertForPreTraining(config.with_fusions(False))
    plain.load_state_dict(ref.state_dict())
    ref.load_state_dict(plain.state_dict())
    # All fusions off leaves a reference model untouched.
    other = BertModel(config.with_fusions(False))
    apply_fusions(other)
    assert type(other.encoder) is modeling.BertEncoder


def test_fused_mlm_loss_with_no_labelled_position_is_zero(device):
    config = tiny_config(num_hidden_layers=1)
    fused, _, _ = make_models(config, device)
    ids, mask, types, _, _ = make_batch(config, device, [9, 4], T=9)
    labels = torch.full_like(ids, -100)
    out = fused(ids, mask, types, labels=labels, masked_only=True)
    assert out.mlm_loss.item() == 0.0 and int(out.mlm_count) == 0
    out.mlm_loss.backward()
    grads = [p.grad for p in fused.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)


@pytest.mark.gpu
def test_bf16_base_sizes_within_torch_error(device):
    """Compiled kernels in bf16 at BERT-base width (the interpreter cannot run bf16 tl.dot)."""
    config = tiny_config(hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522,
                         max_position_embeddings=512)
    fused, ref, ref64 = make_models(config, device)
    fused, ref = fused.bfloat16(), ref.bfloat16()
    lengths = [128, 77, 0, 127, 5, 64, 100, 1]
    batch = make_batch(config, device, lengths, T=128)
    real = batch[1].bool()
    rows = real.any(1)
    out_f, out_r, out_64 = run(fused, batch, rows), run(ref, batch, rows), run(ref64, batch, rows)
    for key in ("pooled", "mlm_loss"):
        assert_within_torch_error(out_f[key], out_64[key], out_r[key], atol=1e-2, name=key)
    assert_within_torch_error(out_f["hidden"][real], out_64["hidden"][real], out_r["hidden"][real], atol=1e-2,
                              name="hidden (real tokens)")
    for name, g64 in out_64["grads"].items():
        assert_within_torch_error(out_f["grads"][name], g64, out_r["grads"][name], k=3.0, atol=1e-3,
                                  name=f"grad {name}")
