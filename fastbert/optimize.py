"""`optimize(model)`: run an existing BERT-family encoder through fastbert's fused layers, in place, keeping weights.

Takes fastbert models (reference or already fused), transformers' BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT and
DistilBERT (the base models and every model holding one: the task heads, DPR, ...) and sentence-transformers models
built on them. Each transformers encoder gets the whole-layer fusions — one QKV GEMM, flash attention with dropout
on the unpadded tokens, bias + dropout + residual + LayerNorm, bias + GELU (tanh where the config says so) — with the
padding removed once at its entry and restored once at its exit (`fastbert.fused.FusedStack`); embeddings, pooler and
heads stay transformers' own. One fused layer serves every layout (`fastbert.hf_layouts`):

    BERT layout (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA): the encoder is replaced by `HFFusedEncoder`, whose fused
        layers take over every parameter under transformers' own names.
    ALBERT, DistilBERT: the encoder is replaced by `HFLayoutEncoder`, which keeps the layout's own modules (names,
        parameters, ALBERT's sharing across depth) and runs each layer through a fused layer whose parts are those
        modules (a view, rebuilt when one of them is replaced).

Modules are swapped explicitly, no class of transformers is patched. Every parameter object is kept (weight ties and
an optimizer built before still hold) and `state_dict` / `save_pretrained` are unchanged (transformers loads the
result as the original class). The outputs are those of the original model within floating-point tolerance, except
at padded positions (zeros; see `fastbert.fused`). The swapped encoders take transformers' calling conventions (5.x)
and return its types, recovering the key padding mask from the one transformers made (`key_padding_from_hf_mask`).

Packing metadata: ``model(input_ids, attention_mask=..., packed=PackedBatch)`` — transformers passes unknown keyword
arguments down to its encoder — runs the encoder on the packed real tokens without a host synchronisation
(`fastbert.packing`); without it the encoder reads the lengths back once at its entry (none per layer, in
`torch.inference_mode()` too). transformers' code around the encoder (its mask preparation) may synchronise.
Padding-free batches — one row holding the sequences back to back, as transformers' `DataCollatorWithFlattening` and
sentence-transformers (under flash attention) make them — run every layer on those tokens: the `cu_seq_lens_q/k`,
`max_length_q/k` keywords, or `position_ids` that restart where the model's attention implementation reads them
(flash attention, "fastbert"), as transformers' own attention would separate them.

Caution: decoders, cross-attention, KV caches, non-GELU activations and non-absolute positions are refused, named;
`output_hidden_states` / `output_attentions` — keywords or config — raise a ValueError (the fused encoder has no
per-layer outputs; transformers would return empty tuples silently); forward hooks on ALBERT's and DistilBERT's layer
modules do not fire (their weights run inside the fused layer). `gradient_checkpointing_enable()` works where
transformers allows it: each fused layer is recomputed in the backward pass.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .config import FUSION_FLAGS, BertConfig
from .fused import FusedEncoder, FusedLayer, FusedStack, _build_like, _compiling, apply_fusions
from .hf_layouts import Layout, find_layout, unsupported_reason
from .modeling import BertPreTrainedModel
from .packing import PackedBatch, _values_readable

__all__ = ["HFFusedEncoder", "HFLayoutEncoder", "key_padding_from_hf_mask", "optimize"]


def key_padding_from_hf_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, check: bool = True
) -> torch.Tensor | None:
    """The bool key padding mask [B, T] (True = real token) behind the mask transformers hands its encoder.

    Accepts None, [B, T] (1/True = real token), or an expanded [B, 1 or h, Tq, T] / [B, Tq, T] mask: bool
    (True = attend) or additive float (0 = attend, very negative = masked; entries < -1 count as masked, the
    kernels' convention). An expanded mask must be the same for every query (a padding mask); a mask that is
    not (causal, arbitrary) raises a ValueError — checked outside torch.compile and with `check` only (on a
    device the check synchronises)."""
    m = attention_mask
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor or None, got {type(m).__name__}")
    if m.dim() == 2:
        if tuple(m.shape) != (B, T):
            raise ValueError(f"2-D attention_mask must be [B, T] = {[B, T]}, got {list(m.shape)}")
        return m.bool() if not m.is_floating_point() else m != 0
    if m.dim() == 3:
        m = m[:, None]  # (B, 1, Tq, T)
    if m.dim() != 4 or m.shape[0] not in (1, B) or m.shape[-1] != T:
        raise ValueError(f"attention_mask must be [B, T], [B, Tq, T] or [B, h, Tq, T] with T={T}, got {list(m.shape)}")
    allowed = m if m.dtype == torch.bool else m > -1.0  # (B, h, Tq, T) True = attend
    key = allowed[:, 0, 0, :].expand(B, T)  # (B, T)
    if check and not _compiling() and not bool((allowed == key[:, None, None, :]).all()):
        raise ValueError(
            "attention_mask varies across queries (causal or arbitrary mask): the fused encoder supports "
            "key padding masks only"
        )
    return key


def _padding_free(
    encoder: FusedStack, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32 [n+1], max_seqlen) of a padding-free batch — one row holding n sequences back to back, as
    transformers' `DataCollatorWithFlattening` makes it — or None for an ordinary batch. The sequences are the ones
    transformers' attention would see: the `cu_seq_lens_q/k`, `max_length_q/k` keywords, or, for a model whose
    attention implementation reads them (flash attention, fastbert's backend), `position_ids` that restart."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None and cu_k is None:
        positions = kwargs.get("position_ids")
        impl = str(getattr(encoder.hf_config, "_attn_implementation", None))
        if positions is None or attention_mask is not None or hidden_states.shape[0] != 1 or positions.shape[-1] < 2 \
                or not ("flash" in impl or impl == "fastbert"):
            return None
        if _compiling():
            raise ValueError("under torch.compile a padding-free batch needs the cu_seq_lens_q/k and max_length_q/k "
                             "keywords (reading position_ids would break the graph)")
        if not bool((positions[..., 1:] < positions[..., :-1]).any()):  # one increasing run: a single sequence
            return None
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(positions)
    if cu_q is None or cu_k is None or max_q is None:
        raise ValueError("a padding-free batch needs cu_seq_lens_q, cu_seq_lens_k and max_length_q together")
    if hidden_states.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"a padding-free batch (cu_seq_lens_q/k) is one row without attention_mask, got "
                         f"{hidden_states.shape[0]} rows{' and a mask' if attention_mask is not None else ''}")
    differ = cu_q is not cu_k and (cu_q.shape != cu_k.shape or not (_compiling() or torch.equal(cu_q, cu_k)))
    if differ or (max_k is not None and int(max_k) != int(max_q)):
        raise ValueError("cu_seq_lens_k / max_length_k differ from the queries': the fused encoder does "
                         "self-attention only")
    return cu_q.to(torch.int32), int(max_q)


def _encode(
    encoder: FusedStack, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The fused stack on transformers' encoder inputs: refuses the per-layer outputs it cannot give, takes
    fastbert's ``packed=`` metadata from the keyword arguments transformers passes down, recovers the key padding."""
    for flag in ("output_hidden_states", "output_attentions"):
        # The keyword wins over the config, as in transformers' output capture.
        requested = kwargs[flag] if kwargs.get(flag) is not None else getattr(encoder.hf_config, flag, False)
        if requested:
            raise ValueError(
                f"{flag}: the fused encoder does not expose per-layer outputs (transformers would silently "
                f"return none); call the model without it (and with config.{flag}=False), or use the model "
                "before optimize()"
            )
    packed = kwargs.get("packed")
    if packed is not None and not isinstance(packed, PackedBatch):
        raise ValueError(f"packed must be a fastbert.packing.PackedBatch or None, got {type(packed).__name__}")
    varlen = _padding_free(encoder, hidden_states, attention_mask, kwargs)
    if varlen is not None:
        if packed is not None:
            raise ValueError("packed= describes a padded batch; this one is padding-free (cu_seq_lens / position_ids)")
        return encoder.forward_unpadded(hidden_states[0], *varlen)[None]  # (1, N, H)
    B, T, _ = hidden_states.shape
    readable = _values_readable(hidden_states)
    key_padding = key_padding_from_hf_mask(attention_mask, B, T, check=packed is None or readable)  # (B, T)
    if packed is not None and key_padding is not None:
        packed.check(hidden_states[..., 0], key_padding)  # values compared on CPU tensors only
    return FusedStack.forward(encoder, hidden_states, key_padding, packed)  # (B, T, H)


class HFFusedEncoder(FusedEncoder):
    """`FusedEncoder` with the calling convention and return type of transformers' BERT-layout encoders (5.x):
    `BertEncoder`, `RobertaEncoder`, `XLMRobertaEncoder`, `CamembertEncoder`, `ElectraEncoder`."""

    hf_config: Any = None  # the transformers config of the model holding this encoder (set by optimize)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("the fused encoder has no cross-attention (encoder_hidden_states must be None)")
        if cache is not None or kwargs.get("past_key_values") is not None or use_cache:  # `cache` since 5.24
            raise ValueError("the fused encoder has no KV cache (cache must be None, use_cache False)")
        out = _encode(self, hidden_states, attention_mask, kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


class HFLayoutEncoder(FusedStack):
    """A transformers encoder whose layers are named otherwise than BERT's (ALBERT's, DistilBERT's), run through
    fastbert's fused layer: it keeps the encoder's own child modules (so names, parameters, `state_dict` and ALBERT's
    sharing are unchanged) and runs each layer as a `FusedLayer` view whose parts are the layer's own modules
    (`Layout.roles`). forward(hidden_states (B, T, E or H), attention_mask=None, **kwargs) -> BaseModelOutput, as
    transformers' `AlbertTransformer` and DistilBERT's `Transformer`."""

    def __init__(self, config: BertConfig, encoder: nn.Module, layout: Layout, hf_config: Any):
        super().__init__()
        self.config = config
        self.hf_config = hf_config  # read at every call: output_* flags set after optimize() count
        self.layout_name, self.roles, self.input_projection = layout.name, layout.roles, layout.input_projection
        self.schedule = layout.schedule(hf_config)  # the layer modules' names, in the order they run
        for name, child in encoder.named_children():
            self.add_module(name, child)
        self.training = encoder.training
        self.gradient_checkpointing = bool(getattr(encoder, "gradient_checkpointing", False))
        self._views: dict[str, FusedLayer] = {}
        self._sources: list[tuple[nn.Module, str, nn.Module]] = []
        self._build_views()

    # -- the views
    def _build_views(self) -> None:
        """One FusedLayer per distinct layer module, its parts the layer's own modules (a plain attribute: the
        views are not submodules, their modules are registered here once, under the layout's names)."""
        views: dict[str, FusedLayer] = {}
        sources: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        for layer_name in dict.fromkeys(self.schedule):
            with torch.device("meta"):
                view = FusedLayer(self.config)
            for part, path in self.roles.items():
                owner, _, leaf = part.rpartition(".")
                expected = type(view.get_submodule(part))
                if path is None:
                    module: nn.Module = nn.Dropout(0.0)
                else:
                    module = self._walk(f"{layer_name}.{path}", sources)
                    if type(module) is not expected:
                        raise ValueError(
                            f"optimize: {layer_name}.{path} is a {type(module).__name__}, not the "
                            f"{expected.__module__}.{expected.__name__} the fused layer reads (a wrapped or replaced "
                            "module): call optimize() on the model as transformers built it"
                        )
                setattr(view.get_submodule(owner), leaf, module)
            left = [n for n, t in (*view.named_parameters(), *view.named_buffers()) if t.is_meta]
            assert not left, f"fused layer parts without a module of the layout: {left}"
            views[layer_name] = view
        self._views, self._sources = views, list(sources.values())

    def _walk(self, path: str, sources: dict) -> nn.Module:
        """The submodule at `path`, recording every (parent, name, child) step on the way."""
        module: nn.Module = self
        for name in path.split("."):
            child = module._modules.get(name)
            if child is None:
                raise ValueError(f"optimize: the {self.layout_name} encoder has no module {path!r}")
            sources[id(module), name] = (module, name, child)
            module = child
        return module

    def fused_layers(self) -> list[FusedLayer]:
        # A module replaced since the views were built (by its owner or higher up) is taken as it is now.
        if any(parent._modules.get(name) is not child for parent, name, child in self._sources):
            self._build_views()
        return [self._views[name] for name in self.schedule]

    def named_fused_layers(self) -> list[tuple[str, FusedLayer]]:
        self.fused_layers()
        return list(self._views.items())

    # -- transformers' calling convention
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):  # type: ignore[override]
        from transformers.modeling_outputs import BaseModelOutput

        if self.input_projection is not None:
            hidden_states = self.get_submodule(self.input_projection)(hidden_states)  # (B, T, H)
        return BaseModelOutput(last_hidden_state=_encode(self, hidden_states, attention_mask, kwargs))


def _swap_encoder(base: nn.Module, layout: Layout, flags: dict[str, bool]) -> None:
    """Replace `base`'s encoder (a transformers base model of `layout`) by its fused adapter; idempotent."""
    old = getattr(base, layout.encoder_attr)
    if isinstance(old, (HFFusedEncoder, HFLayoutEncoder)):
        return
    encoder_cls = layout.classes()[1]
    if not isinstance(old, encoder_cls):
        raise ValueError(f"optimize: {type(base).__name__}.{layout.encoder_attr} is a {type(old).__name__}, not "
                         f"transformers' {layout.encoder}")
    config = BertConfig(**layout.fields(base.config), **flags)
    checkpointing = getattr(old, "gradient_checkpointing", False)
    if layout.roles is None:  # BERT's names: fastbert's fused encoder takes the parameters over
        new = _build_like(HFFusedEncoder, config, old)
        new.hf_config = base.config  # read at every call: output_* flags set after optimize() count
        new.gradient_checkpointing = bool(checkpointing)
    else:
        new = HFLayoutEncoder(config, old, layout, base.config)
    setattr(base, layout.encoder_attr, new)


def _fusion_flags(overrides: dict[str, bool]) -> dict[str, bool]:
    unknown = set(overrides) - set(FUSION_FLAGS)
    if unknown:
        raise ValueError(f"unknown fusion flags {sorted(unknown)}; choose from {list(FUSION_FLAGS)}")
    for name, value in overrides.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    return {flag: overrides.get(flag, True) for flag in FUSION_FLAGS}


def optimize(model: nn.Module, **fusions: bool) -> nn.Module:
    """Swap fused layers into `model` in place and return it.

    `fusions`: the `BertConfig` fusion flags (`fused_qkv`, `fused_attention`, `fused_bias_gelu`,
    `fused_bias_dropout_layernorm`, `fused_mlm_loss`, `unpad`); each defaults to True. A fastbert model gets a
    copy of its config with those flags (set on every fastbert model inside it) and fused embeddings, encoder and
    MLM head; any other module (a transformers model, a sentence-transformers model, a module of yours) gets a
    fused encoder in each transformers base model of the BERT family it holds (module docstring)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize takes a torch.nn.Module, got {type(model).__name__}")
    flags = _fusion_flags(fusions)
    if isinstance(model, BertPreTrainedModel):
        config = model.config.replace(**flags)
        for sub in model.modules():
            if isinstance(sub, BertPreTrainedModel):
                sub.config = config
        return apply_fusions(model, config)
    found = []
    if "transformers" in sys.modules:  # a transformers model means it is loaded
        found = [(m, layout) for m in model.modules() if (layout := find_layout(m)) is not None]
    if not found:
        raise ValueError(unsupported_reason(model))
    for base, layout in found:
        _swap_encoder(base, layout, flags)
    return model
