"""The encoder's other kernels at N = B·T tokens of a model size, against eager PyTorch, torch.compile of the
same math and the peers (Liger-Kernel's LayerNorm and fused linear cross-entropy, cuBLASLt's bias+GELU
epilogue)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import BertConfig
from . import peers
from .cases import (
    IGNORE_INDEX,
    MLM_FRACTION,
    Fn,
    OpCase,
    _compile_skip_reason,
    _fastbert_skip_reason,
    _gen,
    _import,
    _padding_mask,
    _randn,
)
from .timing import BenchEnv


def _leaves_for_all(inp: dict[str, Any], names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    inp["leaves"] = {n: list(tensors) for n in names}


def _add_candidates(env: BenchEnv, cands: dict[str, Fn], skipped: dict[str, str], fused_module: str,
                    fused_names: Sequence[str], make_fused: Callable[..., Fn], eager: Fn,
                    compile_target: Callable[..., Any] | None, make_compiled: Callable[[Any], Fn],
                    allow_compile: bool) -> None:
    cands["eager"] = eager
    why_c = _compile_skip_reason(env, allow_compile) if compile_target is not None else "no compile baseline"
    if why_c:
        skipped["compile"] = why_c
    else:
        cands["compile"] = make_compiled(torch.compile(compile_target))
    objs, why = _import(fused_module, *fused_names)
    why = _fastbert_skip_reason(env) or why
    if why:
        skipped["fastbert"] = why
    else:
        cands["fastbert"] = make_fused(*objs)


def _bdaln_eager(x, bias, residual, gamma, beta, p: float, eps: float) -> torch.Tensor:
    return F.layer_norm(residual + F.dropout(x + bias, p=p, training=p > 0), (x.shape[-1],), gamma, beta, eps)


def _softmax_eager(scores, mask, scale: float, p: float) -> torch.Tensor:
    s = (scores * scale).masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.dropout(torch.softmax(s, dim=-1), p=p, training=p > 0)


def _linear_bias_gelu_eager(x, w, b) -> torch.Tensor:
    return F.gelu(F.linear(x, w, b))


def _qkv_eager(x, w, b, num_heads: int):
    H = x.shape[-1]
    q, k, v = F.linear(x, w, b).split(H, dim=-1)  # 3 × (B, T, H)
    return tuple(t.unflatten(-1, (num_heads, H // num_heads)) for t in (q, k, v))  # (B, T, h, d) views


def _mlm_rows_loss(rows, row_labels, dw, db, lw, lb, ew, eb, eps: float) -> torch.Tensor:
    """MLM head + cross-entropy on already-gathered rows (what the compiled baseline compiles)."""
    t = F.gelu(F.linear(rows, dw, db))
    u = F.layer_norm(t, (rows.shape[-1],), lw, lb, eps)
    logits = F.linear(u, ew, eb)  # (n, V)
    return F.cross_entropy(logits.float(), row_labels)


KERNEL_OPS = ("qkv_projection", "softmax_dropout", "linear_bias_gelu", "bias_dropout_add_layernorm",
              "mlm_cross_entropy")


def kernel_cases(env: BenchEnv, size: str, B: int, T: int, *, allow_compile: bool = True,
                 ops: Sequence[str] | None = None) -> list[OpCase]:
    """The encoder kernels at N = B·T tokens of a model size: qkv_projection, softmax_dropout,
    linear_bias_gelu, bias_dropout_add_layernorm, mlm_cross_entropy."""
    cfg = BertConfig.from_preset(size)
    H, h, I, V = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size
    N, dev, dtype, eps, p = B * T, env.device, env.dtype, cfg.layer_norm_eps, 0.1
    s = torch.tensor([], dtype=dtype).element_size()
    names = ("fastbert", "eager", "compile", peers.LIGER, peers.CUBLASLT)
    liger, why_liger = peers.liger(env)
    cases: list[OpCase] = []

    def want(op: str) -> bool:
        return ops is None or op in ops

    if want("qkv_projection"):
        c, sk = {}, {}

        def make_qkv():
            g = _gen(dev, 1)
            x = _randn((B, T, H), dtype, dev, g)
            w = _randn((3 * H, H), dtype, dev, g, scale=H**-0.5)
            b = _randn((3 * H,), dtype, dev, g, scale=0.02)
            inp = dict(x=x, w=w, b=b)
            _leaves_for_all(inp, names, [x, w, b])
            return inp

        _add_candidates(env, c, sk, "kernels.qkv_projection", ["qkv_projection"],
                        lambda f: (lambda i, p: tuple(f(i["x"], i["w"], i["b"], h))),
                        lambda i, p: _qkv_eager(i["x"], i["w"], i["b"], h), _qkv_eager,
                        lambda cf: (lambda i, p: tuple(cf(i["x"], i["w"], i["b"], h))), allow_compile)
        cases.append(OpCase("kernels", "qkv_projection", size, f"N={N} H={H} h={h}", dtype, make_qkv, c, sk,
                            "eager", flops=2.0 * N * H * 3 * H))

    if want("softmax_dropout"):
        c, sk = {}, {}
        scale = 1.0 / math.sqrt(H // h)

        def make_sm():
            g = _gen(dev, 2)
            scores = _randn((B, h, T, T), dtype, dev, g, scale=3.0)
            inp = dict(scores=scores, mask=_padding_mask(B, T, dev, g))
            _leaves_for_all(inp, names, [scores])
            return inp

        _add_candidates(env, c, sk, "kernels.softmax_dropout", ["scaled_masked_softmax_dropout"],
                        lambda f: (lambda i, p: (f(i["scores"], i["mask"], scale, p),)),
                        lambda i, p: (_softmax_eager(i["scores"], i["mask"], scale, p),), _softmax_eager,
                        lambda cf: (lambda i, p: (cf(i["scores"], i["mask"], scale, p),)), allow_compile)
        numel = B * h * T * T
        cases.append(OpCase("kernels", "softmax_dropout", size, f"B={B} h={h} T={T} p={p} padded T/2..T", dtype,
                            make_sm, c, sk, "eager", dropout_p=p,
                            bytes={"fwd": 2.0 * numel * s, "bwd": 3.0 * numel * s, "fwd+bwd": 5.0 * numel * s}))

    if want("linear_bias_gelu"):
        c, sk = {}, {}

        def make_lbg():
            g = _gen(dev, 3)
            x = _randn((N, H), dtype, dev, g)
            w = _randn((I, H), dtype, dev, g, scale=H**-0.5)
            b = _randn((I,), dtype, dev, g, scale=0.02)
            inp = dict(x=x, w=w, b=b)
            _leaves_for_all(inp, names, [x, w, b])
            return inp

        _add_candidates(env, c, sk, "kernels.linear_bias_gelu", ["linear_bias_gelu"],
                        lambda f: (lambda i, p: (f(i["x"], i["w"], i["b"], "none"),)),
                        lambda i, p: (_linear_bias_gelu_eager(i["x"], i["w"], i["b"]),), _linear_bias_gelu_eager,
                        lambda cf: (lambda i, p: (cf(i["x"], i["w"], i["b"]),)), allow_compile)
        addmm_act, why = peers.cublaslt(env)
        if why:
            sk[peers.CUBLASLT] = why
        else:
            c[peers.CUBLASLT] = lambda i, p: (addmm_act(i["b"], i["x"], i["w"].t(), use_gelu=True),)
        sk[peers.LIGER] = why_liger or "Liger-Kernel has no GELU kernel (GEGLU and SwiGLU only)"
        cases.append(OpCase("kernels", "linear_bias_gelu", size, f"N={N} H={H} I={I}", dtype, make_lbg, c, sk,
                            "eager", flops=2.0 * N * H * I, notes={peers.CUBLASLT: peers.cublaslt_note(env)},
                            fwd_only={peers.CUBLASLT: "torch implements no derivative for _addmm_activation"}))

    if want("bias_dropout_add_layernorm"):
        c, sk = {}, {}

        def make_ln():
            g = _gen(dev, 4)
            x, res = _randn((N, H), dtype, dev, g), _randn((N, H), dtype, dev, g)
            bias = _randn((H,), dtype, dev, g, scale=0.02)
            gamma = (1 + _randn((H,), dtype, dev, g, scale=0.1, grad=False)).requires_grad_(True)
            beta = _randn((H,), dtype, dev, g, scale=0.1)
            inp = dict(x=x, res=res, bias=bias, gamma=gamma, beta=beta)
            _leaves_for_all(inp, names, [x, res, bias, gamma, beta])
            return inp

        def ln_args(i):
            return i["x"], i["bias"], i["res"], i["gamma"], i["beta"]

        _add_candidates(env, c, sk, "kernels.bias_dropout_add_layernorm", ["bias_dropout_add_layernorm"],
                        lambda f: (lambda i, p: (f(*ln_args(i), p, eps),)),
                        lambda i, p: (_bdaln_eager(*ln_args(i), p, eps),), _bdaln_eager,
                        lambda cf: (lambda i, p: (cf(*ln_args(i), p, eps),)), allow_compile)
        if why_liger:
            sk[peers.LIGER] = why_liger
        else:
            c[peers.LIGER] = lambda i, p: (liger.liger_layer_norm(
                i["res"] + F.dropout(i["x"] + i["bias"], p=p, training=p > 0), i["gamma"], i["beta"], eps),)
        cases.append(OpCase("kernels", "bias_dropout_add_layernorm", size, f"N={N} H={H} p={p}", dtype, make_ln,
                            c, sk, "eager", dropout_p=p,
                            notes={peers.LIGER: "Liger's LayerNorm; bias + dropout + residual in eager PyTorch"},
                            bytes={"fwd": 3.0 * N * H * s + 8 * N, "bwd": 5.0 * N * H * s + 8 * N,
                                   "fwd+bwd": 8.0 * N * H * s + 16 * N}))

    if want("mlm_cross_entropy"):
        c, sk = {}, {}

        def make_mlm():
            g = _gen(dev, 5)
            hidden = _randn((N, H), dtype, dev, g)
            labels = torch.randint(0, V, (N,), generator=g, device=dev)
            scored = torch.rand((N,), generator=g, device=dev) < MLM_FRACTION
            labels = labels.masked_fill(~scored, IGNORE_INDEX)
            dw, ew = _randn((H, H), dtype, dev, g, scale=H**-0.5), _randn((V, H), dtype, dev, g, scale=0.02)
            db, eb = _randn((H,), dtype, dev, g, scale=0.02), _randn((V,), dtype, dev, g, scale=0.02)
            lw = (1 + _randn((H,), dtype, dev, g, scale=0.1, grad=False)).requires_grad_(True)
            lb = _randn((H,), dtype, dev, g, scale=0.1)
            inp = dict(hidden=hidden, labels=labels, w=(dw, db, lw, lb, ew, eb), n=int(scored.sum()))
            _leaves_for_all(inp, names, [hidden, dw, db, lw, lb, ew, eb])
            return inp

        def mlm_compiled(cf):
            def run(i, p):
                flat = i["labels"]
                keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # gathered eagerly: data-dependent size
                return (cf(i["hidden"].index_select(0, keep), flat.index_select(0, keep), *i["w"], eps),)
            return run

        objs, _ = _import("kernels.mlm_cross_entropy", "mlm_cross_entropy_ref")
        eager_mlm = objs[0] if objs else None
        if eager_mlm is None:  # the module is missing: a local eager baseline still runs
            def eager_fn(i, p):
                keep = i["labels"] != IGNORE_INDEX
                return (_mlm_rows_loss(i["hidden"][keep], i["labels"][keep], *i["w"], eps),)
        else:
            def eager_fn(i, p):
                return (eager_mlm(i["hidden"], i["labels"], *i["w"], eps=eps)[0],)
        _add_candidates(env, c, sk, "kernels.mlm_cross_entropy", ["mlm_cross_entropy"],
                        lambda f: (lambda i, p: (f(i["hidden"], i["labels"], *i["w"], eps=eps)[0],)),
                        eager_fn, _mlm_rows_loss, mlm_compiled, allow_compile)
        if why_liger:
            sk[peers.LIGER] = why_liger
        else:
            def liger_mlm(i, p):
                flat = i["labels"]
                keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # gathered eagerly, as for compile
                dw, db, lw, lb, ew, eb = i["w"]
                u = liger.liger_layer_norm(F.gelu(F.linear(i["hidden"].index_select(0, keep), dw, db)), lw, lb, eps)
                return (liger.liger_fused_linear_cross_entropy(u, ew, flat.index_select(0, keep), bias=eb),)
            c[peers.LIGER] = liger_mlm
        n_est = N * MLM_FRACTION
        cases.append(OpCase("kernels", "mlm_cross_entropy", size, f"N={N} H={H} V={V} ~15% scored", dtype,
                            make_mlm, c, sk, "eager", flops=n_est * (2.0 * H * H + 2.0 * H * V),
                            notes={peers.LIGER: "Liger's fused linear cross-entropy (and LayerNorm in the transform)"}))
    if ops is not None:  # in the order asked for (gpu_check puts the ops with targets first)
        cases.sort(key=lambda c: list(ops).index(c.name))
    return cases

