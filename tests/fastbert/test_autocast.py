"""The fused model under `torch.autocast`: kernels run in autocast's dtype, parameters stay fp32.

Autocast does not cast the inputs of custom ops, so the fused modules cast them (fastbert/fused.py, "Autocast").
On CPU the test runs `torch.autocast("cpu", dtype=torch.float16)` through Triton's interpreter (which cannot do
bf16 `tl.dot`); the bf16 CUDA autocast of training is the `gpu`-marked test. Tiny odd config (hidden 96, 3 heads
of 32, T = 37) with padding and a fully padded row, dropout 0, on the unpadded, padded and softmax-fallback paths.

Checked: (a) forward + backward run; (b) every kernel call gets its activations, weights and biases in autocast's
dtype (spies on the kernel functions), LayerNorm's gamma / beta and the fused bias passed as the fp32 parameters;
(c) outputs, loss and every gradient within the tests/helpers.py rule against a float64 reference; (d) every
parameter stays fp32 and gets an fp32 gradient.

Baseline of the tolerance rule ("the same computation done by PyTorch"): the fp32 reference model under the same
autocast, with the output of each of its LayerNorms stored in autocast's dtype. The fused path keeps the residual
stream in autocast's dtype by design (its LayerNorm kernel writes its input's dtype), while autocast's own
LayerNorm returns fp32; without that one rounding in the baseline, the fused hidden states would be compared with
a more precise computation than the one they implement. Everything else in the baseline is plain autocast.
As in tests/fastbert/test_fused.py, outputs are compared at real tokens, the pooled output on rows with a real
token, and the loss is built from those (the fused path gives zeros for a fully padded row).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert.fused as fused_module
from fastbert.fused import FusedIntermediate
from tests.fastbert.test_fused import make_batch, make_models, tiny_config
from tests.helpers import assert_within_torch_error

mlm_kernels = importlib.import_module("kernels.mlm_cross_entropy")

# Kernel function -> the arguments that must arrive in the compute dtype. The other float arguments are the
# parameters a kernel takes in any float dtype (LayerNorm gamma/beta, the fused bias; mlm_cross_entropy casts
# its weights itself): those must arrive as the fp32 parameters, uncast.
COMPUTE_ARGS = {
    "qkv_projection": ("x", "w_qkv", "b_qkv"),
    "qkv_projection_packed": ("x", "w_qkv", "b_qkv"),
    "fused_attention": ("q", "k", "v"),
    "fused_attention_varlen": ("q", "k", "v"),
    "fused_attention_qkvpacked": ("qkv",),
    "fused_attention_varlen_qkvpacked": ("qkv",),
    "scaled_masked_softmax_dropout": ("scores",),
    "linear_bias_gelu": ("x", "weight", "bias"),
    "bias_dropout_add_layernorm": ("x", "residual"),
    "mlm_cross_entropy": ("hidden",),
}
# Kernels called inside mlm_cross_entropy (looked up in its own module).
INNER_MLM_KERNELS = ("linear_bias_gelu", "bias_dropout_add_layernorm")

PATHS = {  # path -> (config overrides, fusion flags for `optimize`, the attention kernel it must call)
    "unpadded": ({}, {}, "fused_attention_varlen_qkvpacked"),
    "padded": ({}, dict(unpad=False), "fused_attention_qkvpacked"),
    # head_dim 8 is below the flash-style kernel's range: materialised scores + softmax-dropout kernel.
    "softmax fallback": (dict(num_attention_heads=12), {}, "scaled_masked_softmax_dropout"),
}


def _spy(name: str, fn: Callable, calls: list) -> Callable:
    signature = inspect.signature(fn)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        floats = {k: v.dtype for k, v in bound.arguments.items() if torch.is_tensor(v) and v.is_floating_point()}
        calls.append((name, floats))
        return fn(*args, **kwargs)

    return spy


def _spy_on_kernels(monkeypatch) -> list:
    calls: list = []
    for name in COMPUTE_ARGS:
        monkeypatch.setattr(fused_module, name, _spy(name, getattr(fused_module, name), calls))
    for name in INNER_MLM_KERNELS:
        monkeypatch.setattr(mlm_kernels, name, _spy(name, getattr(mlm_kernels, name), calls))
    return calls


def _store_layernorm_outputs_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The baseline (module docstring): every LayerNorm's output rounded to `dtype`, as the fused path stores it."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(lambda mod, args, out: out.to(dtype))
    return model


def _run(model: nn.Module, batch, rows: torch.Tensor, autocast_dtype: torch.dtype | None) -> dict:
    """Forward (under autocast when a dtype is given) + backward, outside autocast as training does."""
    ids, mask, types, labels, nsp = batch
    model.zero_grad(set_to_none=True)
    seen = []
    hook = model.bert.register_forward_hook(lambda mod, args, output: seen.append(output))
    with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(ids, mask, types, labels=labels, masked_only=True)
    hook.remove()
    hidden, pooled = seen[0]
    loss = out.mlm_loss.double() + F.cross_entropy(out.seq_relationship_logits[rows].double(), nsp[rows])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(hidden=hidden, pooled=pooled[rows], mlm_loss=out.mlm_loss, loss=loss, grads=grads)


def _check_fused_under_autocast(monkeypatch, device: str, dtype: torch.dtype, path: str) -> None:
    overrides, fusions, attention_kernel = PATHS[path]
    config = tiny_config(**overrides)
    fused, ref, ref64 = make_models(config, device, **fusions)
    baseline = _store_layernorm_outputs_in(copy.deepcopy(ref), dtype)
    batch = make_batch(config, device)
    real = batch[1].bool()
    rows = real.any(1)
    calls = _spy_on_kernels(monkeypatch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the softmax fallback's warning (tested in test_fused)
        out_f = _run(fused, batch, rows, dtype)  # (a): no error
    out_b, out_64 = _run(baseline, batch, rows, dtype), _run(ref64, batch, rows, None)

    # (b) one compute dtype for every kernel call; the LayerNorm parameters and fused bias passed uncast (fp32).
    called = {name for name, _ in calls}
    qkv = "qkv_projection" if attention_kernel == "scaled_masked_softmax_dropout" else "qkv_projection_packed"
    assert {qkv, attention_kernel, "linear_bias_gelu", "bias_dropout_add_layernorm",
            "mlm_cross_entropy"} <= called, f"kernels called: {sorted(called)}"
    for name, dtypes in calls:
        for arg in COMPUTE_ARGS[name]:
            if arg in dtypes:
                assert dtypes[arg] == dtype, f"{name}({arg}) got {dtypes[arg]}, autocast dtype is {dtype}"
        if name == "bias_dropout_add_layernorm":
            kept = {arg: dtypes[arg] for arg in ("bias", "gamma", "beta") if arg in dtypes}
            assert set(kept.values()) == {torch.float32}, f"{name}: parameters {kept} should stay fp32"
    assert out_f["hidden"].dtype == dtype, "the encoder returns autocast's dtype"

    # (c) within the tolerance rule; atol: 1% of the dtype's epsilon (gradients here are ~1e-2 in size), times the
    # magnitude for the losses (~4.6): a scalar's PyTorch error can be near zero by luck of cancellation (2e-6 for
    # mlm_loss on a CPU with AVX512-FP16, where the hidden states' PyTorch error is 5e-3, the kernels' 2.8e-3).
    atol = 0.01 * torch.finfo(dtype).eps
    for key in ("pooled", "mlm_loss", "loss"):
        scale = max(1.0, out_64[key].abs().max().item())
        assert_within_torch_error(out_f[key], out_64[key], out_b[key], atol=atol * scale, name=key)
    assert_within_torch_error(out_f["hidden"][real], out_64["hidden"][real], out_b["hidden"][real], atol=atol,
                              name="hidden (real tokens)")
    assert set(out_f["grads"]) == set(out_64["grads"])
    for name, g64 in out_64["grads"].items():
        assert_within_torch_error(out_f["grads"][name], g64, out_b["grads"][name], atol=atol, name=f"grad {name}")

    # (d) fp32 master parameters with fp32 gradients.
    for name, p in fused.named_parameters():
        assert p.dtype == torch.float32, f"{name} is {p.dtype}"
        assert p.grad is None or p.grad.dtype == torch.float32, f"grad of {name} is {p.grad.dtype}"


@pytest.mark.parametrize("path", list(PATHS))
def test_fused_model_under_cpu_fp16_autocast(monkeypatch, path):
    _check_fused_under_autocast(monkeypatch, "cpu", torch.float16, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(PATHS))
def test_fused_model_under_cuda_bf16_autocast(monkeypatch, path):
    _check_fused_under_autocast(monkeypatch, "cuda", torch.bfloat16, path)


def test_without_autocast_nothing_is_cast():
    """Outside autocast the kernels take tensors as given: mismatched dtypes still raise, as nn.Linear does."""
    layer = FusedIntermediate(tiny_config())
    x = torch.randn(2, 5, 96, dtype=torch.float16)
    with pytest.raises(ValueError, match="one dtype"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x.float())
    assert y.dtype == torch.float16
