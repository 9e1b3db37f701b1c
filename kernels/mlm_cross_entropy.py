"""BERT's masked-LM head fused with its cross-entropy, on the labelled positions only.

``loss = mean_i CE(LayerNorm(gelu(h_i · Wdᵀ + bd)) · Eᵀ + b, label_i)`` over the positions ``i`` whose
label is not ``ignore_index``; ``E`` is the decoder matrix ``[V, H]`` (tied to the word embeddings).

What is fused, and where:
1. gather the labelled rows of ``hidden`` (~15% of the tokens in pretraining: the head never touches
   the others);
2. transform: dense + bias + GELU in one GEMM (``kernels.linear_bias_gelu``), then LayerNorm
   (``kernels.bias_dropout_add_layernorm`` with no bias, residual or dropout);
3. decoder + cross-entropy, processed in row chunks so the ``[n, V]`` logits never exist at once: for each
   chunk, cuBLAS computes the chunk's logits ``u · Eᵀ`` in the input dtype; one Triton kernel adds the
   decoder bias in fp32, computes per row the logsumexp online across the vocabulary, the loss, and
   whether ``argmax == label``, then overwrites the logits with their (unscaled) gradient
   ``softmax − onehot``; cuBLAS then accumulates ``du = g · E``, ``dE += gᵀ · u`` and ``db += Σ_rows g``,
   scaled by ``1/n`` in fp32. The gradients of the decoder are thus complete when forward returns;
   backward only multiplies them by ``grad_output`` and continues through the transform.

Bytes moved by step 3 (``n`` labelled rows, element size ``s``): the logits chunk buffer is written by the
GEMM, read twice and written once by the kernel, and read by the two gradient GEMMs — ``≈ 6·n·V·s`` in
total (``3·n·V·s`` without gradients), in chunks of at most ``CHUNK_LOGITS_BYTES`` (default 128 MiB;
~2,200 rows at V = 30522 in bf16), plus ``E`` read three times and ``dE`` written once per chunk.
FLOPs: ``6·n·V·H`` for the three GEMMs. Memory: one chunk buffer, plus ``dE`` held from forward to
backward (and, while forward runs, an fp32 copy of it when there are several chunks in fp16/bf16).

Dtypes: ``hidden`` fp32, fp16 or bf16; the weights may be any of those (they are cast to ``hidden``'s
dtype, as autocast would; the LayerNorm parameters are used as they are). Logits and their gradient are
stored in ``hidden``'s dtype, reductions (logsumexp, loss, bias gradient, multi-chunk ``dE``) are fp32.
The loss is an fp32 scalar, ``num_correct`` an int64 scalar without gradient.

No labelled position at all gives ``loss = 0.0`` and zero gradients (never NaN).

Dispatch (``kernels._common.use_triton``): CUDA → Triton; CPU → Triton through the interpreter when
``TRITON_INTERPRET=1``, ``mlm_cross_entropy_ref`` otherwise.

torch.compile: ``mlm_cross_entropy`` does not compile with ``fullgraph=True``: the gather of labelled rows
has a data-dependent size, checking label values reads them on the host, and the "no labelled position"
branch depends on data. A compiled caller gathers the labelled rows itself, outside the compiled region
or with a fixed budget, and calls ``mlm_cross_entropy_gathered(rows, row_labels, ...)``, which has no
data-dependent shapes (the decoder+loss step is the custom op ``kernels::mlm_decoder_cross_entropy``
with a fake implementation; under compilation the label-value check is skipped).

Caution: fp16 gradients of the logits are stored unscaled (``softmax − onehot``, in [−1, 1]) so they do
not underflow, but probabilities below fp16's normal range (~6e-5) keep only a few bits — prefer bf16;
the label-value check costs one device-to-host sync per call (so does the gather).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, use_triton
from kernels.bias_dropout_add_layernorm import bias_dropout_add_layernorm
from kernels.linear_bias_gelu import linear_bias_gelu

APPROXIMATIONS = ("none", "tanh")

# Upper bound on one chunk's logits buffer, in bytes (module-level so tests can shrink it to force chunks).
CHUNK_LOGITS_BYTES = 128 * 2**20
# Vocabulary block of the cross-entropy kernel. On Hopper 4096 columns over 8 warps is 16 values per
# thread per pass; one row per program (thousands of rows per chunk fill the GPU). Small enough that the
# interpreter tests with V = 30522 cross several blocks, exercising the online logsumexp.
BLOCK_V_MAX = 4096
NUM_WARPS = 8


def _chunk_rows(V: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_LOGITS_BYTES // (V * torch.empty((), dtype=dtype).element_size()))


# ----------------------------------------------------------------------------------------------------------
# Kernel: per row of a logits chunk, online logsumexp + loss + argmax, then the logits' gradient in place
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _ce_stats_block(row_ptr, bias_ptr, start, cols, V, label, m, s, best, best_idx, z_label,
                    BLOCK_V: tl.constexpr):
    """Fold columns [start, start + BLOCK_V) into the running max m, Σ exp(z − m), argmax and label logit."""
    idx = start + cols
    ok = idx < V
    z = tl.load(row_ptr + idx, mask=ok, other=float("-inf")).to(tl.float32)
    z += tl.load(bias_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    block_max = tl.max(z, axis=0)
    block_arg = tl.argmax(z, axis=0)
    better = block_max > best  # strict: ties keep the earlier index, like torch.argmax
    best_idx = tl.where(better, start + block_arg, best_idx)
    best = tl.where(better, block_max, best)
    m_new = tl.maximum(m, block_max)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    z_label += tl.sum(tl.where(idx == label, z, 0.0), axis=0)
    return m_new, s, best, best_idx, z_label


@triton.jit
def _ce_grad_block(row_ptr, bias_ptr, start, cols, V, label, lse):
    """Overwrite columns [start, start + BLOCK_V) of the row with softmax − onehot(label)."""
    idx = start + cols
    ok = idx < V
    z = tl.load(row_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    g = tl.exp(z - lse) - tl.where(idx == label, 1.0, 0.0)
    tl.store(row_ptr + idx, g.to(row_ptr.dtype.element_ty), mask=ok)


# Per row r with logits z = u_r · Eᵀ + b:  loss_r = logsumexp(z) − z[label_r],
#   d loss_r / dz = softmax(z) − onehot(label_r)   (the 1/n of the mean is applied after the GEMMs).
@triton.jit
def _ce_chunk_kernel(
    logits_ptr, bias_ptr, labels_ptr, loss_ptr, correct_ptr, V, stride_row,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Per row: read V logits (twice when WRITE_GRAD) and write V gradients, V bias values from L2.
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    z_label = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        m, s, best, best_idx, z_label = _ce_stats_block(
            row_ptr, bias_ptr, start, cols, V, label, m, s, best, best_idx, z_label, BLOCK_V)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - z_label)
    tl.store(correct_ptr + row, (best_idx == label).to(tl.int32))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            _ce_grad_block(row_ptr, bias_ptr, start, cols, V, label, lse)


# ----------------------------------------------------------------------------------------------------------
# Launcher (torch.library custom op)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kernels::mlm_decoder_cross_entropy", mutates_args=())
def _decoder_ce(
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    chunk_rows: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``u · weightᵀ + bias`` against ``labels`` (all valid), chunked.

    u [n, H] and weight [V, H] share a dtype; bias [V] any float dtype; labels [n] int64.
    Returns (loss fp32 [], num_correct int64 [], du [n, H], dweight [V, H], dbias fp32 [V]): the gradients
    of the mean loss, empty when ``compute_grad`` is False."""
    n, H = u.shape
    V = weight.shape[0]
    loss_rows = torch.zeros(n, device=u.device, dtype=torch.float32)
    correct_rows = torch.zeros(n, device=u.device, dtype=torch.int32)
    du = torch.empty_like(u) if compute_grad else u.new_empty((0,))
    dweight = torch.empty_like(weight) if compute_grad else weight.new_empty((0,))
    dbias = torch.zeros(V if compute_grad else 0, device=u.device, dtype=torch.float32)
    if n == 0:
        return loss_rows.sum(), correct_rows.sum(dtype=torch.int64), du, dweight, dbias

    inv_n = 1.0 / n
    rows_per_chunk = min(n, max(1, chunk_rows))
    n_chunks = triton.cdiv(n, rows_per_chunk)
    # Several chunks in fp16/bf16: accumulate dweight in fp32, round once at the end.
    dweight_acc = dweight
    if compute_grad and n_chunks > 1 and weight.dtype != torch.float32:
        dweight_acc = torch.zeros(weight.shape, device=u.device, dtype=torch.float32)
    buf = u.new_empty((rows_per_chunk, V))  # (chunk rows, V): logits, then their gradient
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(V))
    bias = bias.contiguous()
    labels = labels.contiguous()
    for start in range(0, n, rows_per_chunk):
        end = min(n, start + rows_per_chunk)
        u_c = u[start:end]  # (c, H)
        g = buf[: end - start]  # (c, V)
        torch.mm(u_c, weight.t(), out=g)
        _ce_chunk_kernel[(end - start,)](
            g, bias, labels[start:end], loss_rows[start:end], correct_rows[start:end], V, g.stride(0),
            WRITE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=NUM_WARPS,
        )
        if not compute_grad:
            continue
        # beta=0: the uninitialised output is ignored; alpha applies 1/n to the fp32 accumulator.
        du_c = du[start:end]
        torch.addmm(du_c, g, weight, beta=0.0, alpha=inv_n, out=du_c)  # (c, H)
        if dweight_acc is dweight:
            dweight.addmm_(g.t(), u_c, beta=1.0 if start else 0.0, alpha=inv_n)  # (V, H)
        else:
            dweight_acc.add_(torch.mm(g.t(), u_c), alpha=inv_n)  # (V, H) fp32
        dbias.add_(g.sum(0, dtype=torch.float32), alpha=inv_n)
    if compute_grad and dweight_acc is not dweight:
        dweight.copy_(dweight_acc)
    loss = loss_rows.sum() * inv_n
    return loss, correct_rows.sum(dtype=torch.int64), du, dweight, dbias


