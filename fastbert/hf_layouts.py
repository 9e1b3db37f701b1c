"""The encoders of transformers' BERT family as `optimize()` reads them: the base model class, where its encoder sits,
which of a layer's modules plays which part of fastbert's fused layer, and the config fields the fused layer needs.

    layout      base model (transformers)      encoder         a layer's modules (what the fused layer calls them)
    BERT        BertModel                      .encoder        BERT's own names: fastbert's fused encoder is swapped
    RoBERTa     RobertaModel                   .encoder        in, taking over every parameter under the same name
    XLM-R       XLMRobertaModel                .encoder        (embeddings: padding index 1, positions offset by it —
    CamemBERT   CamembertModel                 .encoder        they stay transformers')
    ELECTRA     ElectraModel                   .encoder        (its embeddings projection stays transformers')
    ALBERT      AlbertModel                    .encoder        attention.{query,key,value,dense,LayerNorm}, ffn,
                                                               ffn_output, full_layer_layer_norm; one layer per group
                                                               shared across depth
    DistilBERT  DistilBertModel                .transformer    attention.{q,k,v,out}_lin, sa_layer_norm, ffn.lin1/lin2,
                                                               output_layer_norm

`ROLES` maps the fused layer's modules (`fastbert.fused.FusedLayer`, BERT's names) to the layout's, for the layouts
whose names differ: `optimize()` runs those layers through the shared fused layer with the layout's own modules in
those places (`fastbert.optimize.HFLayoutEncoder`). Where a layout applies no dropout (ALBERT after its FFN,
DistilBERT after its attention output), the role is None (p = 0).

Caution: only the config fields the fused layer can honour are read, and anything else is refused by name: the
activation must be a GELU (erf or tanh), positions absolute, no decoder or cross-attention. Other encoders
(ModernBERT: rotary positions, GeGLU, pre-LayerNorm, local sliding-window layers) are refused with their reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import HIDDEN_ACTS

__all__ = ["LAYOUTS", "Layout", "find_layout", "unsupported_reason"]

_BERT_ROLES = None  # BERT's names: nothing to map


@dataclass(frozen=True)
class Layout:
    name: str  # as users know it: "RoBERTa"
    module: str  # the transformers module of the base model
    model: str  # the base model's class name
    encoder_attr: str  # where the base model keeps its encoder
    encoder: str  # the encoder's class name (a base model with another encoder is refused)
    fields: Callable[[Any], dict[str, Any]]  # the fastbert BertConfig fields of the encoder
    roles: dict[str, str | None] | None = _BERT_ROLES  # FusedLayer module → the layer's (None: no dropout there)
    input_projection: str | None = None  # a Linear the encoder applies before its first layer (ALBERT)
    schedule: Callable[[Any], list[str]] | None = None  # the layers' module names, in the order they run

    def classes(self) -> tuple[type, type] | None:
        """(base model class, encoder class), or None when transformers has not loaded that module (no such
        model can exist then)."""
        mod = sys.modules.get(self.module)
        return None if mod is None else (getattr(mod, self.model), getattr(mod, self.encoder))


def _activation(layout: str, field: str, value: object) -> str:
    if not isinstance(value, str) or value not in HIDDEN_ACTS:
        raise ValueError(
            f"optimize: {layout}'s {field}={value!r} is not a GELU the fused bias+GELU kernel computes "
            f"({', '.join(sorted(HIDDEN_ACTS))})"
        )
    return value


def _encoder_only(layout: str, c: Any) -> None:
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ValueError(f"optimize: decoder {layout} models (is_decoder / add_cross_attention) are not supported")
    position = getattr(c, "position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"optimize: {layout}'s position_embedding_type={position!r} is not supported (only "
                         "'absolute')")


def _bert_fields(layout: str) -> Callable[[Any], dict[str, Any]]:
    def fields(c: Any) -> dict[str, Any]:
        _encoder_only(layout, c)
        return dict(
            hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size, hidden_act=_activation(layout, "hidden_act", c.hidden_act),
            hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
            layer_norm_eps=c.layer_norm_eps,
        )  # fmt: skip

    return fields


def _distilbert_fields(c: Any) -> dict[str, Any]:
    _encoder_only("DistilBERT", c)
    return dict(
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.hidden_dim,
        hidden_act=_activation("DistilBERT", "activation", c.activation), hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout,
    )  # fmt: skip  (its LayerNorms' eps, 1e-12, is read from the modules themselves)


def _albert_schedule(c: Any) -> list[str]:
    """transformers' AlbertTransformer order: layer i runs group int(i / (L / groups)), each group its inner layers."""
    L, groups = c.num_hidden_layers, c.num_hidden_groups
    return [f"albert_layer_groups.{int(i / (L / groups))}.albert_layers.{j}" for i in range(L)
            for j in range(c.inner_group_num)]


