"""fastbert: BERT with Triton fused kernels — reference encoder, fused drop-in layers, HF checkpoints."""

from .config import PRESETS, BertConfig
from .modeling import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
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
]
