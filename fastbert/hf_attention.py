"""`attn_implementation="fastbert"`: fastbert's fused attention kernel as a transformers attention backend.

transformers 5.x sends the self-attention of BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT and DistilBERT (and of
any model written the same way) through `AttentionInterface`, with the mask made by the function registered under the
same name in `AttentionMaskInterface`. Both are registered here under "fastbert":
- `fastbert_attention_mask`, called once per forward by the model's mask preparation: it hands on the key padding
  mask as the kernel takes it, bool [B, T] (True = real token), or None — never a [B, 1, T, T] tensor.
- `fastbert_attention`, called by every attention layer with q, k, v [B, h, T, d]: `kernels.attention`'s
  `fused_attention` on [B, T, h, d] views of them (the projections' own memory: no copy), the `dropout` p
  transformers passes (0 in eval) as the kernel's Philox dropout with a seed drawn from torch's generator
  (`torch.manual_seed` repeats a run), `scaling` as the softmax scale. Returns [B, T, h, d] and no weights.
Only the attention core is fused this way: the QKV projection, the output projection, LayerNorms and the FFN stay
transformers' own (`fastbert.optimize` fuses whole layers).

Padding-free batches run `fused_attention_varlen` on the packed tokens, with no padding anywhere:
- the `cu_seq_lens_q` / `cu_seq_lens_k` (int32 [N+1]) and `max_length_q` / `max_length_k` keywords, as
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes them (q and k boundaries must be equal);
- or, for a one-row batch without attention mask, `position_ids` [1, T] that restart within the row: a sequence
  begins wherever a position is not its predecessor + 1 (RoBERTa-like models count from padding_idx + 1, so the
  collator needs `position_ids_start=padding_idx + 1` there, as it says).

Registration: `import fastbert` does not import transformers. `register_when_transformers_loads` (called by
`fastbert/__init__.py`) registers at once when `transformers.modeling_utils` is already loaded, and otherwise right
after it loads, through a one-shot post-import hook on `sys.meta_path` that wraps the loader the other finders return
(the module loads exactly as without it). No transformers class is patched.

Caution: what the kernel cannot do raises a ValueError that names the fallback, `attn_implementation="sdpa"`: causal
(decoder) attention and any mask that is not a key padding mask (sliding windows, custom mask patterns, a prepared
4-D mask), cross-attention and KV caches (keys of another length), grouped-query attention, head dims outside
16..128, the `softcap`, `sliding_window`, `position_bias`, `s_aux` keywords; and `output_attentions` (keyword or
config), whose fallback is "eager" (sdpa returns no weights either). A fully padded row gives zeros (eager attends
evenly over its padding: that row differs, real tokens do not). DistilBERT does not hand `position_ids` to its
layers: give it the cu_seq_lens keywords. Transformers ≥ 5.0.
Dispatch is the kernel's: CUDA → Triton; CPU → Triton's interpreter under TRITON_INTERPRET=1, else the plain-PyTorch
reference (materialises [B, h, T, T]: right, not fast). Host syncs: none in the padded path; the padding-free forms
read their boundaries back once per tensor and version (the layers of one forward share them), in every layer for
tensors made under `torch.inference_mode()` (no version counter), and in every layer when `max_length_q` is a tensor.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kernels.attention import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    fused_attention,
    fused_attention_varlen,
    mark_cu_seqlens_checked,
)

__all__ = ["NAME", "fastbert_attention", "fastbert_attention_mask", "register", "register_when_transformers_loads"]

NAME = "fastbert"
# Keywords some models pass that change what attention computes; the kernel has none of them.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux")


def _refusal(what: str, fallback: str = "sdpa") -> ValueError:
    return ValueError(f'attn_implementation="{NAME}": {what}. Use attn_implementation="{fallback}" for this model.')


# --------------------------------------------------------------------------------------------------------
# The mask function (AttentionMaskInterface)
# --------------------------------------------------------------------------------------------------------


def fastbert_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The key padding mask bool [B, kv_length] (True = real token) behind transformers' 2-D attention mask, or None.

    transformers calls it with the mask pattern as `mask_function`: only the plain bidirectional one (a padding mask)
    is accepted. The values are not read (an all-ones mask is passed on as it is: no host sync)."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not bidirectional_mask_function:
        name = getattr(mask_function, "__name__", repr(mask_function))
        raise _refusal(f"the model asks for a `{name}` mask (causal, sliding-window or another pattern); the fused "
                       "kernel takes key padding masks only")
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        raise _refusal("a KV cache (query or key offsets) is not supported")
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch_size, kv_length):
        raise _refusal(f"expected a bool [B, T] = {[batch_size, kv_length]} padding mask, got "
                       f"{attention_mask.dtype} {list(attention_mask.shape)}")
    return attention_mask  # (B, T) True = real token


# --------------------------------------------------------------------------------------------------------
# The attention function (AttentionInterface)
# --------------------------------------------------------------------------------------------------------


def _check_supported(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: object,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> None:
    name = type(module).__name__
    # transformers' own rule (sdpa): the keyword wins; a module that does not say is taken as causal.
    if is_causal if is_causal is not None else getattr(module, "is_causal", True):
        raise _refusal(f"{name} is causal (a decoder) or does not say it is not (no `is_causal` attribute); "
                       "the fused kernel has no causal mask")
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        # sdpa returns no weights either: eager is the fallback here
        raise _refusal("output_attentions: the fused kernel never forms the attention weights", fallback="eager")
    for kw in _UNSUPPORTED_KWARGS:
        if kwargs.get(kw) is not None:
            raise _refusal(f"`{kw}` is not supported by the fused kernel")
    if query.dim() != 4 or key.dim() != 4:
        raise _refusal(f"expected q, k, v as [B, h, T, d], got q {list(query.shape)}, k {list(key.shape)}")
    if key.shape[2] != query.shape[2]:
        raise _refusal(f"{name}: keys of another length than the queries ({key.shape[2]} vs {query.shape[2]}): "
                       "cross-attention and KV caches are not supported")
    if key.shape[1] != query.shape[1]:
        raise _refusal(f"{name}: grouped-query attention ({query.shape[1]} query heads, {key.shape[1]} key heads) "
                       "is not supported")
    d = query.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM):
        raise _refusal(f"head dim {d} is outside what the kernel takes ({MIN_HEAD_DIM}..{MAX_HEAD_DIM})")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise _refusal(f"a prepared attention mask {shape} reached the attention (fastbert takes the [B, T] padding "
                       "mask its mask function makes: pass the model a 2-D attention_mask)")


# Values read back from packing metadata, per tensor and version: a model hands the same tensors to every layer, so
# the host reads them once per forward, not once per layer. Inference tensors carry no version: read every call.
_host_reads = WeakIdKeyDictionary()


def _read_once(t: torch.Tensor, tag: str, read: Callable[[], Any]) -> Any:
    version = None if t.is_inference() or torch.compiler.is_compiling() else t._version
    hit = _host_reads.get(t)
    if version is not None and hit is not None and hit[0] == (version, tag):
        return hit[1]
    value = read()
    if version is not None:
        _host_reads[t] = ((version, tag), value)
    return value


def _boundaries_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N+1], max_seqlen) of the sequences packed in one row: one begins wherever a position is
    not its predecessor + 1."""
    pos = position_ids.reshape(-1)  # (T,)
    begins = torch.ones_like(pos, dtype=torch.bool)
    begins[1:] = pos[1:] != pos[:-1] + 1
    first = begins.nonzero().reshape(-1)  # (N,) host sync
    cu = torch.cat((first, first.new_full((1,), pos.numel()))).to(torch.int32)  # (N+1,)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    mark_cu_seqlens_checked(cu, pos.numel(), max_seqlen)  # valid by construction: the kernel need not read it again
    return cu, max_seqlen


