"""PackedBatch: metadata from the CPU collate, refused when it disagrees with the batch, and a fused training step
that makes no device→host synchronisation with it.

The sentinel (`NoHostSync`) runs a step under a TorchFunctionMode and a TorchDispatchMode and records every call
that synchronises with the device on a GPU: ``.item()`` / ``bool`` / ``int`` / ``float`` of a tensor (dispatched as
``aten._local_scalar_dense``), ``.tolist()``, ``.numpy()``, ``.cpu()``, ``nonzero``, ``masked_select``, boolean
indexing, ``unique``, ``equal``, ``repeat_interleave`` without ``output_size``. It also looks inside fastbert's
own custom ops (their Python implementations run under the modes). Exempt, by the frame they come from: the
dropout seed (`kernels._common.seed_value` reads a tensor `draw_seed` creates on the CPU on every device), the
metadata's CPU-side value checks (`fastbert.packing`, which return before reading any value of a device
tensor — `test_checks_read_no_device_values`), the value checks of `fastbert.modeling.check_inputs` and
`check_labels` (both return before reading a value of a non-CPU tensor) and the
expanded-mask check of `fastbert.optimize.key_padding_from_hf_mask` (with metadata, both run on CPU tensors
only), and Triton's interpreter (it stands in for a GPU launch here).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert import BertConfig, BertForPreTraining
from fastbert.optimize import optimize
from fastbert.packing import PackedBatch
from tests.helpers import pad_mask

_SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "equal", "is_nonzero"}  # fmt: skip
_EXEMPT = (
    ("kernels/_common.py", "seed_value"), ("fastbert/packing.py", None), ("fastbert/modeling.py", "check_inputs"),
    ("fastbert/modeling.py", "check_labels"), ("fastbert/optimize.py", "key_padding_from_hf_mask"), ("triton/", None),
)  # fmt: skip


def _exempt() -> bool:
    for frame in traceback.extract_stack():
        for path, func in _EXEMPT:
            if path in frame.filename.replace("\\", "/") and (func is None or frame.name == func):
                return True
    return False


class NoHostSync:
    """Context manager recording synchronising calls (see the module docstring) in `self.syncs`."""

    def __init__(self):
        self.syncs: list[str] = []
        sentinel = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in _SYNC_METHODS and not _exempt():
                    sentinel._record(f"Tensor.{name}")
                opdef = _custom_opdef(func)
                if opdef is not None:  # run fastbert's op under the modes, to see inside it
                    with self:
                        return opdef(*args, **kwargs)
                return func(*args, **kwargs)

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                bad = name in _SYNC_OPS
                unsized = kwargs.get("output_size") is None and func._overloadname == "Tensor"
                bad |= name == "repeat_interleave" and unsized
                bad |= name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
                if bad and not _exempt():
                    sentinel._record(f"aten.{name}")
                return func(*args, **kwargs)

        self._modes = (_Functions(), _Dispatch())

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()
        where = [f for f in stack if "/torch/" not in f.filename and "test_packing" not in f.filename]
        self.syncs.append(f"{what} at {where[-1].filename}:{where[-1].lineno}" if where else what)

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def _custom_opdef(func):
    """The Python implementation of a `kernels::` custom op (None for anything else)."""
    name = getattr(func, "_name", None) or getattr(getattr(func, "_opoverload", None), "_name", None)
    if not isinstance(name, str) or not name.startswith("kernels::"):
        return None
    opdef = torch._library.custom_ops.OPDEFS.get(name)
    return getattr(opdef, "_init_fn", None)


def _config(**kw) -> BertConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # fmt: skip
    return BertConfig(**{**base, **kw})


def _batch(lengths, T, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = pad_mask(lengths, T)
    ids = torch.randint(1, 64, (len(lengths), T), generator=g).masked_fill(~mask, 0)
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & mask
    labels[pick] = ids[pick]
    nsp = torch.randint(0, 2, (len(lengths),), generator=g)
    packed = PackedBatch.from_batch(mask.long(), labels)
    return [t.to(device) for t in (ids, mask.long(), labels, nsp)], packed.to(device)


def _step(model, batch, packed):
    ids, mask, labels, nsp = batch
    out = model(ids, mask, None, labels, nsp, masked_only=True, packed=packed)
    out.loss.backward()
    return out


def test_fused_training_step_makes_no_host_sync(device):
    torch.manual_seed(0)
    model = optimize(BertForPreTraining(_config().with_fusions(False))).to(device).train()
    batch, packed = _batch([11, 4, 9, 0], 11, device=device)  # padding and a fully padded row
    with NoHostSync() as with_packed:
        _step(model, batch, packed)
    with NoHostSync() as without:
        _step(model, batch, None)
    sites = sorted({s.split(" at ")[-1] for s in without.syncs})
    print(f"synchronising call sites in one fused training step: {len(set(with_packed.syncs))} with packing "
          f"metadata, {len(sites)} without: {sites}")
    assert with_packed.syncs == []
    assert len(sites) >= 4  # the sentinel does see the syncs of the path without metadata
    if torch.cuda.is_available():  # the device's own verdict
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(model, batch, packed)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_packed_step_matches_unpacked(device):
    """Same loss and gradients with and without the metadata (dropout off: the same math, other gather)."""
    torch.manual_seed(0)
    model = optimize(BertForPreTraining(_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    model = model.to(device)
    batch, packed = _batch([9, 3, 7], 9, seed=1, device=device)
    results = []
    for p in (None, packed):
        model.zero_grad(set_to_none=True)
        out = _step(model, batch, p)
        results.append((out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert int(a.mlm_count) == int(b.mlm_count) == packed.num_labelled
    assert set(ga) == set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_reference_model_accepts_the_metadata():
    """Unfused (the reference): `packed` changes nothing, results identical."""
    torch.manual_seed(0)
    model = BertForPreTraining(_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).with_fusions(False))
    batch, packed = _batch([9, 3, 7], 9, seed=2)
    ids, mask, labels, nsp = batch
    a = model(ids, mask, None, labels, nsp, masked_only=True)
    b = model(ids, mask, None, labels, nsp, masked_only=True, packed=packed)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, rtol=0, atol=0)


def test_from_batch_fields():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    labels = torch.full((3, 4), -100)
    labels[0, 1], labels[1, 0] = 7, 3
    p = PackedBatch.from_batch(mask, labels)
    assert p.cu_seqlens.tolist() == [0, 3, 4, 4] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 3 and isinstance(p.max_seqlen, int)
    assert p.token_indices.tolist() == [0, 1, 2, 4] and p.labelled_positions.tolist() == [1, 4]
    assert p.num_labelled == 2 and p.label_range == (3, 7) and p.lengths == (3, 1, 0) and p.values_checked


def _disagreeing():
    mask = pad_mask([5, 2], 5).long()
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 9
    good = PackedBatch.from_batch(mask, labels)
    other_mask = pad_mask([4, 3], 5).long()
    return mask, labels, good, [
        (lambda: PackedBatch.from_batch(other_mask, labels), "lengths .* disagree with attention_mask"),
        (lambda: _replace(good, max_seqlen=4), "max_seqlen = 4 is below the longest sequence"),
        (lambda: _replace(good, num_labelled=2), "labelled_positions must be a 1-D"),
        (lambda: _replace(good, cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32)), "disagrees with lengths"),
        (lambda: _replace(good, cu_seqlens=good.cu_seqlens.long()), "cu_seqlens must be a 1-D torch.int32"),
        (lambda: _replace(good, max_seqlen=5.0), "max_seqlen must be an int"),
        (lambda: _replace(good, lengths=(5, 9)), "lengths must be a non-empty tuple"),
        (lambda: _replace(good, token_indices=torch.tensor([0, 1, 2, 3, 4, 6, 5])), "increasing positions"),
        (lambda: _replace(good, token_indices=torch.tensor([0, 1, 2, 3, 5, 6, 7])), "give each sequence"),
    ]


def _replace(p, **kw):
    import dataclasses

    return dataclasses.replace(p, **kw)


@pytest.mark.parametrize("case", range(9))
def test_inconsistent_metadata_is_refused(case):
    *_, cases = _disagreeing()
    build, match = cases[case]
    if case == 0:  # built from another mask: consistent in itself, refused against the batch
        mask, labels, _, _ = _disagreeing()
        p = build()
        model = BertForPreTraining(_config().with_fusions(False))
        with pytest.raises(ValueError, match=match):
            model(torch.ones_like(mask), mask, labels=labels, packed=p)
        return
    with pytest.raises(ValueError, match=match):
        build()


def test_token_positions_disagreeing_with_the_mask_at_equal_counts_are_refused():
    """Metadata of another mask with the same count per row: the lengths agree, the positions do not."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    other = PackedBatch.from_batch(torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]))
    assert other.lengths == (3, 2) and other.num_tokens == 5
    model = BertForPreTraining(_config().with_fusions(False))
    with pytest.raises(ValueError, match="token_indices disagree with attention_mask's real positions"):
        model(torch.ones_like(mask), mask, packed=other)


