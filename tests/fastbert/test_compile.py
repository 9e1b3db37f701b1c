"""`torch.compile(fullgraph=True)` of the fused model traces without graph breaks and matches eager.

The kernels are torch.library custom ops with fake implementations. Without packing metadata, under compilation
the encoder stays on the padded fused path and the MLM loss runs over every position with ignore_index (no
data-dependent shapes), see fastbert/fused.py; with it (`packed=`) the compiled model keeps both fast paths.
On CPU the test uses backend="aot_eager" (traces forward and backward through AOTAutograd;
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


# ------------------------------------------------------------------------------------ with packing metadata
def _packed_batch(lengths: list[int], T: int, seed: int, device: str):
    from fastbert.packing import PackedBatch

    g = torch.Generator().manual_seed(seed)
    mask = pad_mask(lengths, T)
    ids = torch.randint(1, 64, (len(lengths), T), generator=g).masked_fill(~mask, 0)
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.25) & mask
    pick[0, 1] = True  # at least one labelled position
    labels[pick] = ids[pick]
    nsp = torch.randint(0, 2, (len(lengths),), generator=g)
    packed = PackedBatch.from_batch(mask.long(), labels).to(device)
    return (ids.to(device), mask.long().to(device)), dict(
        labels=labels.to(device), next_sentence_label=nsp.to(device), masked_only=True, packed=packed
    )


def _recording_backend(graphs: list):
    """aot_eager that keeps each forward graph (aten ops and fastbert's custom ops, with their shapes)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, ex: make_boxed_func(gm.forward))


def test_compile_with_packing_keeps_the_fast_paths(device):
    """With `packed=`, the compiled model (fullgraph) runs the varlen attention and the masked-only MLM loss, and
    matches eager; padding and a fully padded row are present."""
    model, _, _ = _model_and_batch(device)
    args, kwargs = _packed_batch([13, 6, 9, 0], 13, seed=0, device=device)
    eager_out, eager_grads = _run(model, model, args, kwargs)
    torch._dynamo.reset()
    graphs: list = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    out, grads = _run(model, compiled, args, kwargs)
    assert len(graphs) == 1
    attention = [n for n in graphs[0].graph.nodes if n.target is torch.ops.kernels.flash_attn_fwd.default]
    assert len(attention) == model.config.num_hidden_layers
    assert all(n.args[4] is not None for n in attention), "compiled encoder must run the varlen (unpadded) path"
    B, T = args[0].shape
    V, n = model.config.vocab_size, kwargs["packed"].num_labelled
    shapes = [tuple(node.meta["val"].shape) for node in graphs[0].graph.nodes
              if isinstance(node.meta.get("val"), torch.Tensor)]  # fmt: skip
    assert not any(s[-1:] == (V,) and len(s) >= 2 for s in shapes), "no logits may be materialised"
    assert any(node.target is torch.ops.kernels.mlm_decoder_cross_entropy.default for node in graphs[0].graph.nodes)
    assert (n, model.config.hidden_size) in shapes and n < B * T  # the head runs on the labelled rows only
    torch.testing.assert_close(out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.seq_relationship_logits, eager_out.seq_relationship_logits, rtol=1e-5, atol=1e-6)
    assert int(out.mlm_count) == int(eager_out.mlm_count) == kwargs["packed"].num_labelled
    assert set(grads) == set(eager_grads)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"grad {name}")


def test_compile_with_packing_bounded_recompiles(device):
    """10 batches of different lengths (batch size, padded length, real lengths, labelled count all vary): no
    graph break and a bounded number of compilations (dynamic shapes, not one graph per length)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, _, _ = _model_and_batch(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(5)
    seen = set()
    for step in range(10):
        B = 2 + step % 3
        T = 5 + 2 * step  # 5 .. 23: a new padded length every batch
        lengths = [int(x) for x in torch.randint(1, T + 1, (B,), generator=g)]
        lengths[0] = T
        seen.add((B, T))
        args, kwargs = _packed_batch(lengths, T, seed=step, device=device)
        out, _ = _run(model, compiled, args, kwargs)
        assert torch.isfinite(out.loss)
    graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    print(f"10 batches ({len(seen)} shapes): {counter.frame_count} compilations, {graph_breaks} graph breaks")
    assert graph_breaks == 0
    assert counter.frame_count <= 2  # the first batch static, then one dynamic-shape graph for all
