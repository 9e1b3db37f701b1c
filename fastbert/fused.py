"""Fused drop-in layers: the reference modules of `fastbert.modeling` with Triton kernels in their forward.

Each fused module subclasses its reference module, so it has the same constructor, the same parameters and
the same `state_dict` keys (Hugging Face's names): a checkpoint moves between the two, and to and from
`transformers`, unchanged. Which kernel each one uses:

    FusedSelfAttention        Q, K, V from one GEMM (`qkv_projection_packed`) into one [.., 3, h, d] buffer, then
                              flash-style attention with key padding and dropout (`fused_attention_qkvpacked`,
                              or `fused_attention_varlen_qkvpacked` on unpadded tokens), whose backward writes
                              dq, dk, dv into one buffer the GEMM's backward reads directly; for a head size
                              that kernel does not take (outside 16..128): materialised scores +
                              `scaled_masked_softmax_dropout`
    FusedSelfOutput/Output    dense without bias (cuBLAS), then bias + dropout + residual + LayerNorm in one pass
    FusedIntermediate         dense + bias + GELU in one GEMM (`linear_bias_gelu`)
    FusedStack / FusedEncoder unpads the real tokens once at its entry, runs every layer on [total_tokens, H],
                              re-pads once at its exit (zeros at padded positions); `FusedStack` is the runner,
                              shared with `optimize()`'s transformers encoders (`fastbert.optimize`)
    FusedLMPredictionHead     transform (`linear_bias_gelu` + LayerNorm) and, for the loss, the whole head with
                              its cross-entropy on the labelled positions only (`mlm_cross_entropy`), without
                              materialising the (n, V) logits

Dispatch. A fused module takes its fused path when its config flag is on (`BertConfig.fused_*`, `unpad`) and
`kernels._common.use_triton(x)` holds for the activation: CUDA tensors always, CPU tensors only under
`TRITON_INTERPRET=1` (the test-suite). Otherwise it calls the reference module's own `forward`, so real CPU use
is exactly the reference. The flags are read at every forward from the config the module was built with; with
every flag off, `apply_fusions` leaves a model as the reference. `fusion_report(model)` says which path each
module takes on a device; a fallback where Triton runs (a head size the attention kernel does not support)
warns, once per reason: it is never silent.

Autocast. Autocast does not cast the inputs of custom ops, so the fused modules do it themselves: under
`torch.autocast(device_type, dtype)` for the activation's device type (fp32/fp16/bf16 activations), each fused
call casts its activation and the weights and biases its GEMM needs to autocast's dtype (a plain `.to`, as
autocast does for `nn.Linear`: gradients reach the fp32 master parameters in fp32), while LayerNorm's gamma and
beta and the bias of bias + dropout + residual + LayerNorm stay fp32 (that kernel reads them in any float dtype
and adds in fp32). The encoder's residual stream runs in autocast's dtype: `FusedEncoder` casts its input (the
embeddings' fp32 LayerNorm output) once at entry and returns autocast's dtype, so the reference pooler and heads
after it see what autocast would give them. Every kernel of a call thus computes in one dtype (fp32
accumulation inside). Without autocast nothing is cast: the kernels take the tensors as given, and mismatched
dtypes raise a ValueError, as the reference's Linears raise. `fusion_report` under autocast reports for
autocast's dtype.

Q, K, V parameters. The modules keep Hugging Face's separate `query`, `key`, `value` Linears and concatenate the
weights at forward time for the one fused GEMM. The copy moves ``3·H² + 3H`` elements (7 MB at H = 768 in bf16:
a few µs) against the GEMM's ``6·B·T·H²`` FLOPs (116 GFLOP at B·T = 32768: ~150 µs at an H200's bf16 ceiling) —
by that estimate (not a measurement) about 2% of the projection at training batch sizes, more for small inference
batches; its backward is a free split of the gradient. In exchange the parameters, the optimizer state and every
checkpoint stay identical to the reference's — no state-dict hooks, no two layouts to keep in sync.

Embeddings stay the reference's: BERT applies their dropout after the LayerNorm, while
`bias_dropout_add_layernorm` drops before it, so only the LayerNorm itself would fuse — no saving over
PyTorch's own LayerNorm kernel. (A worthwhile fusion there is gather + sum + LayerNorm + dropout in one kernel,
which kernels/ does not have.)

Unpadding. With `config.unpad`, a padded batch is packed once at the encoder's entry (`kernels.padding`); every
layer then runs on the real tokens only, attention through the variable-length kernel. The output is re-padded
with zeros at padded positions (the reference leaves arbitrary finite values there; compare real positions).

GEMM paths. The QKV projection, the FFN up-projection and the MLM transform each run one of two GEMM
implementations (`kernels.matmul`'s switch: cuBLAS + Triton epilogue by default, the Triton GEMM with the fused
epilogue on request); `fusion_report` names the path each layer takes and why.

Packing metadata (`fastbert.packing.PackedBatch`, ``packed=`` on the models). Given the metadata the CPU data
loader computed, the encoder unpads by gathering the known token indices and the MLM head gathers the known
labelled rows: no ``nonzero``, no ``.item()``, no data-dependent shape, so the fused forward and backward make
no device→host synchronisation (the varlen attention's own check of cu_seqlens is skipped for metadata validated
on the CPU) — the condition for CUDA graphs. Without it, the encoder reads the lengths back once at its entry; no
layer reads cu_seqlens back (the stack made them, `_Packed`), in `torch.inference_mode()` too.

torch.compile. The kernels are `torch.library` custom ops with fake implementations, so
`torch.compile(model, fullgraph=True)` traces them without graph breaks. With ``packed=`` the compiled model runs
the unpadded varlen path and the masked-only MLM loss (the sizes are the metadata tensors' shapes: dynamic
shapes, not one graph per length). Without it, unpadding and the gather of labelled positions have data-dependent
shapes, so under compilation (`torch.compiler.is_compiling()`) the encoder stays on the padded fused path (key
padding mask inside the attention kernel) and the MLM loss runs over every position with ignore_index (same
loss, more rows, and the B·T × V logits).

Caution:
- A fully padded sequence gives zeros from the fused attention (the reference attends uniformly over its
  padding keys): its hidden states, and the pooled output built from them, differ from the reference's.
- Attention masks are key-padding masks: a mask that varies across queries (causal, arbitrary 2-D) is refused.
- With `fused_mlm_loss`, the head returns the loss and the number of correct predictions but no logits
  (`logits` is None): ask for logits with the head's plain `forward`.
- A dropout's p is read from the `nn.Dropout` module at each call and applied when that module is in training mode.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from kernels._common import FLOAT_DTYPES, use_triton
from kernels.attention import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    check_cu_seqlens,
    fused_attention,
    fused_attention_qkvpacked,
    fused_attention_varlen,
    fused_attention_varlen_qkvpacked,
)
from kernels.bias_dropout_add_layernorm import bias_dropout_add_layernorm
from kernels.linear_bias_gelu import linear_bias_gelu
from kernels.matmul import gemm_backend, gemm_backend_reason
from kernels.mlm_cross_entropy import mlm_cross_entropy, mlm_cross_entropy_gathered
from kernels.padding import pad_input, unpad_input, unpad_input_indexed
from kernels.qkv_projection import qkv_projection, qkv_projection_packed
from kernels.softmax_dropout import scaled_masked_softmax_dropout

from . import modeling
from .config import FUSION_FLAGS, BertConfig
from .modeling import (
    IGNORE_INDEX,
    BertAttention,
    BertEncoder,
    BertIntermediate,
    BertLayer,
    BertLMPredictionHead,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfAttention,
    BertSelfOutput,
    extended_mask,
)
from .packing import PackedBatch

__all__ = [
    "FusedAttention",
    "FusedEncoder",
    "FusedIntermediate",
    "FusedLMPredictionHead",
    "FusedLayer",
    "FusedOutput",
    "FusedPredictionHeadTransform",
    "FusedSelfAttention",
    "FusedSelfOutput",
    "FusedStack",
    "apply_fusions",
    "format_fusion_report",
    "fusion_report",
]

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Warn loudly, once per distinct message (a fallback taken every step must not flood the log)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


_GEMM_PATHS = {
    ("qkv", "cublas"): "cuBLAS addmm (bias fused by cuBLASLt) into one [N, 3H] buffer",
    ("qkv", "triton"): "Triton GEMM into one [N, 3H] buffer (TMA + persistent on sm_90)",
    ("bias_gelu", "cublas"): "cuBLAS addmm + Triton GELU epilogue",
    ("bias_gelu", "triton"): "Triton GEMM with bias+GELU epilogue (TMA + persistent on sm_90)",
}


def gemm_path(kind: str) -> str:
    """Which GEMM implementation `kind` ("qkv" / "bias_gelu") takes and why (kernels.matmul's switch)."""
    backend = gemm_backend(kind)
    return f"{_GEMM_PATHS[kind, backend]} ({gemm_backend_reason(kind)})"


def attention_unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the flash-style attention kernel cannot take this head size / dtype, or None when it can."""
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        return f"head_dim {head_dim} outside the attention kernel's [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not supported by the attention kernel"
    return None


class _Packed(NamedTuple):
    """The variable-length layout of an unpadded batch (see `kernels.padding.unpad_input`), its values already
    validated by the stack (made by `unpad_input`, or checked once at its entry): no layer reads them back."""

    cu_seqlens: torch.Tensor  # int32 (B + 1,): start of each sequence in the packed tokens
    max_seqlen: int


def _dropout_p(dropout: nn.Dropout) -> float:
    """The dropout's p when it is in training mode (its own flag, as `dropout(x)` would honour), else 0."""
    return dropout.p if dropout.training else 0.0


def _to_compute_dtype(x: torch.Tensor, *others: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`x` and `others` (weights, biases, a residual; None passes through) in the compute dtype of a call on
    activation `x`: autocast's dtype when autocast is enabled for x's device type and x is a tensor autocast
    casts (fp32/fp16/bf16, not fp64), else all unchanged.

    Autocast does not cast the inputs of custom ops, so the fused modules do it here, as autocast does for
    `nn.Linear`: a plain `.to`, through which autograd returns fp32 gradients to fp32 parameters. Without
    autocast nothing is cast, so mismatched dtypes still raise in the kernels (as the reference's Linears do)."""
    device_type = x.device.type
    if x.dtype not in FLOAT_DTYPES or not torch.is_autocast_enabled(device_type):
        return (x, *others)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None else t.to(dtype) for t in (x, *others))


# ---------------------------------------------------------------------------------------------- attention
class FusedSelfAttention(BertSelfAttention):
    """Self-attention: fused QKV GEMM + flash-style attention with key padding and dropout.

    forward(x (B, T, H), key_mask bool (B, 1, 1, T) or None) as the reference, or
    forward(x (N, H) packed real tokens, None, packed) on the variable-length layout."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config

    # -- which path
    def _attention_kernel_ok(self, q: torch.Tensor) -> bool:
        """True when the flash-style kernel takes these queries; a refusal warns (once per reason)."""
        reason = attention_unsupported(self.head_dim, q.dtype)
        if reason is None:
            return True
        _warn_once(f"fastbert: fused attention falls back to materialised scores + softmax-dropout kernel: {reason}")
        return False

    def can_unpad(self, x: torch.Tensor) -> bool:
        """Whether this layer can run on the packed (variable-length) layout for input like x (in its compute
        dtype)."""
        if not (self.config.fused_attention and use_triton(x)):
            return False
        dtype = _to_compute_dtype(x)[0].dtype
        return attention_unsupported(self.head_dim, dtype) is None

    # -- pieces
    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (..., h, d), in the compute dtype (the Linears of the unfused branch autocast themselves)."""
        if self.config.fused_qkv and use_triton(x):
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
            b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # (3H,)
            return qkv_projection(*_to_compute_dtype(x, w, b), self.num_heads)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)  # (..., h, d)

    def _qkv_packed(self, x: torch.Tensor) -> torch.Tensor:
        """qkv (..., 3, h, d) from the one fused GEMM, in the compute dtype, for the packed attention entry points
        (their backward hands the GEMM one dqkv buffer: no concatenation of dq, dk, dv)."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # (3H,)
        return qkv_projection_packed(*_to_compute_dtype(x, w, b), self.num_heads)

    def _reference_core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The reference's attention math on (B, T, h, d) q, k, v; returns (B, T, h, d)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, T, T)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        return (probs @ v).transpose(1, 2)  # (B, T, h, d)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, packed: _Packed | None = None
    ) -> torch.Tensor:
        triton_ok = use_triton(x)
        if packed is None and not (triton_ok and (self.config.fused_qkv or self.config.fused_attention)):
            return super().forward(x, key_mask)
        p = _dropout_p(self.dropout)
        if self.config.fused_qkv and self.config.fused_attention and self.can_unpad(x):
            qkv = self._qkv_packed(x)  # (B, T, 3, h, d) or (N, 3, h, d)
            if packed is not None:
                ctx = fused_attention_varlen_qkvpacked(
                    qkv, packed.cu_seqlens, packed.max_seqlen, p, validate_cu_seqlens=False
                )  # (N, h, d)
                return ctx.reshape(x.shape)  # (N, H)
            pad = key_mask[:, 0, 0, :] if key_mask is not None else None  # (B, T) True = real token
            return fused_attention_qkvpacked(qkv, key_padding_mask=pad, dropout_p=p).reshape(x.shape)  # (B, T, H)
        q, k, v = self._qkv(x)  # (B, T, h, d) or (N, h, d)
        if packed is not None:
            ctx = fused_attention_varlen(
                q, k, v, packed.cu_seqlens, packed.max_seqlen, p, validate_cu_seqlens=False
            )  # (N, h, d)
            return ctx.reshape(x.shape)  # (N, H)
        B, T, H = x.shape
        if not (self.config.fused_attention and triton_ok):
            ctx = self._reference_core(q, k, v, key_mask)  # (B, T, h, d)
        else:
            pad = key_mask[:, 0, 0, :] if key_mask is not None else None  # (B, T) True = real token
            if self._attention_kernel_ok(q):
                ctx = fused_attention(q, k, v, key_padding_mask=pad, dropout_p=p)  # (B, T, h, d)
            else:
                scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)  # (B, h, T, T)
                probs = scaled_masked_softmax_dropout(scores, pad, 1.0 / math.sqrt(self.head_dim), p)
                ctx = (probs @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, h, d)
        return ctx.reshape(B, T, H)  # (B, T, H)

    def fusion_path(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        if not _triton_on(device):
            return f"reference (no Triton for {device.type} tensors)"
        qkv = f"qkv: one GEMM, {gemm_path('qkv')}" if self.config.fused_qkv else "qkv: 3 Linears"
        if not self.config.fused_attention:
            return f"{qkv}, attention: reference (fused_attention off)"
        reason = attention_unsupported(self.head_dim, dtype)
        if reason is not None:
            return f"{qkv}, attention: FALLBACK materialised scores + softmax-dropout kernel ({reason})"
        return f"{qkv}, attention: fused"


def _dense_dropout_add_layernorm(module: BertSelfOutput, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """LayerNorm(residual + dropout(x·Wᵀ + b)) with bias, dropout, residual and LayerNorm in one kernel.

    Under autocast the GEMM, x and the residual are in the compute dtype; the bias and the LayerNorm's gamma and
    beta stay in their own dtype (the kernel reads them as they are and computes the LayerNorm in fp32)."""
    ln = module.LayerNorm
    x, w, residual = _to_compute_dtype(x, module.dense.weight, residual)
    y = F.linear(x, w)  # (..., H) no bias: the kernel adds it
    return bias_dropout_add_layernorm(
        y, module.dense.bias, residual, ln.weight, ln.bias, _dropout_p(module.dropout), ln.eps
    )


def _bdaln_path(config: BertConfig, device: torch.device) -> str:
    if not _triton_on(device):
        return "reference"
    return "fused" if config.fused_bias_dropout_layernorm else "reference (flag off)"


class FusedSelfOutput(BertSelfOutput):
    """dense (no bias) → fused bias + dropout + residual + LayerNorm."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__(config, in_features)
        self.config = config

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.config.fused_bias_dropout_layernorm and use_triton(x):
            return _dense_dropout_add_layernorm(self, x, residual)
        return super().forward(x, residual)


class FusedOutput(BertOutput):
    """FFN down-projection (no bias) → fused bias + dropout + residual + LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.config.fused_bias_dropout_layernorm and use_triton(x):
            return _dense_dropout_add_layernorm(self, x, residual)
        return super().forward(x, residual)


class FusedIntermediate(BertIntermediate):
    """FFN up-projection with bias and GELU in the GEMM epilogue (`linear_bias_gelu`)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.fused_bias_gelu and use_triton(x):
            return linear_bias_gelu(*_to_compute_dtype(x, self.dense.weight, self.dense.bias), self.approximate)
        return super().forward(x)


class FusedAttention(BertAttention):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.self = FusedSelfAttention(config)
        self.output = FusedSelfOutput(config)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, packed: _Packed | None = None
    ) -> torch.Tensor:
        return self.output(self.self(x, key_mask, packed), x)