def test_duplicate_indices_are_refused():
    """A repeated position with every row's count right (5 + 2 tokens): still not the mask's positions."""
    _, _, good, _ = _disagreeing()
    with pytest.raises(ValueError, match="token_indices must be increasing"):
        _replace(good, token_indices=torch.tensor([0, 1, 2, 3, 3, 5, 6]))
    with pytest.raises(ValueError, match="labelled_positions must be increasing"):
        _replace(good, labelled_positions=torch.tensor([3, 3]), num_labelled=2)


def test_metadata_disagreeing_with_labels_or_shape_is_refused():
    mask, labels, good, _ = _disagreeing()
    model = BertForPreTraining(_config().with_fusions(False))
    ids = torch.ones_like(mask)
    more = labels.clone()
    more[1, 0] = 4
    with pytest.raises(ValueError, match="num_labelled = 1 but labels has 2"):
        model(ids, mask, labels=more, packed=good)
    moved = labels.clone()
    moved[0, 3], moved[0, 2] = -100, 9
    with pytest.raises(ValueError, match="labelled_positions disagree with labels"):
        model(ids, mask, labels=moved, packed=good)
    wide = PackedBatch.from_batch(mask, labels.masked_fill(labels == 9, 64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=64\)"):
        model(ids, mask, labels=labels.masked_fill(labels == 9, 64), packed=wide)
    with pytest.raises(ValueError, match=r"packed metadata is for a \[2, 5\] batch, got \[2, 4\]"):
        model(ids[:, :4], mask[:, :4], packed=good)
    with pytest.raises(ValueError, match="needs the attention_mask"):
        model(ids, None, packed=good)
    with pytest.raises(ValueError, match="packed must be a fastbert.packing.PackedBatch"):
        model(ids, mask, packed={"cu_seqlens": good.cu_seqlens})
    with pytest.raises(ValueError, match="has none"):
        model(ids, mask, labels=labels, packed=PackedBatch.from_batch(mask))


def test_checks_read_no_device_values():
    """On a non-CPU device `check` / `check_labels` stop at the host fields: meta tensors (which have no values
    to read) pass, so nothing there reads a device tensor back."""
    mask, labels, good, _ = _disagreeing()
    meta = good.to("meta")
    assert meta.values_checked  # validated on the CPU before the move
    assert not _replace(meta, values_checked=False).values_checked  # built on a device: values unchecked
    meta.check(torch.empty(2, 5, device="meta", dtype=torch.long), torch.empty(2, 5, device="meta", dtype=torch.long))
    meta.check_labels(torch.empty(2, 5, device="meta", dtype=torch.long), 64)


def test_collate_returns_the_metadata():
    from train.dataset import collate

    items = []
    for n in (5, 3):
        ids = torch.zeros(12, dtype=torch.int64)
        ids[:n] = 7
        lab = torch.full((12,), -100)
        lab[1] = 7
        items.append(dict(input_ids=ids, attention_mask=(ids != 0).long(), token_type_ids=torch.zeros(12).long(),
                          labels=lab, next_sentence_label=torch.tensor(0)))  # fmt: skip
    b = collate(items)
    p = b["packed"]
    assert b["input_ids"].shape == (2, 8) and p.seq_len == 8
    assert p.lengths == (5, 3) and p.max_seqlen == 5 and p.num_labelled == 2
    assert p.labelled_positions.tolist() == [1, 9]
    p.check(b["input_ids"], b["attention_mask"])
    p.check_labels(b["labels"], 30)


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_packed_step():
    """Whole-step CUDA-graph capture (forward + backward) with fixed shapes and the sync-free packed path; replays
    match eager. Written without a GPU and not yet run on one. Dropout is off: the kernels draw their dropout seed
    on the host per launch (`kernels._common.draw_seed`), so a captured graph would replay one mask forever —
    training with dropout under CUDA graphs needs a device-side seed first."""
    torch.manual_seed(0)
    config = _config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = optimize(BertForPreTraining(config.with_fusions(False))).cuda().train()
    batch, packed = _batch([11, 4, 9, 0], 11, device="cuda")
    model.zero_grad(set_to_none=True)
    eager = _step(model, batch, packed).loss.detach().clone()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: autotuning, allocator, lazy init
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            _step(model, batch, packed)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(model, batch, packed).loss
    for _ in range(2):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, eager, rtol=1e-5, atol=1e-6)
        for n, g in eager_grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_optimized_transformers_model_takes_the_metadata(attn, device):
    """transformers passes `packed=` down to the swapped encoder: same outputs, no sync inside the encoder, and
    metadata that disagrees with the mask is refused."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32)  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = optimize(transformers.BertModel(cfg)).to(device).eval()
    (ids, mask, labels, _), packed = _batch([11, 4, 9, 0], 11, seed=3, device=device)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).last_hidden_state
        encoder_syncs = NoHostSync()
        original = model.encoder.forward

        def watched(*args, **kwargs):
            with encoder_syncs:
                return original(*args, **kwargs)

        model.encoder.forward = watched
        fast = model(ids, attention_mask=mask, packed=packed).last_hidden_state
        model.encoder.forward = original
    real = mask.bool()
    torch.testing.assert_close(fast[real], plain[real], rtol=1e-5, atol=1e-5)
    assert encoder_syncs.syncs == []
    wrong = PackedBatch.from_batch(pad_mask([11, 5, 9, 0], 11).long()).to(device)
    with pytest.raises(ValueError, match="disagree with attention_mask"):
        model(ids, attention_mask=mask, packed=wrong)


def test_fusion_report_names_the_gemm_path(monkeypatch):
    """fusion_report says which GEMM implementation each layer's QKV / FFN-up / MLM-transform GEMM takes, and why."""
    import kernels.matmul as mm
    from fastbert.fused import fusion_report

    model = optimize(BertForPreTraining(_config().with_fusions(False)))
    report = fusion_report(model)
    layer, head = report["bert.encoder.layer.0"], report["cls.predictions"]
    assert "qkv: one GEMM, cuBLAS addmm" in layer and "no GPU timing" in layer
    assert "bias+GELU: fused, cuBLAS addmm + Triton GELU epilogue" in layer
    assert "transform bias+GELU: fused, cuBLAS addmm + Triton GELU epilogue" in head
    monkeypatch.setitem(mm._BACKEND, "bias_gelu", "triton")
    monkeypatch.setitem(mm._BACKEND_SOURCE, "bias_gelu", "FASTBERT_GEMM")
    layer = fusion_report(model)["bert.encoder.layer.0"]
    assert "Triton GEMM with bias+GELU epilogue (TMA + persistent on sm_90) (FASTBERT_GEMM)" in layer
