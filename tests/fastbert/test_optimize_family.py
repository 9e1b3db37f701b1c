"""`fastbert.optimize` on transformers' BERT family: RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT, DistilBERT (and BERT).

Interpreter, fp32, tiny random models of each architecture (2 layers, hidden <= 64, head dims 16..64), built from
transformers' config classes and shared through one module-scope cache. Against transformers' eager model with the
same weights on a padded batch (a row of one token among them): outputs within 1e-4 and every parameter gradient
within 1e-3 (norm-wise relative), with Triton kernels launched. Padded positions are left out (the fused encoder
gives zeros there, see fastbert/fused.py). Also: the dropout p each kernel call gets (per layout: ALBERT has none
after its FFN, DistilBERT none after its attention), p = 0 equal to eval, packed= equal to padded, parameters and
ALBERT's sharing kept, save/load as the original class, one Trainer step, gradient checkpointing, torch.compile,
sentence-transformers, no per-layer host sync in inference, refusals named.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastbert.fused as fused_mod
from fastbert.optimize import HFFusedEncoder, HFLayoutEncoder, optimize
from fastbert.packing import PackedBatch
from tests.fastbert.test_packing import NoHostSync
from tests.helpers import launched, pad_mask, require

transformers = require("transformers")

T = 11
LENGTHS = [11, 6, 1]  # a heavily padded row (one token)
VOCAB = 97

_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# arch -> (config, task head the parity test runs); head dims 16, 32 and 64 among them.
ARCHS = {
    "bert": (lambda: transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                             intermediate_size=80, **_COMMON), "BertForMaskedLM"),
    "roberta": (lambda: transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=96, pad_token_id=1, **_COMMON),
                "RobertaForSequenceClassification"),
    "xlm-roberta": (lambda: transformers.XLMRobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                                          intermediate_size=80, pad_token_id=1, num_labels=3,
                                                          **_COMMON), "XLMRobertaForTokenClassification"),
    "camembert": (lambda: transformers.CamembertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                       intermediate_size=64, pad_token_id=1, **_COMMON),
                  "CamembertForQuestionAnswering"),
    "electra": (lambda: transformers.ElectraConfig(embedding_size=24, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=96, **_COMMON),
                "ElectraForMaskedLM"),
    "albert": (lambda: transformers.AlbertConfig(embedding_size=24, hidden_size=48, num_hidden_layers=2,
                                                 num_attention_heads=3, intermediate_size=80, **_COMMON),
               "AlbertForMaskedLM"),  # gelu_new (tanh GELU), one layer shared by both depths
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=40, dim=64,
                                                         n_layers=2, n_heads=2, hidden_dim=96, dropout=0.1,
                                                         attention_dropout=0.1), "DistilBertForSequenceClassification"),
}  # fmt: skip
_MODELS: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}


def pair(arch: str, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers' eager model, its optimize()d copy) of `arch`'s task head, built once per module, in eval."""
    if arch not in _MODELS:
        make, head = ARCHS[arch]
        cfg = make()
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        ref = getattr(transformers, head)(cfg).to(device).eval()
        with torch.no_grad():  # non-trivial biases and LayerNorm affine
            for name, p in ref.named_parameters():
                if name.endswith("bias") or "norm" in name.lower():
                    p.add_(0.05 * torch.randn_like(p))
        _MODELS[arch] = ref, optimize(copy.deepcopy(ref))
    ref, fused = _MODELS[arch]
    for m in (ref, fused):
        m.eval().zero_grad(set_to_none=True)
    return ref, fused


def batch(arch: str, lengths=LENGTHS, T: int = T, device: str = "cpu", seed: int = 0):
    pad = 1 if arch in ("roberta", "xlm-roberta", "camembert") else 0
    g = torch.Generator().manual_seed(seed)
    mask = pad_mask(lengths, T)
    ids = torch.randint(2, VOCAB, (len(lengths), T), generator=g).masked_fill(~mask, pad)
    return ids.to(device), mask.long().to(device)