def _distilbert_schedule(c: Any) -> list[str]:
    return [f"layer.{i}" for i in range(c.n_layers)]


_ALBERT_ROLES = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.self.dropout": "attention.attention_dropout",
    "attention.output.dense": "attention.dense",
    "attention.output.dropout": "attention.output_dropout",
    "attention.output.LayerNorm": "attention.LayerNorm",
    "intermediate.dense": "ffn",
    "output.dense": "ffn_output",
    "output.dropout": None,  # AlbertLayer applies no dropout to its FFN output
    "output.LayerNorm": "full_layer_layer_norm",
}
_DISTILBERT_ROLES = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.self.dropout": "attention.dropout",
    "attention.output.dense": "attention.out_lin",
    "attention.output.dropout": None,  # DistilBERT applies no dropout to its attention output
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.dropout": "ffn.dropout",
    "output.LayerNorm": "output_layer_norm",
}

_T = "transformers.models"
LAYOUTS = (
    Layout("BERT", f"{_T}.bert.modeling_bert", "BertModel", "encoder", "BertEncoder", _bert_fields("BERT")),
    Layout("RoBERTa", f"{_T}.roberta.modeling_roberta", "RobertaModel", "encoder", "RobertaEncoder",
           _bert_fields("RoBERTa")),
    Layout("XLM-R", f"{_T}.xlm_roberta.modeling_xlm_roberta", "XLMRobertaModel", "encoder", "XLMRobertaEncoder",
           _bert_fields("XLM-R")),
    Layout("CamemBERT", f"{_T}.camembert.modeling_camembert", "CamembertModel", "encoder", "CamembertEncoder",
           _bert_fields("CamemBERT")),
    Layout("ELECTRA", f"{_T}.electra.modeling_electra", "ElectraModel", "encoder", "ElectraEncoder",
           _bert_fields("ELECTRA")),
    Layout("ALBERT", f"{_T}.albert.modeling_albert", "AlbertModel", "encoder", "AlbertTransformer",
           _bert_fields("ALBERT"), _ALBERT_ROLES, "embedding_hidden_mapping_in", _albert_schedule),
    Layout("DistilBERT", f"{_T}.distilbert.modeling_distilbert", "DistilBertModel", "transformer", "Transformer",
           _distilbert_fields, _DISTILBERT_ROLES, None, _distilbert_schedule),
)

# Encoders of transformers that optimize() refuses, by model_type, with what the fused layer lacks.
_UNSUPPORTED = {
    "modernbert": "rotary position embeddings, GeGLU, pre-LayerNorm layers and local sliding-window attention "
                  "(128 tokens): the fused layer has none of them",
    "xlm-roberta-xl": "pre-LayerNorm layers: the fused layer is post-LayerNorm",
    "roberta-prelayernorm": "pre-LayerNorm layers: the fused layer is post-LayerNorm",
    "deberta": "disentangled relative-position attention", "deberta-v2": "disentangled relative-position attention",
}  # fmt: skip


def find_layout(module: nn.Module) -> Layout | None:
    """The layout of `module` when it is one of the base models above (or a subclass), else None."""
    for layout in LAYOUTS:
        classes = layout.classes()
        if classes is not None and isinstance(module, classes[0]):
            return layout
    return None


def unsupported_reason(model: nn.Module) -> str:
    """Why optimize() takes none of `model`'s modules: the first transformers model type inside it, named."""
    supported = ", ".join(layout.name for layout in LAYOUTS)
    for m in model.modules():
        model_type = getattr(getattr(m, "config", None), "model_type", None)
        if isinstance(model_type, str) and model_type:
            why = _UNSUPPORTED.get(model_type, f"not one of the encoders it fuses ({supported})")
            return f"optimize: {type(m).__name__} (model_type {model_type!r}) is not supported: {why}"
    return (f"optimize: {type(model).__name__} is neither a fastbert model nor holds a transformers encoder of the "
            f"BERT family ({supported})")