class FusedLayer(BertLayer):
    """One encoder layer on padded (B, T, H) input, or on packed (N, H) real tokens with `packed`."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config
        self.attention = FusedAttention(config)
        self.intermediate = FusedIntermediate(config)
        self.output = FusedOutput(config)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, packed: _Packed | None = None
    ) -> torch.Tensor:
        h = self.attention(x, key_mask, packed)
        return self.output(self.intermediate(h), h)

    def fusion_path(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        if not _triton_on(device):
            return f"reference (no Triton for {device.type} tensors)"
        ffn = f"fused, {gemm_path('bias_gelu')}" if self.config.fused_bias_gelu else "reference (flag off)"
        bdaln = _bdaln_path(self.config, device)
        return (
            f"{self.attention.self.fusion_path(device, dtype)}, bias+GELU: {ffn}, "
            f"bias+dropout+add+LayerNorm: {bdaln}"
        )


class FusedStack(nn.Module):
    """A stack of `FusedLayer`s run as one encoder: unpads once at its entry, re-pads once at its exit (see the
    module docstring). The one runner behind fastbert's `FusedEncoder` and `optimize()`'s transformers encoders.

    forward(x (B, T, H), attention_mask (B, T) 1 = real token, or None, packed PackedBatch or None) -> (B, T, H).
    With `packed` (checked by the model against the batch) unpadding gathers its token indices: no host sync.
    Subclasses name the layers: `fused_layers()` in the order they run (one may run more than once: ALBERT shares
    a layer across depth), `named_fused_layers()` each once, for reports."""

    config: BertConfig
    # Activation checkpointing per layer, in training with autograd on (transformers' gradient_checkpointing_enable()
    # sets both attributes on an optimize()d model).
    gradient_checkpointing: bool = False
    _gradient_checkpointing_func: Any = None

    def fused_layers(self) -> list[FusedLayer]:
        raise NotImplementedError

    def named_fused_layers(self) -> list[tuple[str, FusedLayer]]:
        raise NotImplementedError

    def _run_layer(self, layer: nn.Module, *args: Any) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return layer(*args)
        if self._gradient_checkpointing_func is not None:
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)

    def _unpad_possible(self, x: torch.Tensor, layers: list[FusedLayer], packed: PackedBatch | None = None) -> bool:
        return (
            self.config.unpad
            and (packed is not None or not _compiling())
            and all(layer.attention.self.can_unpad(x) for layer in layers)
        )

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packed: PackedBatch | None = None
    ) -> torch.Tensor:
        layers = self.fused_layers()
        if not use_triton(x):  # every layer takes its reference path
            return self._padded(x, layers, extended_mask(attention_mask))
        # Under autocast the residual stream runs in autocast's dtype from entry to exit (module docstring).
        (x,) = _to_compute_dtype(x)
        if packed is not None and attention_mask is not None and self._unpad_possible(x, layers, packed):
            return _to_compute_dtype(self._packed_layers(x, layers, packed))[0]
        return _to_compute_dtype(self._layers(x, layers, attention_mask))[0]

    def forward_unpadded(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Every layer on tokens that come without padding: x (N, H), sequence b is rows cu_seqlens[b] :
        cu_seqlens[b+1] (int32 [B+1]; its values are read once here, outside torch.compile). Returns (N, H)."""
        layers = self.fused_layers()
        if use_triton(x) and not all(layer.attention.self.can_unpad(x) for layer in layers):
            raise ValueError(
                "a padding-free batch needs the fused variable-length attention (fused_attention on, a head size "
                f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], a float dtype): pad the batch instead"
            )
        if not _compiling():
            check_cu_seqlens(cu_seqlens, max_seqlen, x.shape[0])
        (x,) = _to_compute_dtype(x)
        return _to_compute_dtype(self._unpadded(x, layers, _Packed(cu_seqlens, max_seqlen)))[0]

    def _padded(self, x: torch.Tensor, layers: list[FusedLayer], key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in layers:
            x = self._run_layer(layer, x, key_mask)
        return x

    def _unpadded(self, packed_x: torch.Tensor, layers: list[FusedLayer], layout: _Packed) -> torch.Tensor:
        for layer in layers:
            packed_x = self._run_layer(layer, packed_x, None, layout)  # (N, H)
        return packed_x

    def _packed_layers(self, x: torch.Tensor, layers: list[FusedLayer], packed: PackedBatch) -> torch.Tensor:
        """Every layer on the real tokens the metadata names; no host synchronisation for metadata checked on the
        CPU (`PackedBatch.values_checked`), else one read of cu_seqlens here, not one per layer."""
        B, T, _ = x.shape
        packed_x = unpad_input_indexed(x, packed.token_indices)  # (N, H)
        if not packed.values_checked and not _compiling():
            check_cu_seqlens(packed.cu_seqlens, packed.max_seqlen, packed.num_tokens)
        packed_x = self._unpadded(packed_x, layers, _Packed(packed.cu_seqlens, packed.max_seqlen))
        # The metadata's indices were checked against this batch (PackedBatch.check): no value check here.
        return pad_input(packed_x, packed.token_indices, B, T, validate=False)  # (B, T, H), zeros at padding

    def _layers(self, x: torch.Tensor, layers: list[FusedLayer], attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or not self._unpad_possible(x, layers):
            return self._padded(x, layers, extended_mask(attention_mask))  # key mask (B, 1, 1, T) bool, or None
        real = attention_mask.bool()  # (B, T)
        if bool(real.all()):  # no padding: nothing to skip (one host sync, which unpadding needs anyway)
            return self._padded(x, layers, None)
        B, T, _ = x.shape
        packed_x, indices, cu_seqlens, max_seqlen = unpad_input(x, real)  # (N, H)
        # cu_seqlens and indices are unpad_input's own, right by construction: no layer re-reads them.
        packed_x = self._unpadded(packed_x, layers, _Packed(cu_seqlens, max_seqlen))
        return pad_input(packed_x, indices, B, T, validate=False)  # (B, T, H), zeros at padding

    def fusion_path(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        if not _triton_on(device):
            return f"reference (no Triton for {device.type} tensors)"
        probe = torch.empty(0, device=device, dtype=dtype)
        if not self.config.unpad:
            return "padded (unpad off)"
        if not all(layer.attention.self.can_unpad(probe) for layer in self.fused_layers()):
            return "padded (unpadding needs the fused variable-length attention)"
        return (
            "unpadded: real tokens only between entry and exit (without packed= metadata: host syncs at the entry, "
            "and padded under torch.compile)"
        )


class FusedEncoder(FusedStack, BertEncoder):
    """fastbert's encoder stack of `FusedLayer`s (`FusedStack`), with `BertEncoder`'s constructor and names."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config
        self.layer = nn.ModuleList(FusedLayer(config) for _ in range(config.num_hidden_layers))

    def fused_layers(self) -> list[FusedLayer]:
        return list(self.layer)

    def named_fused_layers(self) -> list[tuple[str, FusedLayer]]:
        return [(f"layer.{i}", layer) for i, layer in enumerate(self.layer)]


# ---------------------------------------------------------------------------------------------- MLM head
class FusedPredictionHeadTransform(BertPredictionHeadTransform):
    """dense + bias + GELU in one GEMM, then LayerNorm in one pass."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_triton(x):
            return super().forward(x)
        if self.config.fused_bias_gelu:
            h = linear_bias_gelu(*_to_compute_dtype(x, self.dense.weight, self.dense.bias), self.approximate)
        else:
            h = F.gelu(self.dense(x), approximate=self.approximate)
        ln = self.LayerNorm
        if self.config.fused_bias_dropout_layernorm:
            (h,) = _to_compute_dtype(h)  # gamma and beta stay in their own dtype: the kernel takes them as they are
            return bias_dropout_add_layernorm(h, None, None, ln.weight, ln.bias, 0.0, ln.eps)
        return ln(h)


class FusedLMPredictionHead(BertLMPredictionHead):
    """MLM head: `forward` gives logits (fused transform + decoder GEMM); `fused_mlm_scores` gives the loss of
    the labelled positions through `mlm_cross_entropy` without materialising logits."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config
        self.transform = FusedPredictionHeadTransform(config)

    def fused_mlm_scores(
        self, hidden: torch.Tensor, labels: torch.Tensor, masked_only: bool, packed: PackedBatch | None = None
    ) -> tuple[None, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(logits=None, loss, correct, count) as `modeling.mlm_scores`, or None when the fused loss is off or
        has no kernel for these tensors (the caller then runs the reference scoring).

        hidden (B, T, H), labels (B, T) with -100 where nothing is predicted. Only the labelled rows go through
        the head: gathered at `packed.labelled_positions` (no host sync, compiles) when the metadata is given,
        else found with a nonzero (one host sync; under torch.compile every row goes instead, ignore_index
        skipping the others: static shapes)."""
        if not (self.config.fused_mlm_loss and use_triton(hidden)):
            return None
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but the input has {tuple(hidden.shape[:-1])}")
        t = self.transform
        # The kernel casts the dense and decoder weights to hidden's dtype itself (LayerNorm's stay as they are),
        # so under autocast only the activation is cast here.
        (hidden,) = _to_compute_dtype(hidden)
        count = (labels != IGNORE_INDEX).sum()
        if packed is not None and packed.labelled_positions is not None:
            positions = packed.labelled_positions  # (n,), labels checked on the host (PackedBatch.check)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n, H)
            loss, correct = mlm_cross_entropy_gathered(
                rows, labels.reshape(-1).index_select(0, positions), t.dense.weight, t.dense.bias,
                t.LayerNorm.weight, t.LayerNorm.bias, self.decoder.weight, self.decoder.bias,
                approximate=t.approximate, eps=t.LayerNorm.eps, check_labels=False,
            )  # fmt: skip
            return None, loss, correct, count
        if _compiling():
            return (None, *self._static_shape_scores(hidden, labels), count)
        loss, correct = mlm_cross_entropy(
            hidden, labels, t.dense.weight, t.dense.bias, t.LayerNorm.weight, t.LayerNorm.bias,
            self.decoder.weight, self.decoder.bias,
            approximate=t.approximate, eps=t.LayerNorm.eps, ignore_index=IGNORE_INDEX,
        )
        return None, loss, correct, count

    def _static_shape_scores(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct) over every position with ignore_index, for torch.compile: gathering the labelled
        rows has a data-dependent size, so here the fused transform runs on all B·T rows and the decoder's
        logits are materialised (what the reference head does)."""
        logits = modeling.upcast(self(hidden).flatten(0, -2))  # (B·T, V), at least fp32
        flat_l = labels.reshape(-1)  # (B·T,)
        scored = flat_l != IGNORE_INDEX
        total = F.cross_entropy(logits, flat_l, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / scored.sum().clamp(min=1)  # 0 (not NaN) when nothing is labelled
        correct = ((logits.detach().argmax(-1) == flat_l) & scored).sum()
        return loss, correct

    def fusion_path(self, device: torch.device) -> str:
        if not _triton_on(device):
            return f"reference (no Triton for {device.type} tensors)"
        loss = "fused mlm_cross_entropy on labelled rows" if self.config.fused_mlm_loss else "reference loss"
        gelu = f"fused, {gemm_path('bias_gelu')}" if self.config.fused_bias_gelu else "reference"
        return f"transform bias+GELU: {gelu}, LayerNorm: {_bdaln_path(self.config, device)}, loss: {loss}"


# ---------------------------------------------------------------------------------------------- swapping
_SWAPS: dict[type, type] = {
    BertEncoder: FusedEncoder,
    BertLMPredictionHead: FusedLMPredictionHead,
}


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` (built on the meta device) the very parameter and buffer objects of `old`: weights, ties
    (the MLM decoder is the word embedding) and optimizer references all survive the swap."""
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    persistent = set(old.state_dict(keep_vars=True))
    for name, buf in old.named_buffers():
        if name not in persistent:  # non-persistent buffers (position_ids) are not in the state_dict
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    new.train(old.training)
    return new


def _build_like(cls: type, config: BertConfig, old: nn.Module) -> nn.Module:
    with torch.device("meta"):
        new = cls(config)
    return _adopt(new, old)


def apply_fusions(model: nn.Module, config: BertConfig | None = None) -> nn.Module:
    """Swap the reference embeddings, encoder and MLM head inside a fastbert model for their fused versions,
    in place, keeping every parameter object; returns the model. Idempotent. With every fusion flag off the
    model is left as the reference. `config` defaults to `model.config`."""
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, BertConfig):
        raise ValueError("apply_fusions needs a fastbert model (or a fastbert BertConfig to build with)")
    if not any(getattr(config, flag) for flag in FUSION_FLAGS):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new_cls = _SWAPS.get(type(child))
            if new_cls is not None:
                setattr(parent, name, _build_like(new_cls, config, child))
    return model


# ---------------------------------------------------------------------------------------------- report
def _triton_on(device: torch.device) -> bool:
    return use_triton(torch.empty(0, device=device))


def fusion_report(
    model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Which path each fused module takes for tensors on `device` (default: where the model's parameters are)
    in `dtype` (default: the compute dtype, i.e. autocast's when called under autocast for that device, else the
    parameters' dtype): {qualified module name: description}. Reference modules that were never swapped are
    listed as such."""
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
    if dtype is None:
        probe = torch.empty(0, device=device, dtype=first.dtype if first is not None else torch.float32)
        dtype = _to_compute_dtype(probe)[0].dtype
    report: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLMPredictionHead):
            report[name] = module.fusion_path(device)
        elif type(module).__name__ == "BertEmbeddings":  # fastbert's or transformers'

            report[name] = "reference (by design: see fastbert.fused's docstring)"
        elif isinstance(module, FusedStack):
            report[name] = module.fusion_path(device, dtype)
            for sub, layer in module.named_fused_layers():
                report[f"{name}.{sub}"] = layer.fusion_path(device, dtype)
        elif type(module) in _SWAPS or type(module).__name__ == "BertEncoder":
            report[name] = "reference (not swapped)"
    return report


def format_fusion_report(report: dict[str, Any]) -> str:
    """`fusion_report`'s dictionary as aligned text, one module a line."""
    width = max((len(k) for k in report), default=0)
    return "\n".join(f"{k or '<model>':<{width}}  {v}" for k, v in report.items())