def outputs(out, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A head's outputs at the real positions (token outputs) or of every row (sequence outputs)."""
    real = mask.bool()
    picked = {}
    for name in ("logits", "start_logits", "end_logits"):
        t = getattr(out, name, None)
        if t is not None:
            picked[name] = t[real] if t.dim() >= 2 and t.shape[1] == real.shape[1] and t.shape[0] == real.shape[0] \
                else t
    return picked


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_outputs_and_gradients_match_transformers(arch, device):
    ref, fused = pair(arch, device)
    enc = HFLayoutEncoder if arch in ("albert", "distilbert") else HFFusedEncoder
    assert sum(isinstance(m, enc) for m in fused.modules()) == 1
    ids, mask = batch(arch, device=device)
    results = []
    for model in (ref, fused):
        out = outputs(model(input_ids=ids, attention_mask=mask), mask)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g).to(device)).sum() for t in out.values())
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_r, grad_r), (out_f, grad_f) = results
    for name in out_r:
        assert rel(out_f[name], out_r[name]) <= 1e-4, name
    assert set(grad_f) == set(grad_r) == {n for n, _ in ref.named_parameters()}
    for name, g in grad_r.items():
        assert rel(grad_f[name], g) <= 1e-3 or (grad_f[name] - g).abs().max() <= 1e-7, f"grad {name}"
    for kernel in ("kernels.attention", "kernels.bias_dropout_add_layernorm"):
        assert launched(kernel), f"no {kernel} kernel ran"


# arch -> expected dropout p per layer: (attention probabilities, after the attention output, after the FFN)
DROPOUT = {"roberta": (0.1, 0.1, 0.1), "albert": (0.1, 0.1, 0.0), "distilbert": (0.1, 0.0, 0.1)}


@pytest.mark.parametrize("arch", list(DROPOUT))
def test_dropout_honoured_per_layout(arch, device, monkeypatch):
    """Each kernel call gets the p of the layout's own dropout at that place (and 0 in eval); in training the output
    changes, and with every p = 0 it equals eval's."""
    ref, fused = pair(arch, device)
    ids, mask = batch(arch, device=device)
    seen: list[tuple[str, float]] = []
    for name, kind in (("fused_attention_varlen_qkvpacked", "attention"), ("bias_dropout_add_layernorm", "ln")):
        original = getattr(fused_mod, name)
        p_index = 3 if kind == "attention" else 5

        def spy(*args, _original=original, _kind=kind, _i=p_index, **kwargs):
            seen.append((_kind, float(args[_i])))
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_mod, name, spy)
    with torch.no_grad():
        evaluated = fused(input_ids=ids, attention_mask=mask).logits
        assert {p for _, p in seen} == {0.0} and len(seen) == 3 * 2
        seen.clear()
        fused.train()
        trained = fused(input_ids=ids, attention_mask=mask).logits
        attn, after_attention, after_ffn = DROPOUT[arch]
        assert seen == [("attention", attn), ("ln", after_attention), ("ln", after_ffn)] * 2
        assert rel(trained, evaluated) > 1e-3
        dropouts = [m for m in fused.modules() if isinstance(m, torch.nn.Dropout)]
        saved = [m.p for m in dropouts]
        try:
            for m in dropouts:
                m.p = 0.0
            torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask).logits, evaluated, rtol=0, atol=0)
        finally:
            for m, p in zip(dropouts, saved, strict=True):
                m.p = p
            fused.eval()


@pytest.mark.parametrize("arch", ["roberta", "albert", "distilbert"])
def test_packed_and_padding_free_equal_padded(arch, device):
    """``packed=`` metadata (a fully padded row too), and a padding-free batch (one row, the sequences back to back,
    as transformers' DataCollatorWithFlattening makes it: cu_seq_lens keywords, or restarting position_ids under a
    flash attention implementation), give the padded call's outputs."""
    _, fused = pair(arch, device)
    base = fused.base_model
    lengths = [11, 4, 0]
    ids, mask = batch(arch, lengths=lengths, device=device)
    real = mask.bool()
    offset = 2 if arch == "roberta" else 0  # RoBERTa's positions start after its padding index
    positions = (torch.arange(T, device=device) + offset).expand(len(lengths), T)
    flat = dict(input_ids=ids[real][None], position_ids=positions[real][None])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    packed = PackedBatch.from_batch(mask.cpu()).to(device)
    with torch.no_grad():
        padded = base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        outs = {"packed=": base(input_ids=ids, attention_mask=mask, position_ids=positions, packed=packed),
                "cu_seq_lens": base(**flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)}
        if arch == "roberta":  # its encoder sees position_ids (DistilBERT's does not: transformers ignores them too)
            eager = base.config._attn_implementation
            base.config._attn_implementation = "flash_attention_2"
            try:
                outs["position_ids"] = base(**flat)
            finally:
                base.config._attn_implementation = eager
    assert torch.isfinite(padded).all()
    for name, out in outs.items():
        got = out.last_hidden_state
        got = got[real] if name == "packed=" else got[0]
        torch.testing.assert_close(got, padded[real], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.no_kernel
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameters_names_sharing_and_save_load_kept(arch, tmp_path):
    """Every parameter object (an optimizer built before still owns them), every name and ALBERT's sharing survive
    optimize(); save_pretrained writes what transformers loads as the original class, same tensors."""
    make, head = ARCHS[arch]
    cls = getattr(transformers, head)
    torch.manual_seed(0)
    ref = cls(make())
    model = copy.deepcopy(ref)
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert optimize(model) is model and optimize(model) is model  # idempotent
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is p for n, p in before.items())
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters(), strict=True))
    if arch == "albert":
        shared = model.albert.encoder
        assert len(shared.albert_layer_groups) == 1 and len(shared.fused_layers()) == 2
        assert shared.fused_layers()[0] is shared.fused_layers()[1]
        view = shared.fused_layers()[0]
        assert view.attention.self.query is shared.albert_layer_groups[0].albert_layers[0].attention.query
        assert view.intermediate.approximate == "tanh"  # ALBERT's gelu_new
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls
    sd, want = loaded.state_dict(), ref.state_dict()
    assert list(sd) == list(want)
    for name, t in want.items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0, msg=name)


