"""fastbert: BERT with Triton fused kernels — reference encoder, fused drop-in layers, HF checkpoints."""

from .config import PRESETS, BertConfig
from .fused import apply_fusions, fusion_report
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
