"""Fused MLM head + cross-entropy: loss, argmax count and all seven gradients against a float64 reference;
several logits chunks, vocabularies 1000 and 30522, no labelled position, compile entry point, bad input.

On CPU the kernels run through Triton's interpreter (tests/conftest.py); bf16 only in the GPU tests."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.mlm_cross_entropy import mlm_cross_entropy, mlm_cross_entropy_gathered, mlm_cross_entropy_ref
from tests.helpers import assert_within_torch_error, launched

# The module itself (the package re-exports the function under the module's name).
mlm = importlib.import_module("kernels.mlm_cross_entropy")

# Absolute slack per dtype; the tolerance is 2 × PyTorch's own error against float64, plus this, plus one
# unit in the last place of the tensor's largest value (see `_slack`).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _slack(ref64: torch.Tensor, dtype: torch.dtype, ulps: int = 2) -> float:
    """ATOL plus `ulps` units in the last place of the largest reference value in `dtype`. Both sides round
    in `dtype` at every stage (logits gradient, decoder dgrad, LayerNorm and GELU backward), and with one
    or a few labelled rows the 2x ratio of two independent chains of roundings is otherwise a coin toss."""
    return ATOL[dtype] + ulps * torch.finfo(dtype).eps * ref64.abs().max().item()
NAMES = ("hidden", "dense_weight", "dense_bias", "ln_weight", "ln_bias", "decoder_weight", "decoder_bias")


def _weights(H, V, dtype, device, g):
    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    return [rnd(H, H, scale=H**-0.5), rnd(H, scale=0.1), rnd(H, scale=0.1, shift=1.0), rnd(H, scale=0.1),
            rnd(V, H, scale=0.5), rnd(V, scale=0.1)]


def _logits64(hidden, weights, approximate="none", eps=1e-12):
    dw, db, lw, lb, ew, eb = [w.double() for w in weights]
    t = F.gelu(F.linear(hidden.double(), dw, db), approximate=approximate)
    return F.linear(F.layer_norm(t, (t.shape[-1],), lw, lb, eps), ew, eb)


def _problem(shape, V, n_labelled, dtype, device, seed, *, ignore_index=-100, approximate="none"):
    """hidden of `shape` ([B, T, H] or [N, H]); n_labelled random positions scored, half of them with the
    label the model predicts (so the argmax count is not trivially 0), the rest random."""
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    hidden = (torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    weights = _weights(H, V, dtype, device, g)
    labels = torch.full(shape[:-1], ignore_index, dtype=torch.int64)
    flat = labels.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)[:n_labelled]
    flat[pos] = torch.randint(0, V, (n_labelled,), generator=g)
    predicted = _logits64(hidden.reshape(-1, H)[pos.to(device)], weights, approximate).argmax(-1).cpu()
    flat[pos[::2]] = predicted[::2]
    return hidden, labels.to(device), weights


def _loss_and_grads(fn, hidden, labels, weights, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in [hidden, *weights]]
    loss, correct = fn(leaves[0], labels, *leaves[1:], **kwargs)
    loss.backward()
    return loss.detach(), correct, [t.grad for t in leaves]


def _check(hidden, labels, weights, dtype, **kwargs):
    loss, correct, grads = _loss_and_grads(mlm_cross_entropy, hidden, labels, weights, **kwargs)
    as64 = [t.double() for t in [hidden, *weights]]
    loss64, correct64, grads64 = _loss_and_grads(mlm_cross_entropy_ref, as64[0], labels, as64[1:], **kwargs)
    loss_t, _, grads_t = _loss_and_grads(mlm_cross_entropy_ref, hidden, labels, weights, **kwargs)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert correct.dtype == torch.int64 and correct.dim() == 0 and not correct.requires_grad
    ignore = kwargs.get("ignore_index", -100)
    scored = labels.reshape(-1) != ignore
    logits64 = _logits64(hidden.reshape(-1, hidden.shape[-1])[scored], weights, kwargs.get("approximate", "none"))

    # The loss is lse - z_label averaged over a few rows: one ulp of each operand's magnitude (the largest
    # logit for both), since the two sides round the logits independently.
    loss_atol = ATOL[dtype] + torch.finfo(dtype).eps * 2 * logits64.abs().max().item()
    assert_within_torch_error(loss, loss64, loss_t, atol=loss_atol, name="loss")
    for name, t, grad, g64, g_t in zip(NAMES, [hidden, *weights], grads, grads64, grads_t, strict=True):
        assert grad is not None and grad.dtype == t.dtype and grad.shape == t.shape, name
        assert_within_torch_error(grad, g64, g_t, atol=_slack(g64, t.dtype), name=f"d{name}")

    # argmax count: exact unless a scored row's top two float64 logits are closer than the dtype resolves.
    top2 = logits64.topk(2, dim=-1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) < (1e-6 if dtype == torch.float32 else 3e-2)).sum())
    assert correct64.item() >= int(scored.sum()) // 2 > 0 or int(scored.sum()) < 2
    assert abs(correct.item() - correct64.item()) <= near_ties, (correct.item(), correct64.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,V,n_labelled",
    [((2, 37, 96), 1000, 11), ((129, 32), 1000, 1), ((1, 37, 32), 30522, 5)],
)
def test_matches_float64_reference(device, dtype, shape, V, n_labelled):
    hidden, labels, weights = _problem(shape, V, n_labelled, dtype, device, seed=V + n_labelled)
    _check(hidden, labels, weights, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_chunks(device, dtype, monkeypatch):
    """4 rows per logits chunk for 11 labelled rows: 3 chunks, the last one short (fp16 accumulates dE in
    fp32 across chunks)."""
    V = 1000
    monkeypatch.setattr(mlm, "CHUNK_LOGITS_BYTES", 4 * V * torch.empty((), dtype=dtype).element_size())
    hidden, labels, weights = _problem((3, 37, 96), V, 11, dtype, device, seed=3)
    _check(hidden, labels, weights, dtype)


def test_tanh_gelu_and_custom_ignore_index(device):
    hidden, labels, weights = _problem((2, 37, 32), 1000, 9, torch.float32, device, seed=4, ignore_index=-1)
    _check(hidden, labels, weights, torch.float32, approximate="tanh", ignore_index=-1)


def _independent(hidden, labels, weights, ignore_index, approximate="none"):
    """The loss written out with F.cross_entropy's own ignore_index handling, in hidden's dtype (float64 for
    the truth): shares no code with mlm_cross_entropy or mlm_cross_entropy_ref."""
    logits = _logits_in(hidden.reshape(-1, hidden.shape[-1]), weights, approximate)  # (N, V)
    ce_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    flat = labels.reshape(-1)
    loss = F.cross_entropy(logits.to(ce_dtype), flat, ignore_index=ignore_index)
    scored = flat != ignore_index
    return loss, (logits[scored].argmax(-1) == flat[scored]).sum()


def _logits_in(rows, weights, approximate):
    """Logits of rows [N, H] in rows' dtype."""
    dw, db, lw, lb, ew, eb = [w.to(rows.dtype) for w in weights]
    t = F.gelu(F.linear(rows, dw, db), approximate=approximate)
    return F.linear(F.layer_norm(t, (t.shape[-1],), lw, lb, 1e-12), ew, eb)