@_decoder_ce.register_fake
def _(u, weight, bias, labels, chunk_rows, compute_grad):
    V = weight.shape[0]
    return (
        u.new_empty((), dtype=torch.float32),
        u.new_empty((), dtype=torch.int64),
        torch.empty_like(u) if compute_grad else u.new_empty((0,)),
        torch.empty_like(weight) if compute_grad else weight.new_empty((0,)),
        u.new_empty((V if compute_grad else 0,), dtype=torch.float32),
    )


class _DecoderCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, already, its gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, u, weight, bias, labels, chunk_rows, compute_grad):
        loss, correct, du, dweight, dbias = torch.ops.kernels.mlm_decoder_cross_entropy(
            u, weight, bias, labels, chunk_rows, compute_grad
        )
        ctx.save_for_backward(du, dweight, dbias)
        ctx.bias_dtype = bias.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        du, dweight, dbias = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (
            du * grad_loss.to(du.dtype) if need[0] else None,
            dweight * grad_loss.to(dweight.dtype) if need[1] else None,
            (dbias * grad_loss).to(ctx.bias_dtype) if need[2] else None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_weights(H, device, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias,
                   approximate, eps) -> int:
    check_tensor("dense_weight", dense_weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if tuple(dense_weight.shape) != (H, H):
        raise ValueError(f"dense_weight must have shape ({H}, {H}), got {tuple(dense_weight.shape)}")
    for name, t in (("dense_bias", dense_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if t.shape[0] != H:
            raise ValueError(f"{name} must have shape ({H},), got {tuple(t.shape)}")
    check_tensor("decoder_weight", decoder_weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if decoder_weight.shape[1] != H or decoder_weight.shape[0] == 0:
        raise ValueError(f"decoder_weight must have shape (V, {H}) with V > 0, got {tuple(decoder_weight.shape)}")
    V = decoder_weight.shape[0]
    check_tensor("decoder_bias", decoder_bias, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    if decoder_bias.shape[0] != V:
        raise ValueError(f"decoder_bias must have shape ({V},) to match decoder_weight, got "
                         f"{tuple(decoder_bias.shape)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return V


def _check_label_values(labels: torch.Tensor, V: int, ignore_index: int | None) -> None:
    if torch.compiler.is_compiling():
        return  # reading label values on the host would break the graph
    scored = labels if ignore_index is None else labels[labels != ignore_index]
    if scored.numel() and bool(((scored < 0) | (scored >= V)).any()):
        bad = scored[(scored < 0) | (scored >= V)][0].item()
        allowed = f"[0, {V})" if ignore_index is None else f"[0, {V}) or ignore_index={ignore_index}"
        raise ValueError(f"labels must be in {allowed}, found {bad}")


def _head_loss(rows, row_labels, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias,
               approximate, eps):
    """Transform + fused decoder/cross-entropy on gathered rows [n, H] (labels all valid, n > 0)."""
    dtype = rows.dtype
    t = linear_bias_gelu(rows, dense_weight.to(dtype), dense_bias.to(dtype), approximate)  # (n, H)
    u = bias_dropout_add_layernorm(t, None, None, ln_weight, ln_bias, 0.0, eps)  # (n, H)
    weight = decoder_weight.to(dtype)
    compute_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (rows, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight,
                                  decoder_bias)
    )
    return _DecoderCrossEntropy.apply(
        u, weight, decoder_bias, row_labels, _chunk_rows(weight.shape[0], dtype), compute_grad
    )


def mlm_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor,
    *,
    approximate: str = "none",
    eps: float = 1e-12,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean MLM cross-entropy over the positions whose label is not ``ignore_index`` (module docstring).

    hidden ``[B, T, H]`` or ``[N, H]``; labels int64 of hidden's leading shape; dense ``[H, H]``/``[H]``
    (``nn.Linear`` layout), LayerNorm ``[H]``/``[H]``, decoder ``[V, H]``/``[V]``. Returns
    ``(loss, num_correct)``: the fp32 mean loss (0.0 when nothing is labelled) and the int64 number of
    labelled positions whose argmax logit is the label. Differentiable in hidden and every weight."""
    check_tensor("hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    H = hidden.shape[-1]
    check_tensor("labels", labels, dtypes=(torch.int64,), device=hidden.device)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    V = _check_weights(H, hidden.device, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight,
                       decoder_bias, approximate, eps)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_label_values(labels, V, ignore_index)
    weights = (dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias)
    if not use_triton(hidden, labels, *weights):
        return mlm_cross_entropy_ref(hidden, labels, *weights, approximate=approximate, eps=eps,
                                     ignore_index=ignore_index)
    flat_labels = labels.reshape(-1)  # (N,)
    picked = (flat_labels != ignore_index).nonzero().squeeze(1)  # (n,), one host sync
    if picked.numel() == 0:
        # Nothing to score: the reference on zero rows gives loss 0.0 and zero gradients everywhere.
        return mlm_cross_entropy_ref(hidden, labels, *weights, approximate=approximate, eps=eps,
                                     ignore_index=ignore_index)
    rows = hidden.reshape(-1, H).index_select(0, picked)  # (n, H)
    return _head_loss(rows, flat_labels.index_select(0, picked), *weights, approximate, eps)


def mlm_cross_entropy_gathered(
    rows: torch.Tensor,
    row_labels: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor,
    *,
    approximate: str = "none",
    eps: float = 1e-12,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mlm_cross_entropy`` on rows the caller already gathered: rows ``[n, H]``, row_labels ``[n]`` int64,
    every label in ``[0, V)``. No data-dependent shapes: this is the entry point for
    ``torch.compile(fullgraph=True)`` (the label-value check is skipped while compiling, and with
    ``check_labels=False`` — for labels the caller checked on the host: on a device the check synchronises)."""
    check_tensor("rows", rows, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("row_labels", row_labels, ndim=1, dtypes=(torch.int64,), device=rows.device)
    if row_labels.shape[0] != rows.shape[0]:
        raise ValueError(f"row_labels has {row_labels.shape[0]} entries but rows has {rows.shape[0]} rows")
    weights = (dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias)
    V = _check_weights(rows.shape[1], rows.device, *weights, approximate, eps)
    if check_labels:
        _check_label_values(row_labels, V, None)
    if rows.shape[0] == 0 or not use_triton(rows, row_labels, *weights):
        return mlm_cross_entropy_ref(rows, row_labels, *weights, approximate=approximate, eps=eps)
    return _head_loss(rows, row_labels, *weights, approximate, eps)


def mlm_cross_entropy_ref(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor,
    *,
    approximate: str = "none",
    eps: float = 1e-12,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch in hidden's dtype (any float dtype, float64 included), materialising the ``[n, V]``
    logits; the cross-entropy itself runs on fp32 (or float64) logits, as under autocast."""
    dtype = hidden.dtype
    H = hidden.shape[-1]
    flat_labels = labels.reshape(-1)  # (N,)
    scored = flat_labels != ignore_index
    rows = hidden.reshape(-1, H)[scored]  # (n, H)
    row_labels = flat_labels[scored]  # (n,)
    t = F.gelu(F.linear(rows, dense_weight.to(dtype), dense_bias.to(dtype)), approximate=approximate)
    u = F.layer_norm(t, (H,), ln_weight.to(dtype), ln_bias.to(dtype), eps)
    logits = F.linear(u, decoder_weight.to(dtype), decoder_bias.to(dtype))  # (n, V)
    ce_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n = row_labels.shape[0]
    loss = F.cross_entropy(logits.to(ce_dtype), row_labels, reduction="sum") / max(n, 1)
    num_correct = (logits.argmax(-1) == row_labels).sum()
    return loss, num_correct
