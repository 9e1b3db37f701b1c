"""`torch.compile(fullgraph=True)` of the fused model traces without graph breaks and matches eager.

The kernels are torch.library custom ops with fake implementations. Under compilation the encoder stays on the
padded fused path and the MLM loss runs over every position with ignore_index (no data-dependent shapes), see
fastbert/fused.py. On CPU the test uses backend="aot_eager" (traces forward and backward through AOTAutograd;
inductor works on CPU too, but compiling with the C compiler takes minutes on two cores); on a GPU, inductor.
"""

from __future__ import annotations

import pytest
import torch

from fastbert import BertConfig, BertForPreTraining
from fastbert.optimize import optimize
from tests.helpers import pad_mask


def _model_and_batch(device: str):
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = optimize(BertForPreTraining(config.with_fusions(False))).to(device)
    lengths = [13, 6, 9]
    mask = pad_mask(lengths, 13, device)
    ids = torch.randint(1, 64, (3, 13), device=device).masked_fill(~mask, 0)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 11] = 5
    nsp = torch.tensor([0, 1, 1], device=device)
    return model, (ids, mask.long()), dict(labels=labels, next_sentence_label=nsp, masked_only=True)


def _run(model, call, args, kwargs):
    model.zero_grad(set_to_none=True)
    out = call(*args, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_compiled_matches_eager(device: str, backend: str) -> None:
    model, args, kwargs = _model_and_batch(device)
    eager_out, eager_grads = _run(model, model, args, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, grads = _run(model, compiled, args, kwargs)
    torch.testing.assert_close(out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.seq_relationship_logits, eager_out.seq_relationship_logits, rtol=1e-5, atol=1e-6)
    assert int(out.mlm_correct) == int(eager_out.mlm_correct) and int(out.mlm_count) == int(eager_out.mlm_count)
    assert set(grads) == set(eager_grads)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"grad {name}")


def test_compile_fullgraph_matches_eager(device):
    _check_compiled_matches_eager(device, "aot_eager")


@pytest.mark.gpu
def test_compile_fullgraph_inductor_matches_eager_on_gpu():
    _check_compiled_matches_eager("cuda", "inductor")