def _trainer_run(model, tmp_path, examples) -> tuple[float, dict[str, torch.Tensor]]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(examples), learning_rate=0.1,
        optim="sgd", report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    result = transformers.Trainer(model=model, args=args, train_dataset=examples).train()
    return result.training_loss, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_trainer_step(device, tmp_path):
    """One HF Trainer step (SGD, dropout 0) on the optimize()d model: the loss and weights of transformers' own."""
    require("accelerate")
    cfg = ARCHS["distilbert"][0]()
    cfg.dropout = cfg.attention_dropout = cfg.seq_classif_dropout = 0.0
    torch.manual_seed(0)
    ref = transformers.DistilBertForSequenceClassification(cfg)
    fused = optimize(copy.deepcopy(ref))
    ids, mask = batch("distilbert")
    examples = [dict(input_ids=i, attention_mask=m, labels=torch.tensor(k % 2)) for k, (i, m) in
                enumerate(zip(ids, mask, strict=True))]
    loss_r, weights_r = _trainer_run(ref, tmp_path / "ref", examples)
    loss_f, weights_f = _trainer_run(fused, tmp_path / "fused", examples)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    for name, w in weights_r.items():
        torch.testing.assert_close(weights_f[name], w, rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(fused.distilbert.transformer, HFLayoutEncoder) and launched("kernels.attention")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")
def test_gradient_checkpointing_on_a_layout_encoder(device):
    """gradient_checkpointing_enable() on an optimize()d DistilBERT: each fused layer recomputed in the backward
    pass, same gradients."""
    _, fused = pair("distilbert", device)
    ckpt = copy.deepcopy(fused).train()
    for m in ckpt.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    plain = copy.deepcopy(ckpt)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.distilbert.transformer.gradient_checkpointing
    calls = []
    for view in ckpt.distilbert.transformer.fused_layers():
        view.register_forward_pre_hook(lambda m, a: calls.append(m))
    ids, mask = batch("distilbert", device=device)
    grads = []
    for model in (ckpt, plain):
        model(input_ids=ids, attention_mask=mask).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2 * 2  # each of the 2 layers: once forward, once recomputed
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_torch_compile(device):
    """torch.compile of an optimize()d DistilBERT: its encoder traces whole (packed= path), the model matches eager."""
    _, fused = pair("distilbert", device)
    ids, mask = batch("distilbert", device=device)
    packed = PackedBatch.from_batch(mask.cpu()).to(device)
    enc = fused.distilbert.transformer
    hidden = fused.distilbert.embeddings(ids)
    with torch.no_grad():
        eager = enc(hidden, mask, packed=packed).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
        out = compiled(hidden, mask, packed=packed).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], eager[real], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_inference_makes_no_host_sync_per_layer(arch, device):
    """Under inference_mode and no_grad the encoder synchronises at its entry only (the same calls at any depth), not
    at all with packed= metadata; a caller passing bad cu_seqlens to the kernel directly is still refused."""
    make, _ = ARCHS[arch]
    ids, mask = batch(arch, device=device)
    packed = PackedBatch.from_batch(mask.cpu()).to(device)
    syncs = {}
    for layers, contexts in ((1, (torch.inference_mode,)), (2, (torch.inference_mode, torch.no_grad))):
        cfg = make()
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        base = optimize(transformers.AutoModel.from_config(cfg)).to(device).eval()
        encoder = base.transformer if arch == "distilbert" else base.encoder
        sentinel, original = NoHostSync(), encoder.forward

        def watched(*args, _sentinel=sentinel, _original=original, **kwargs):
            with _sentinel:
                return _original(*args, **kwargs)

        encoder.forward = watched
        for context in contexts:
            with context():
                sentinel.syncs.clear()
                base(input_ids=ids, attention_mask=mask)
                syncs[layers, context.__name__] = list(sentinel.syncs)
                sentinel.syncs.clear()
                base(input_ids=ids, attention_mask=mask, packed=packed)
                assert sentinel.syncs == [], (layers, context.__name__)
    sites = {key: {s.split(" at ")[-1] for s in calls} for key, calls in syncs.items()}
    assert syncs[1, "inference_mode"] == syncs[2, "inference_mode"]  # one layer more, not one sync more
    assert sites[2, "no_grad"] == sites[2, "inference_mode"]
    assert sites[2, "no_grad"] and not any("kernels/attention.py" in s for s in sites[2, "no_grad"]), sites
    with torch.inference_mode(), pytest.raises(ValueError, match="cu_seqlens"):
        q = torch.zeros(5, 2, 16, device=device)
        fused_mod.fused_attention_varlen(q, q, q, torch.tensor([0, 3, 4], dtype=torch.int32, device=device), 3)


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_sentence_transformers_encode(arch, device, tmp_path, monkeypatch):
    """optimize() on a SentenceTransformer (Transformer + mean Pooling over a tiny random model, MiniLM's tokenizer):
    encode() gives the embeddings of the model before, and the encoder runs the batch's real tokens only."""
    st = require("sentence_transformers")
    folder = require("minilm")
    make, _ = ARCHS[arch]
    cfg = make()
    cfg.vocab_size = 30522  # MiniLM's tokenizer
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (tmp_path / name).write_bytes((folder / name).read_bytes())
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # before sentence-transformers 6
        from sentence_transformers.models import Pooling, Transformer
    word = Transformer(str(tmp_path), max_seq_length=32)
    model = st.SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")], device=device)
    texts = ["Fused kernels skip the padding of short sentences entirely.", "Hello world!", "A"]
    before = model.encode(texts, batch_size=3, convert_to_tensor=True)
    tokens: list[int] = []
    original = fused_mod.fused_attention_varlen_qkvpacked

    def spy(qkv, *args, **kwargs):
        tokens.append(qkv.shape[0])
        return original(qkv, *args, **kwargs)

    monkeypatch.setattr(fused_mod, "fused_attention_varlen_qkvpacked", spy)
    assert optimize(model) is model
    after = model.encode(texts, batch_size=3, convert_to_tensor=True)
    assert rel(after, before) <= 1e-4
    real = int(model.tokenize(texts)["attention_mask"].sum())
    assert tokens == [real] * cfg.num_hidden_layers  # every layer on the real tokens only


