"""The attention family: q, k, v [B, T, h, d] with random key padding (lengths T/2..T) and dropout, forward and
backward, fastbert's fused kernels (padded and varlen) against eager, SDPA with the mask, torch.compile and the
peers (SDPA's flash backend, its cuDNN backend with the mask, FlashAttention-2's varlen kernel)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import peers
from .cases import (
    BWD_FLOP_FACTOR,
    Fn,
    OpCase,
    _compile_skip_reason,
    _fastbert_skip_reason,
    _gen,
    _import,
    _padding_mask,
    _randn,
    attention_flops,
)
from .timing import BenchEnv


def attention_eager(q, k, v, mask, p: float, scale: float) -> torch.Tensor:
    """BERT's attention as Hugging Face's eager path writes it, in the input dtype. q, k, v [B, T, h, d]."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
    scores = (qt @ kt.transpose(-1, -2)) * scale  # (B, h, T, T)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=p > 0)
    return (probs @ vt).transpose(1, 2)  # (B, T, h, d)


def attention_sdpa(q, k, v, mask, p: float, scale: float) -> torch.Tensor:
    """torch SDPA with the boolean key mask (memory-efficient backend: the one that takes a mask and dropout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], dropout_p=p, scale=scale)
    return out.transpose(1, 2)  # (B, T, h, d)


DETERMINISTIC = "fastbert-varlen-deterministic"  # the two-pass backward (7 products, no atomics)
VARLEN = ("fastbert-varlen", DETERMINISTIC, peers.SDPA_FLASH_VARLEN, peers.FLASH_ATTN_VARLEN)  # packed real tokens


def _add_peers(env: BenchEnv, cands: dict[str, Fn], skipped: dict[str, str], scale: float, *, have_unpad: bool,
               why_pad: str) -> dict[str, str]:
    """sdpa-flash (padded batch, no mask), sdpa-cudnn (padded batch, with the mask), sdpa-flash-varlen (jagged
    nested tensor), flash-attn-varlen."""
    notes = {peers.SDPA_FLASH: "no key mask: attends over the padding too (the FA2 anchor on the padded work)"}
    flash, why = peers.sdpa_flash(env)
    if why:
        skipped[peers.SDPA_FLASH] = why
    else:
        def sdpa_flash(i, p):
            with flash():
                out = F.scaled_dot_product_attention(i["q"].transpose(1, 2), i["k"].transpose(1, 2),
                                                     i["v"].transpose(1, 2), dropout_p=p, scale=scale)
            return (out.transpose(1, 2),)  # (B, T, h, d)
        cands[peers.SDPA_FLASH] = sdpa_flash
    cudnn, why_cudnn = peers.sdpa_cudnn(env)
    if why_cudnn:
        skipped[peers.SDPA_CUDNN] = why_cudnn
    else:
        def sdpa_cudnn(i, p):
            with cudnn():
                return (attention_sdpa(i["q"], i["k"], i["v"], i["mask"], p, scale),)
        cands[peers.SDPA_CUDNN] = sdpa_cudnn
    jagged, why_nt = peers.nested_jagged(env)
    why_nt = why or why_nt or ("" if have_unpad else why_pad)
    if why_nt:
        skipped[peers.SDPA_FLASH_VARLEN] = why_nt
    else:
        def sdpa_flash_varlen(i, p):
            q, k, v = (jagged(t, i["offsets"], min_seqlen=i["min_seqlen"], max_seqlen=i["max_seqlen"])
                       .transpose(1, 2) for t in (i["qp"], i["kp"], i["vp"]))  # (B, h, j, d) jagged
            with flash():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
            return (out.transpose(1, 2).values(),)  # (total, h, d)
        cands[peers.SDPA_FLASH_VARLEN] = sdpa_flash_varlen
    fav, why_fa = peers.flash_attn_varlen(env)
    why_fa = why_fa or ("" if have_unpad else why_pad)
    if why_fa:
        skipped[peers.FLASH_ATTN_VARLEN] = why_fa
    else:
        def flash_attn_varlen(i, p):
            cu = i["cu_seqlens"].to(torch.int32)
            return (fav(i["qp"], i["kp"], i["vp"], cu, cu, i["max_seqlen"], i["max_seqlen"], dropout_p=p,
                        softmax_scale=scale),)  # (total, h, d)
        cands[peers.FLASH_ATTN_VARLEN] = flash_attn_varlen
    return notes


def attention_case(env: BenchEnv, size: str, B: int, T: int, h: int, d: int, *, p: float = 0.1,
                   allow_compile: bool = True) -> OpCase:
    dev, dtype, scale = env.device, env.dtype, 1.0 / math.sqrt(d)
    fused, why_fused = _import("kernels.attention", "fused_attention", "fused_attention_varlen")
    padding, why_pad = _import("kernels.padding", "unpad_input")
    skipped: dict[str, str] = {}
    cands: dict[str, Fn] = {
        "eager": lambda i, p: (attention_eager(i["q"], i["k"], i["v"], i["mask"], p, scale),),
        "sdpa": lambda i, p: (attention_sdpa(i["q"], i["k"], i["v"], i["mask"], p, scale),),
    }
    why_c = _compile_skip_reason(env, allow_compile)
    if why_c:
        skipped["compile"] = why_c
    else:
        compiled = torch.compile(attention_eager)
        cands["compile"] = lambda i, p: (compiled(i["q"], i["k"], i["v"], i["mask"], p, scale),)
    why_fb = _fastbert_skip_reason(env) or why_fused
    if why_fb:
        skipped["fastbert"] = skipped["fastbert-varlen"] = skipped[DETERMINISTIC] = why_fb
    else:
        fa, fa_varlen = fused
        cands["fastbert"] = lambda i, p: (fa(i["q"], i["k"], i["v"], key_padding_mask=i["mask"], dropout_p=p,
                                             softmax_scale=scale),)
        if why_pad:
            skipped["fastbert-varlen"] = skipped[DETERMINISTIC] = why_pad
        else:
            def varlen(deterministic: bool) -> Fn:
                return lambda i, p: (fa_varlen(i["qp"], i["kp"], i["vp"], i["cu_seqlens"], i["max_seqlen"],
                                               dropout_p=p, softmax_scale=scale, deterministic=deterministic),)
            cands["fastbert-varlen"], cands[DETERMINISTIC] = varlen(False), varlen(True)

    notes = _add_peers(env, cands, skipped, scale, have_unpad=padding is not None, why_pad=why_pad)
    notes[DETERMINISTIC] = "deterministic=True: the two-pass backward against the default one-pass (dQ atomics)"

    def make() -> dict[str, Any]:
        g = _gen(dev, 1234)
        mask = _padding_mask(B, T, dev, g)
        q, k, v = (_randn((B, T, h, d), dtype, dev, g) for _ in range(3))
        inp: dict[str, Any] = dict(q=q, k=k, v=v, mask=mask)
        leaves = {name: [q, k, v] for name in ("eager", "sdpa", "compile", "fastbert", peers.SDPA_FLASH,
                                                 peers.SDPA_CUDNN)}
        if padding is not None:
            unpad = padding[0]
            qp, idx, cu, max_s = unpad(q.detach(), mask)  # (total, h, d)
            kp, vp = (unpad(t.detach(), mask)[0] for t in (k, v))
            qp, kp, vp = (t.contiguous().requires_grad_(True) for t in (qp, kp, vp))
            lengths = mask.sum(1)
            inp.update(qp=qp, kp=kp, vp=vp, cu_seqlens=cu, max_seqlen=max_s, min_seqlen=int(lengths.min()),
                       offsets=cu.long())
            for name in VARLEN:
                leaves[name] = [qp, kp, vp]
        inp["leaves"] = leaves
        return inp

    def real(name: str, outs, inp) -> torch.Tensor:
        return outs[0] if name in VARLEN else outs[0][inp["mask"]]  # (total, h, d)

    return OpCase("attention", "attention", size, f"B={B} T={T} h={h} d={d} p={p} padded T/2..T", dtype, make,
                  cands, skipped, baseline="sdpa" if env.cuda else "eager", dropout_p=p,
                  flops=attention_flops(B, T, h, d), flop_factor=dict(BWD_FLOP_FACTOR), real=real, notes=notes,
                  no_parity=(peers.SDPA_FLASH,))

