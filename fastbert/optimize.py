"""`optimize(model)`: swap fastbert's fused layers into an existing BERT, in place, keeping its weights.

Works on fastbert models (reference or already fused) and on Hugging Face `transformers` BERTs (`BertModel`,
`BertForPreTraining`, `BertForMaskedLM`, `BertForSequenceClassification`, `BertForQuestionAnswering`, and any
other model holding a `transformers` `BertModel`). Modules are replaced explicitly by walking
`named_children()`; no class of `transformers` is patched. Every parameter object is kept (so weight ties and an
optimizer built before the swap still hold), and the outputs stay those of the original model within
floating-point tolerance (see `fastbert.fused` for the one exception: fully padded sequences).

For `transformers` models only `bert.encoder` is swapped, for a `FusedEncoder` that accepts the encoder's
calling convention in transformers 5.x — ``encoder(hidden_states, attention_mask=..., encoder_hidden_states=...,
encoder_attention_mask=..., cache=..., use_cache=..., **kwargs)`` returning a
`BaseModelOutputWithPastAndCrossAttentions` — and recovers the key padding mask from the already-expanded mask
transformers passes (None, bool ``[B, 1, T, T]`` for SDPA, additive float ``[B, 1, T, T]`` for eager, or the 2-D
``[B, T]`` mask of the flash-attention path). Embeddings, pooler and heads stay transformers' own.

Packing metadata (transformers models too): ``model(input_ids, attention_mask=..., packed=PackedBatch)`` — transformers
passes unknown keyword arguments down to its encoder — runs the swapped encoder on the packed real tokens without a
host synchronisation (`fastbert.packing`); the key padding mask is then not re-derived from the expanded mask on a
device (that check reads values back), and on CPU tensors the metadata is checked against it. transformers' own
code around the encoder (its mask preparation) may still synchronise; the MLM head stays transformers' (all rows).

Caution (transformers models): decoders, cross-attention, KV caches and relative position embeddings are
refused; `output_hidden_states` / `output_attentions` — as keywords or set in the model's config — raise a
ValueError (the swapped encoder has no per-layer outputs to give; transformers would otherwise return empty
tuples silently). `gradient_checkpointing_enable()` works: the fused encoder then recomputes each layer in the
backward pass (`torch.utils.checkpoint`, with transformers' checkpoint function and its kwargs).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .config import FUSION_FLAGS, BertConfig
from .fused import FusedEncoder, _build_like, _compiling, apply_fusions
from .modeling import BertPreTrainedModel
from .packing import PackedBatch, _values_readable

__all__ = ["HFFusedEncoder", "key_padding_from_hf_mask", "optimize"]


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


class HFFusedEncoder(FusedEncoder):
    """`FusedEncoder` with the calling convention and return type of transformers' `BertEncoder` (5.x)."""

    hf_config: Any = None  # the transformers config of the BertModel holding this encoder (set by optimize)

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
        if cache is not None or use_cache:
            raise ValueError("the fused encoder has no KV cache (cache must be None, use_cache False)")
        for flag in ("output_hidden_states", "output_attentions"):
            # The keyword wins over the config, as in transformers' output capture.
            requested = kwargs[flag] if kwargs.get(flag) is not None else getattr(self.hf_config, flag, False)
            if requested:
                raise ValueError(
                    f"{flag}: the fused encoder does not expose per-layer outputs (transformers would silently "
                    f"return none); call the model without it (and with config.{flag}=False), or use the model "
                    "before optimize()"
                )
        packed = kwargs.get("packed")
        if packed is not None and not isinstance(packed, PackedBatch):
            raise ValueError(f"packed must be a fastbert.packing.PackedBatch or None, got {type(packed).__name__}")
        B, T, _ = hidden_states.shape
        readable = _values_readable(hidden_states)
        key_padding = key_padding_from_hf_mask(attention_mask, B, T, check=packed is None or readable)  # (B, T)
        if packed is not None and key_padding is not None:
            packed.check(hidden_states[..., 0], key_padding)  # values compared on CPU tensors only
        out = super().forward(hidden_states, key_padding, packed)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _hf_bert_model_class() -> type | None:
    """transformers' BertModel, if transformers is loaded (a transformers model means it is)."""
    if "transformers" not in sys.modules:
        return None
    from transformers.models.bert.modeling_bert import BertModel as HFBertModel

    return HFBertModel


def _config_from_hf(hf_config: Any, flags: dict[str, bool]) -> BertConfig:
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError("optimize: decoder BERTs (is_decoder / add_cross_attention) are not supported")
    d = hf_config.to_dict()
    if d.get("pad_token_id") is None:  # transformers allows None; the embeddings use no padding_idx then
        d["pad_token_id"] = 0
    if not isinstance(d.get("hidden_act"), str):
        raise ValueError(f"optimize: hidden_act must be a named activation, got {d.get('hidden_act')!r}")
    return BertConfig.from_dict(d).replace(**flags)


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
    MLM head; a transformers model gets a fused encoder in each of its `BertModel`s."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize takes a torch.nn.Module, got {type(model).__name__}")
    flags = _fusion_flags(fusions)
    if isinstance(model, BertPreTrainedModel):
        config = model.config.replace(**flags)
        for sub in model.modules():
            if isinstance(sub, BertPreTrainedModel):
                sub.config = config
        return apply_fusions(model, config)

    hf_bert = _hf_bert_model_class()
    found = [m for m in model.modules() if hf_bert is not None and isinstance(m, hf_bert)]
    if not found:
        raise ValueError(
            f"optimize: {type(model).__name__} is neither a fastbert model nor holds a transformers BertModel"
        )
    for bert in found:
        if isinstance(bert.encoder, HFFusedEncoder):
            continue
        config = _config_from_hf(bert.config, flags)
        checkpointing = getattr(bert.encoder, "gradient_checkpointing", False)
        bert.encoder = _build_like(HFFusedEncoder, config, bert.encoder)
        bert.encoder.hf_config = bert.config  # read at every call: output_* flags set after optimize() count
        bert.encoder.gradient_checkpointing = bool(checkpointing)
    return model