@pytest.mark.no_kernel
def test_refusals_are_named():
    with pytest.raises(ValueError, match="rotary position embeddings"):
        optimize(transformers.ModernBertModel(transformers.ModernBertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1)))
    decoder = ARCHS["roberta"][0]()
    decoder.is_decoder = True
    with pytest.raises(ValueError, match="decoder RoBERTa"):
        optimize(transformers.RobertaModel(decoder))
    relu = ARCHS["distilbert"][0]()
    relu.activation = "relu"
    with pytest.raises(ValueError, match="DistilBERT's activation='relu' is not a GELU"):
        optimize(transformers.DistilBertModel(relu))
    relative = ARCHS["electra"][0]()
    relative.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        optimize(transformers.ElectraModel(relative))
    wrapped = transformers.DistilBertModel(ARCHS["distilbert"][0]())

    class LoRALinear(torch.nn.Linear):
        pass

    wrapped.transformer.layer[1].attention.q_lin = LoRALinear(64, 64)
    with pytest.raises(ValueError, match="layer.1.attention.q_lin is a LoRALinear"):
        optimize(wrapped)
    with pytest.raises(ValueError, match="neither a fastbert model nor holds a transformers encoder"):
        optimize(torch.nn.Linear(3, 3))


def test_a_module_replaced_after_optimize_is_used(device):
    """The fused layer of a layout encoder reads the layer's modules as they are now, not as optimize() found them."""
    ref, fused = pair("distilbert", device)
    ref, fused = copy.deepcopy(ref), copy.deepcopy(fused)
    for model in (ref, fused):
        new = torch.nn.Linear(64, 64).to(device)
        with torch.no_grad():
            new.weight.copy_(model.distilbert.transformer.layer[0].attention.v_lin.weight * 2)
            new.bias.zero_()
        model.distilbert.transformer.layer[0].attention.v_lin = new
    ids, mask = batch("distilbert", device=device)
    with torch.no_grad():
        out, exp = (outputs(m(input_ids=ids, attention_mask=mask), mask)["logits"] for m in (fused, ref))
    assert rel(out, exp) <= 1e-4
