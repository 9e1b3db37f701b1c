"""fastbert: BERT with Triton fused kernels — reference encoder, fused drop-in layers, HF checkpoints."""

from .config import PRESETS, BertConfig
from .fused import apply_fusions, fusion_report
from .hf_attention import register_when_transformers_loads
from .models import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from .optimize import optimize
from .tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "Tokenizer",
    "apply_fusions",
    "fusion_report",
    "optimize",
]

# attn_implementation="fastbert" in transformers: registered when transformers' modeling_utils loads (not imported here)
register_when_transformers_loads()
