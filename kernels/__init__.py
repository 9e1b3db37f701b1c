"""Triton kernels for BERT's hot paths. One op per module; each has a plain-PyTorch `*_ref` beside it.

This package knows nothing of BERT models: `fastbert` composes these ops into layers. Every public function
runs its Triton kernel for CUDA tensors, through Triton's interpreter for CPU tensors when
``TRITON_INTERPRET=1`` was set before ``triton`` was imported, and its plain-PyTorch reference otherwise.
"""

from .attention import (
    attention_dropout_mask,
    attention_dropout_mask_varlen,
    attention_ref,
    attention_varlen_ref,
    fused_attention,
    fused_attention_varlen,
)
from .bias_dropout_add_layernorm import (
    bias_dropout_add_layernorm,
    bias_dropout_add_layernorm_dropout_mask,
    bias_dropout_add_layernorm_ref,
)
from .linear_bias_gelu import linear_bias_gelu, linear_bias_gelu_ref
from .mlm_cross_entropy import mlm_cross_entropy, mlm_cross_entropy_gathered, mlm_cross_entropy_ref
from .padding import pad_input, unpad_input
from .qkv_projection import qkv_projection, qkv_projection_ref
from .softmax_dropout import scaled_masked_softmax_dropout, scaled_masked_softmax_dropout_ref

__all__ = [
    "attention_dropout_mask",
    "attention_dropout_mask_varlen",
    "attention_ref",
    "attention_varlen_ref",
    "bias_dropout_add_layernorm",
    "bias_dropout_add_layernorm_dropout_mask",
    "bias_dropout_add_layernorm_ref",
    "fused_attention",
    "fused_attention_varlen",
    "linear_bias_gelu",
    "linear_bias_gelu_ref",
    "mlm_cross_entropy",
    "mlm_cross_entropy_gathered",
    "mlm_cross_entropy_ref",
    "pad_input",
    "qkv_projection",
    "qkv_projection_ref",
    "scaled_masked_softmax_dropout",
    "scaled_masked_softmax_dropout_ref",
    "unpad_input",
]