def _packed_boundaries(
    attention_mask: torch.Tensor | None, B: int, T: int, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_seqlen) of a padding-free batch, or None for a padded (or unpadded, unpacked) one."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    cu_q, cu_k, max_q, max_k = (kwargs.get(n) for n in names)
    if any(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        if any(x is None for x in (cu_q, cu_k, max_q, max_k)):
            raise ValueError(f"padding-free batch: give all of {', '.join(names)} (DataCollatorWithFlattening("
                             "return_flash_attn_kwargs=True) makes them), or none")
        if attention_mask is not None:
            raise ValueError("padding-free batch: cu_seq_lens_q/k come with an attention mask; the packed row has no "
                             "padding to mask: drop the attention_mask")
        if not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be tensors")
        max_q, max_k = int(max_q), int(max_k)  # a tensor here costs a host sync (the collator gives ints)
        if cu_k is not cu_q and (max_q != max_k or cu_q.shape != cu_k.shape
                                 or _read_once(cu_q, "list", cu_q.tolist) != _read_once(cu_k, "list", cu_k.tolist)):
            raise _refusal("cu_seq_lens_k differs from cu_seq_lens_q (cross-attention); self-attention needs one set "
                           "of boundaries")
        return cu_q, max_q
    pos = kwargs.get("position_ids")
    if pos is None or attention_mask is not None or B != 1 or T == 0 or pos.numel() != T:
        return None
    return _read_once(pos, "boundaries", lambda: _boundaries_from_positions(pos))


def fastbert_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' `AttentionInterface`: q, k, v [B, h, T, d], `attention_mask` the bool [B, T] key
    padding mask from `fastbert_attention_mask` (or None), `dropout` p, `scaling` the softmax scale (None: 1/√d).
    Returns ([B, T, h, d], None)."""
    _check_supported(module, query, key, attention_mask, is_causal, kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, T, h, d): views of the projections
    B, T, h, d = q.shape
    packed = _packed_boundaries(attention_mask, B, T, kwargs)
    if packed is None:
        out = fused_attention(q, k, v, key_padding_mask=attention_mask, dropout_p=dropout, softmax_scale=scaling)
        return out, None  # (B, T, h, d)
    cu_seqlens, max_seqlen = packed
    q, k, v = (t.reshape(B * T, h, d) for t in (q, k, v))  # (total, h, d): views when B == 1
    out = fused_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout, softmax_scale=scaling)
    return out.view(B, T, h, d), None


# --------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------


def register() -> None:
    """Register "fastbert" in transformers' `AttentionInterface` and `AttentionMaskInterface` (imports them)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f'attn_implementation="{NAME}" needs transformers >= 5.0, found {transformers.__version__}')
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, fastbert_attention)
    AttentionMaskInterface.register(NAME, fastbert_attention_mask)


def _register_or_warn() -> None:
    # Runs inside the user's import of transformers: a failure here must not break that import.
    try:
        register()
    except Exception as e:
        warnings.warn(f'fastbert: attn_implementation="{NAME}" is unavailable: {e}', stacklevel=2)


class _RunAfter(importlib.abc.Loader):
    """A module's own loader, then `callback`; every other attribute is the loader's."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # no trace left on the module
        self._callback()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot post-import hook: finds nothing itself; for module `name` it takes the spec the other finders give
    and wraps its loader so that `callback` runs right after the module is executed."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; and find_spec below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfter(spec.loader, self.callback)
        return spec


def register_when_transformers_loads() -> None:
    """Register now if transformers' modeling_utils is loaded, else right after it loads (never imports it)."""
    if "transformers.modeling_utils" in sys.modules:
        _register_or_warn()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("transformers.modeling_utils", _register_or_warn))
