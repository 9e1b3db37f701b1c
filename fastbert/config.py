"""`BertConfig`: one dataclass for every model size, with named presets and Hugging Face `config.json` I/O.

Field names follow Hugging Face's `BertConfig`, so a `config.json` moves both ways unchanged. The `fused_*`
booleans switch fastbert's Triton fusions one by one; all off gives the plain PyTorch reference encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

# Hugging Face spells the erf GELU "gelu" and the tanh approximation "gelu_new" (also "gelu_pytorch_tanh",
# "gelu_fast"); fastbert maps each onto torch's `approximate` argument.
HIDDEN_ACTS = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}

FUSION_FLAGS = (
    "fused_qkv",
    "fused_attention",
    "fused_bias_gelu",
    "fused_bias_dropout_layernorm",
    "fused_mlm_loss",
    "unpad",
)


@dataclass
class BertConfig:
    vocab_size: int = 30522  # the uncased WordPiece vocabulary of the original BERT (and MiniLM)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # 4 × hidden in every published BERT
    hidden_act: str = "gelu"  # exact erf GELU, as the original BERT; "gelu_new" = tanh approximation
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segment A / segment B
    initializer_range: float = 0.02  # std of the truncated-normal init in the original code
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2  # sequence classification heads; 1 = regression
    classifier_dropout: float | None = None  # None = hidden_dropout_prob, as Hugging Face

    # Fusions (see kernels/). Each is honoured only where a fused path exists for the tensors at hand:
    # CUDA tensors always; CPU tensors only under TRITON_INTERPRET=1 (tests) — otherwise the reference runs.
    fused_qkv: bool = True
    fused_attention: bool = True
    fused_bias_gelu: bool = True
    fused_bias_dropout_layernorm: bool = True
    fused_mlm_loss: bool = True
    unpad: bool = True  # pack real tokens once at the encoder's entry (varlen attention)

    # Hugging Face keys fastbert does not use, kept so that a config.json round-trips unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {sorted(HIDDEN_ACTS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not (0.0 <= p < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if self.classifier_dropout is not None and not (0.0 <= self.classifier_dropout < 1.0):
            raise ValueError(f"classifier_dropout must be in [0, 1) or None, got {self.classifier_dropout!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """torch's `approximate` argument for this config's GELU: "none" (erf) or "tanh"."""
        return HIDDEN_ACTS[self.hidden_act]

    def replace(self, **changes: Any) -> BertConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def with_fusions(self, on: bool) -> BertConfig:
        """A copy with every fusion switched on or off (off = the plain PyTorch reference)."""
        return self.replace(**{flag: on for flag in FUSION_FLAGS})

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """From a Hugging Face `config.json` dictionary (unknown keys are kept in `extra`)."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config.json describes model_type {d.get('model_type')!r}, not 'bert'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {d['position_embedding_type']!r} is not supported (only 'absolute')"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "id2label" in d and "num_labels" not in d:
            kwargs["num_labels"] = len(d["id2label"])
        extra = {k: v for k, v in d.items() if k not in known and k not in FUSION_FLAGS}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dictionary (the fusion switches stay out of it: they are runtime
        choices, not part of the model)."""
        d = {k: v for k, v in self.extra.items() if k not in ("id2label", "label2id")}
        for f in fields(self):
            if f.name in ("extra", "num_labels") or f.name in FUSION_FLAGS:
                continue
            d[f.name] = getattr(self, f.name)
        d["model_type"] = "bert"
        d["position_embedding_type"] = "absolute"
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if "id2label" in self.extra and len(self.extra["id2label"]) == self.num_labels:
            d["id2label"] = self.extra["id2label"]
            d["label2id"] = self.extra.get("label2id", {v: int(k) for k, v in self.extra["id2label"].items()})
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# Sizes follow the published BERT family (Turc et al. 2019 for the small ones). `tiny` is for tests and the
# CPU demo: two layers, small enough to train for a few minutes on two cores.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
