"""The kernels a user would pick instead of fastbert's, measured in the same run as candidates. Each is optional:
where it cannot run it is listed as skipped with the reason, never silently left out.

    liger               Liger-Kernel (`pip install liger-kernel`, the `bench` extra): its Triton LayerNorm for
                        `bias_dropout_add_layernorm` (bias + dropout + residual in eager PyTorch before it) and for
                        the MLM head's transform, its fused linear cross-entropy for `mlm_cross_entropy` (the
                        direct peer: the decoder GEMM and the loss without materialising the logits). It has no
                        GELU kernel (GEGLU and SwiGLU only), so `linear_bias_gelu` lists it as skipped. CUDA only.
    cublaslt            `torch._addmm_activation(bias, x, wᵀ, use_gelu=True)` for `linear_bias_gelu`: on CUDA the
                        cuBLASLt GEMM with its bias+GELU epilogue — the **tanh** approximation of GELU (fastbert and
                        eager compute the exact erf GELU; the outputs differ by up to ~1e-3 per element). On a CPU
                        the same call is torch's addmm followed by erf GELU (no cuBLASLt): measured, with a note.
    sdpa-flash          SDPA restricted to its flash backend (FlashAttention-2 inside PyTorch) on the same padded
                        batch **without** the key mask: the FA2 anchor, doing the padded work without masking it.
    sdpa-cudnn          SDPA restricted to its cuDNN backend (`SDPBackend.CUDNN_ATTENTION`) on the padded batch
                        **with** the key mask (torch turns the boolean mask into an additive bias for cuDNN) and
                        dropout: the best masked attention with dropout a PyTorch user already has on Hopper.
    sdpa-flash-varlen   the same backend on the packed real tokens (a jagged nested tensor: one long sequence of
                        real tokens with offsets), the semantics of fastbert-varlen.
    flash-attn-varlen   `flash_attn.flash_attn_varlen_func` with dropout on the packed real tokens, where the
                        `flash_attn` package is importable (it is a CUDA build; not on the GPU image here).

Candidate names are stable strings: CSVs from different runs are compared by them.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .timing import BenchEnv, _short_error, interpreter_on

LIGER = "liger"
CUBLASLT = "cublaslt"
SDPA_FLASH = "sdpa-flash"
SDPA_CUDNN = "sdpa-cudnn"
SDPA_FLASH_VARLEN = "sdpa-flash-varlen"
FLASH_ATTN_VARLEN = "flash-attn-varlen"
SENTENCE_TRANSFORMERS = "sentence-transformers"

# The candidates that are somebody else's implementation of the same thing, per family: the "best peer" a
# fastbert candidate is compared with (besides the family's baseline). Transformers is the peer of the whole
# model; `hf-sdpa+optimize` is fastbert's layers inside transformers, not a peer.
PEERS = {
    "attention": (SDPA_FLASH, SDPA_CUDNN, SDPA_FLASH_VARLEN, FLASH_ATTN_VARLEN),
    "kernels": (LIGER, CUBLASLT),
    "train": ("hf-eager", "hf-sdpa", "hf-sdpa-compile"),
    "inference": ("hf-sdpa", "hf-sdpa-compile", SENTENCE_TRANSFORMERS),
}


def is_peer(family: str, name: str) -> bool:
    return name in PEERS.get(family, ())


def _cuda_reason(env: BenchEnv, what: str) -> str:
    if not env.cuda:
        return f"{what}: CUDA tensors only (no CPU path)"
    return ""


def liger(env: BenchEnv) -> tuple[Any, str]:
    """Liger-Kernel's functional module (liger_layer_norm, liger_fused_linear_cross_entropy), or (None, why)."""
    try:
        mod = importlib.import_module("liger_kernel.transformers.functional")
        for name in ("liger_layer_norm", "liger_fused_linear_cross_entropy"):
            getattr(mod, name)
    except Exception as e:
        return None, f"liger-kernel is not importable ({_short_error(e)}; `pip install liger-kernel`)"
    why = _cuda_reason(env, "Liger-Kernel's Triton kernels")
    if not why and interpreter_on():
        why = "TRITON_INTERPRET=1: Liger's kernels would run in Triton's interpreter (timings meaningless)"
    return (None, why) if why else (mod, "")


def cublaslt(env: BenchEnv) -> tuple[Any, str]:
    """`torch._addmm_activation` (private; present since torch 1.13), or (None, why)."""
    fn = getattr(torch, "_addmm_activation", None)
    if fn is None:
        return None, f"torch {torch.__version__} has no torch._addmm_activation"
    return fn, ""


def cublaslt_note(env: BenchEnv) -> str:
    if env.cuda:
        return "cuBLASLt bias+GELU epilogue: tanh-approximate GELU (fastbert and eager: erf)"
    return "CPU: torch's addmm + erf GELU (no cuBLASLt here)"


def sdpa_flash(env: BenchEnv) -> tuple[Any, str]:
    """(sdpa_kernel context factory, backend) for SDPA's flash backend, or (None, why)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return None, f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel ({_short_error(e)})"
    if not env.cuda:
        return None, "SDPA's flash backend with dropout is CUDA only (on a CPU it takes no dropout)"
    return (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)), ""


def sdpa_cudnn(env: BenchEnv) -> tuple[Any, str]:
    """A context factory restricting SDPA to its cuDNN backend, or (None, why)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return None, f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel ({_short_error(e)})"
    backend = getattr(SDPBackend, "CUDNN_ATTENTION", None)
    if backend is None:
        return None, f"torch {torch.__version__} has no SDPBackend.CUDNN_ATTENTION"
    why = _cuda_reason(env, "SDPA's cuDNN backend")
    return (None, why) if why else ((lambda: sdpa_kernel(backend)), "")


def nested_jagged(env: BenchEnv) -> tuple[Any, str]:
    """`torch.nested.nested_tensor_from_jagged` (SDPA on packed tokens), or (None, why)."""
    fn = getattr(getattr(torch, "nested", None), "nested_tensor_from_jagged", None)
    if fn is None:
        return None, f"torch {torch.__version__} has no jagged nested tensors"
    return fn, ""


def flash_attn_varlen(env: BenchEnv) -> tuple[Any, str]:
    """`flash_attn.flash_attn_varlen_func`, or (None, why)."""
    try:
        fn = importlib.import_module("flash_attn").flash_attn_varlen_func
    except Exception as e:
        return None, f"flash_attn is not importable ({_short_error(e)})"
    why = _cuda_reason(env, "flash_attn")
    return (None, why) if why else (fn, "")


def sentence_transformers(env: BenchEnv) -> tuple[Any, str]:
    """The `SentenceTransformer` class, or (None, why) (it needs scipy and scikit-learn at import)."""
    try:
        return importlib.import_module("sentence_transformers").SentenceTransformer, ""
    except Exception as e:
        return None, f"sentence-transformers is not importable ({_short_error(e)})"