V_SMALL = 1000
# name: (ignore_index, the labels of the scored positions; every other position holds ignore_index)
LABEL_CASES = {
    "label_0": (-100, [0, 0, 5, 0, V_SMALL - 1, 1, 0]),
    "label_next_to_ignore_index": (-1, [0, 1, 0, 2, 0, 0]),  # 0 = ignore_index + 1
    "ignore_index_inside_vocab": (7, [6, 8, 6, 0, 8, 8, 6]),  # the class 7 is ignored, its neighbours are not
    "every_label_one_class": (-100, [3] * 9),
    "every_label_class_0": (-100, [0] * 5),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_values_and_ignore_index(device, case):
    """Which positions count: label 0, labels next to ignore_index, an ignore_index that is a class id, and
    every scored label one class — loss, argmax count and gradients against an independent float64 loss."""
    ignore_index, row_labels = LABEL_CASES[case]
    dtype = torch.float32
    g = torch.Generator().manual_seed(len(case))
    hidden = torch.randn(2, 37, 32, generator=g).to(device=device, dtype=dtype)
    weights = _weights(32, V_SMALL, dtype, device, g)
    labels = torch.full((2, 37), ignore_index, dtype=torch.int64)
    pos = torch.randperm(labels.numel(), generator=g)[: len(row_labels)]
    labels.view(-1)[pos] = torch.tensor(row_labels)
    labels = labels.to(device)

    loss, correct, grads = _loss_and_grads(mlm_cross_entropy, hidden, labels, weights, ignore_index=ignore_index)
    as64 = [t.double() for t in [hidden, *weights]]
    loss64, correct64, grads64 = _loss_and_grads(
        lambda h, lab, *w: _independent(h, lab, w, ignore_index), as64[0], labels, as64[1:])
    loss_t, _, grads_t = _loss_and_grads(
        lambda h, lab, *w: _independent(h, lab, w, ignore_index), hidden, labels, weights)
    assert launched("kernels.mlm_cross_entropy") == ["_ce_chunk_kernel"]  # one chunk, through the kernel
    assert_within_torch_error(loss, loss64, loss_t, atol=_slack(loss64, dtype), name="loss")
    assert correct.item() == correct64.item()
    for name, t, grad, g64, g_t in zip(NAMES, [hidden, *weights], grads, grads64, grads_t, strict=True):
        assert_within_torch_error(grad, g64, g_t, atol=_slack(g64, t.dtype), name=f"d{name}")
    # The rows that count are exactly the non-ignored ones: the hidden gradient is zero elsewhere, non-zero there.
    scored = labels.reshape(-1) != ignore_index
    dh = grads[0].reshape(-1, 32)
    assert not dh[~scored].any() and bool((dh[scored].abs().amax(-1) > 0).all())


@pytest.mark.reference_path  # nothing to score: the reference on zero rows gives loss 0 and zero gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_labelled_position(device, dtype):
    hidden, labels, weights = _problem((2, 37, 32), 1000, 0, dtype, device, seed=5)
    loss, correct, grads = _loss_and_grads(mlm_cross_entropy, hidden, labels, weights)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert correct.item() == 0
    for name, grad in zip(NAMES, grads, strict=True):
        assert grad is not None and torch.isfinite(grad).all() and not grad.any(), name


def test_inference_without_grad(device):
    hidden, labels, weights = _problem((2, 37, 32), 1000, 7, torch.float32, device, seed=6)
    with torch.no_grad():
        loss, correct = mlm_cross_entropy(hidden, labels, *weights)
        loss_ref, correct_ref = mlm_cross_entropy_ref(hidden, labels, *weights)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert correct.item() == correct_ref.item()


def test_gathered_entry_compiles_fullgraph(device):
    """The pre-gathered entry point traces whole (aot_eager) and matches eager, gradients included."""
    hidden, labels, weights = _problem((23, 32), 1000, 23, torch.float32, device, seed=7)
    compiled = torch.compile(mlm_cross_entropy_gathered, fullgraph=True, backend="aot_eager")
    loss_c, correct_c, grads_c = _loss_and_grads(compiled, hidden, labels, weights)
    loss_e, correct_e, grads_e = _loss_and_grads(mlm_cross_entropy_gathered, hidden, labels, weights)
    torch.testing.assert_close(loss_c, loss_e)
    assert correct_c.item() == correct_e.item()
    for a, c in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    "case",
    ["hidden_rank", "hidden_int", "labels_dtype", "labels_shape", "label_too_big", "label_negative",
     "dense_shape", "ln_shape", "decoder_width", "decoder_bias_shape", "device", "approximate", "eps",
     "ignore_index_type"],
)
@pytest.mark.no_kernel("argument checks raise before any launch")
def test_bad_arguments_raise(device, case):
    hidden, labels, weights = _problem((2, 5, 32), 50, 4, torch.float32, device, seed=8)
    dw, db, lw, lb, ew, eb = weights
    args = dict(hidden=hidden, labels=labels, dense_weight=dw, dense_bias=db, ln_weight=lw, ln_bias=lb,
                decoder_weight=ew, decoder_bias=eb)
    bad_labels = labels.clone()
    kwargs = {}
    if case == "hidden_rank":
        args["hidden"] = hidden.reshape(-1)
    elif case == "hidden_int":
        args["hidden"] = hidden.to(torch.int32)
    elif case == "labels_dtype":
        args["labels"] = labels.to(torch.int32)
    elif case == "labels_shape":
        args["labels"] = labels[:, :4]
    elif case == "label_too_big":
        bad_labels[0, 0] = 50
        args["labels"] = bad_labels
    elif case == "label_negative":
        bad_labels[0, 0] = -2
        args["labels"] = bad_labels
    elif case == "dense_shape":
        args["dense_weight"] = dw[:31]
    elif case == "ln_shape":
        args["ln_weight"] = lw[:31]
    elif case == "decoder_width":
        args["decoder_weight"] = ew[:, :31]
    elif case == "decoder_bias_shape":
        args["decoder_bias"] = eb[:49]
    elif case == "device":
        args["decoder_bias"] = eb.to("meta")
    elif case == "approximate":
        kwargs["approximate"] = "sigmoid"
    elif case == "eps":
        kwargs["eps"] = 0.0
    elif case == "ignore_index_type":
        kwargs["ignore_index"] = -100.0
    with pytest.raises(ValueError):
        mlm_cross_entropy(**args, **kwargs)


@pytest.mark.no_kernel("argument checks raise before any launch")
def test_gathered_bad_arguments_raise(device):
    hidden, labels, weights = _problem((6, 32), 50, 6, torch.float32, device, seed=10)
    with pytest.raises(ValueError, match="row_labels"):
        mlm_cross_entropy_gathered(hidden, labels[:5], *weights)
    with pytest.raises(ValueError, match="labels must be in"):
        mlm_cross_entropy_gathered(hidden, torch.full_like(labels, -100), *weights)
    with pytest.raises(ValueError, match="rows"):
        mlm_cross_entropy_gathered(hidden[None], labels, *weights)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bert_vocab(dtype, monkeypatch):
    """Compiled kernels at BERT's vocabulary, several chunks, bf16 and fp16."""
    V = 30522
    monkeypatch.setattr(mlm, "CHUNK_LOGITS_BYTES", 200 * V * 2)
    hidden, labels, weights = _problem((8, 128, 256), V, 600, dtype, "cuda", seed=9)
    _check(hidden, labels, weights, dtype)
