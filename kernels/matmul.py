"""Shared Triton GEMM with a fused epilogue: ``y = act(x · Wᵀ + b)``, for the encoder's linear layers.

One kernel serves every projection that wants work folded into the GEMM's store:
- bias add (always; the bias tile is read once per output tile),
- activation: none, exact erf GELU or tanh GELU (same formulas as ``torch.nn.functional.gelu``),
- optional store of the pre-activation ``x · Wᵀ + b`` (what GELU's backward needs),
- optional three-way column split: column ``c`` of the ``N = 3·split_n`` outputs goes to output
  ``c // split_n`` (three separate ``[M, split_n]`` tensors), so the QKV projection writes q, k and v as
  three contiguous ``[M, H]`` (= ``[B, T, h, d]``) tensors straight from the accumulator, with no
  transpose or copy.

``x`` is ``[M, K]`` and ``W`` is ``[N, K]`` (the ``nn.Linear`` layout), both with any strides; ``W`` is read
through its strides as the ``[K, N]`` right operand, never transposed in memory. Accumulation is fp32;
outputs are in the input dtype. fp32 inputs use TF32 tensor cores only when PyTorch would
(``torch.get_float32_matmul_precision() != "highest"``), so fp32 results match ``torch.matmul``'s precision.

Bytes moved (ideal, each operand once): ``(M·K + N·K + N) · s`` in, ``M·N · s`` out (``2·M·N · s`` with the
pre-activation), ``s`` the element size; ``2·M·N·K`` FLOPs. The epilogue costs no extra pass over memory,
which is the point: unfused, bias and GELU each read and write the ``M·N`` output once more.

Program order is grouped (``GROUP_M`` row-tiles share a column sweep) so the W tiles stay in L2.

Which GEMM runs (the GEMM path switch). Every GEMM fastbert owns has two implementations behind one function
(`kernels.qkv_projection`, `kernels.linear_bias_gelu`): ``"cublas"`` — ``torch.addmm`` (cuBLASLt fuses the bias)
followed, where an activation is wanted, by the Triton GELU epilogue of `kernels.bias_gelu` — and ``"triton"`` — this
kernel, with bias, GELU and the pre-activation store fused into the GEMM. The default is ``"cublas"`` for every
kind (`GEMM_KINDS`) on every device: no GPU measurement exists yet that shows this kernel faster than cuBLAS for
any BERT shape (`benchmarks/results/` has none), and cuBLAS is the GEMM to beat. Switch with the environment
variable ``FASTBERT_GEMM`` read at import (``triton``, ``cublas``, or per kind ``qkv=triton,bias_gelu=cublas``)
or `set_gemm_backend(kind, backend)`; `gemm_backend(kind)` says which one a launch takes and
`fastbert.fused.fusion_report` reports it per layer.

Autotuning without a storm. With unpadding, ``M`` (the number of real tokens) changes nearly every batch, so the
autotune key holds `m_bucket(M)` (a power of two between 64 and 8192, everything above 4096 rows in one
bucket: at most 8 tunings per kernel, dtype and epilogue), not ``M``; N and K stay exact (fixed per model). Under
``torch.distributed`` with more than one rank, ranks would otherwise tune apart — each on its own ``M`` and its
own timings — and may pick different configs, so there the autotuner is bypassed: every rank launches the fixed
config `fixed_tile` picks for the bucket (a table from compile-time data, no timing; the same on every rank by
construction). ``FASTBERT_GEMM_AUTOTUNE=0`` takes the same fixed table in a single process (no tuning at all,
e.g. before CUDA-graph capture). Rank 0 tuning and broadcasting was rejected: a broadcast inside a launch is a
collective every rank must reach at once, but ranks see different ``M`` and so tune at different steps.

Two kernels: `_gemm_bias_act_kernel` (masked pointer loads, cp.async + wgmma on sm_90; every layout, the
three-way split) and `_gemm_tma_persistent_kernel` (TMA descriptors for loads and stores, one program per SM
walking the tiles; one output buffer, 16-byte aligned rows) which `gemm_bias_act` takes on CUDA sm_90+ when the
operands allow. The TMA kernel is judged by compile-time evidence only (wgmma + TMA, no C7515, no spills: see
`_TMA_TILES`); no GPU has run or timed it yet, so cuBLAS stays the default.

Caution: no split-K (small-M, huge-K shapes are not its strength) and no warp specialisation; bf16 cannot run
through Triton's interpreter (its ``tl.dot`` is wrong on bf16), so bf16 is checked only on a GPU.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from kernels._common import interpreter_on, use_triton

try:  # host-side TMA descriptors (Triton >= 3.4; the GPU image has 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the TMA path is off
    TensorDescriptor = None

# Activation codes shared with the callers (constexpr in the kernel).
ACT_NONE = 0
ACT_GELU_ERF = 1
ACT_GELU_TANH = 2
GELU_CODES = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH}  # `approximate=` value -> activation code


# Autotune configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper (sm_90), by operand kind and
# epilogue. Chosen from compile-time data only — `python -m kernels.aot_check` (registers, spills, shared memory
# from the ptxas bundled with triton), NOT from GPU timings; a GPU session must still time them. Rule: nothing in
# a list spills more than a few bytes or needs more than the 227 KB of shared memory per block. What the data
# showed:
# - fp16/bf16 without activation (QKV split, plain linear): wgmma-sized tiles, 64-wide for small M or N, all
#   clean. 128×256×64 (8 warps) was dropped: ptxas warns C7515 ("wgmma.mma_async instructions are serialized")
#   for it, i.e. the wide tile's MMAs do not overlap.
# - with the GELU epilogue (+ stored pre-activation) the fp32 epilogue math pushes 4-warp 128×128 and 128×256
#   (even with 16 warps, for erf) to 255 registers and 16-320 B of spills; 8-warp 128×128 stays clean. 64×256×64
#   (8 warps) compiles without spills but draws the same C7515 warning: dropped.
# - fp32 with TF32: operands take twice the shared memory, so BLOCK_K = 32 for the big tiles (128×256×64 with 3
#   stages needs 288 KB); with GELU, 128×256 and 4-warp 128×128 spill ~520 B. Every 8-warp 128×128 tile
#   (BLOCK_K 32 or 64, with or without GELU) draws C7515: dropped.
# - fp32 exact (IEEE, FMA, no tensor cores): the 16-bit tiles spill heavily; small tiles only (128×128×32
#   with 8 warps sits at 250-255 registers and spills with GELU: left out).
_TILES: dict[tuple[str, bool], list[tuple[int, int, int, int, int]]] = {  # (operands, GELU epilogue) -> tiles
    ("16bit", False): [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                       (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)],
    ("16bit", True): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                      (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    ("tf32", False): [(128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                      (64, 64, 64, 4, 4)],
    ("tf32", True): [(128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)],
    ("ieee", False): [(128, 64, 32, 8, 2), (64, 128, 32, 8, 2), (64, 64, 32, 4, 2), (64, 64, 16, 4, 2),
                      (64, 32, 32, 4, 2), (32, 64, 32, 4, 2)],
}  # fmt: skip
_TILES["ieee", True] = _TILES["ieee", False]  # the FMA path's tiles are clean with or without GELU
# The interpreter runs every config in numpy and pays per operation, not per element: one 64-wide tile keeps the
# CPU tests fast (fewer programs, fewer K steps) and still leaves tails in every dimension of the odd test shapes
# (e.g. K = 33, 96, 160 and N = 129 in the linear+GELU tests).
_INTERPRETER_TILE = (64, 64, 64, 4, 3)


# ------------------------------------------------------------------------------------- GEMM path switch
GEMM_KINDS = ("qkv", "bias_gelu")  # the QKV projection (3-way split) and linear + bias + GELU (FFN up, MLM transform)
GEMM_BACKENDS = ("cublas", "triton")
# Default per kind: cuBLAS until a GPU measurement in benchmarks/results/ shows this kernel faster (module docstring).
_DEFAULT_BACKEND = {"qkv": "cublas", "bias_gelu": "cublas"}
_WHY_DEFAULT = "default: no GPU timing yet shows the Triton GEMM faster than cuBLAS"


def _parse_backend_env(value: str) -> dict[str, str]:
    """``FASTBERT_GEMM``: ``""`` (defaults), one backend for every kind, or ``kind=backend`` pairs."""
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        pairs = [(kind, value) for kind in GEMM_KINDS]
    else:
        pairs = [tuple(x.strip() for x in item.split("=", 1)) for item in value.split(",") if item.strip()]
    out = {}
    for kind, backend in pairs:
        if kind not in GEMM_KINDS or backend not in GEMM_BACKENDS:
            raise ValueError(
                f"FASTBERT_GEMM={value!r}: expected one of {GEMM_BACKENDS} or kind=backend pairs with kind in "
                f"{GEMM_KINDS}"
            )
        out[kind] = backend
    return out


_BACKEND = {**_DEFAULT_BACKEND, **_parse_backend_env(os.environ.get("FASTBERT_GEMM", ""))}
_BACKEND_SOURCE = {k: "FASTBERT_GEMM" if _BACKEND[k] != _DEFAULT_BACKEND[k] else _WHY_DEFAULT for k in GEMM_KINDS}


def gemm_backend(kind: str) -> str:
    """The GEMM implementation launches of `kind` (``"qkv"`` / ``"bias_gelu"``) take: ``"cublas"`` or ``"triton"``."""
    if kind not in GEMM_KINDS:
        raise ValueError(f"kind must be one of {GEMM_KINDS}, got {kind!r}")
    return _BACKEND[kind]


def gemm_backend_reason(kind: str) -> str:
    """Why `gemm_backend(kind)` is what it is (for `fusion_report`)."""
    gemm_backend(kind)
    return _BACKEND_SOURCE[kind]


def set_gemm_backend(kind: str, backend: str) -> str:
    """Choose the GEMM implementation of `kind` for this process; returns the previous choice."""
    previous = gemm_backend(kind)
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"backend must be one of {GEMM_BACKENDS}, got {backend!r}")
    _BACKEND[kind] = backend
    _BACKEND_SOURCE[kind] = "set_gemm_backend" if backend != _DEFAULT_BACKEND[kind] else _WHY_DEFAULT
    return previous


def check_backend(backend: str | None, kind: str) -> str:
    """`backend` validated, or the process-wide choice for `kind` when None."""
    if backend is None:
        return gemm_backend(kind)
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"backend must be one of {GEMM_BACKENDS} or None, got {backend!r}")
    return backend


# ------------------------------------------------------------------------------------- autotune buckets
M_BUCKET_MIN, M_BUCKET_MAX = 64, 8192


def m_bucket(M: int) -> int:
    """The autotune key's stand-in for the row count: the next power of two, clamped to [64, 8192] (every
    M above 4096 shares the 8192 bucket, where the big tiles fill the GPU anyway): 8 buckets in all."""
    return min(max(triton.next_power_of_2(max(int(M), 1)), M_BUCKET_MIN), M_BUCKET_MAX)


def _fixed_autotune() -> bool:
    """True when the autotuner must be bypassed for the fixed per-bucket table: several torch.distributed ranks
    (they must agree), or FASTBERT_GEMM_AUTOTUNE=0."""
    if os.environ.get("FASTBERT_GEMM_AUTOTUNE", "1") == "0":
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fixed_tile(dtype: torch.dtype, dot_precision: str, activation: int, M: int) -> tuple[int, int, int, int, int]:
    """The committed config for a launch without autotuning: the first (largest) tile of the launch's list from
    the 1024-row bucket up, the first 64-row tile below (fewer idle rows on small batches). Chosen from the
    compile-time data above, not timed; the same on every rank."""
    tiles = gemm_tiles(dtype, dot_precision, activation)
    if m_bucket(M) >= 1024:
        return tiles[0]
    return next((t for t in tiles if t[0] == 64), tiles[-1])


def _config(tile: tuple[int, int, int, int, int], group_m: int = 8) -> triton.Config:
    bm, bn, bk, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=w, num_stages=s)


def _tile(c: triton.Config) -> tuple[int, int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def gemm_tiles(dtype: torch.dtype, dot_precision: str, activation: int) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries for this operand dtype, dot
    precision ("ieee" / "tf32", only read for fp32) and activation code; the interpreter tile under
    TRITON_INTERPRET=1."""
    if interpreter_on():
        return [_INTERPRETER_TILE]
    operands = dot_precision if dtype == torch.float32 else "16bit"
    return _TILES[operands, activation != ACT_NONE]


def _autotune_configs() -> list[triton.Config]:
    """Every config the GEMM may use (the union of `_TILES`); `_prune` picks the launch's list."""
    if interpreter_on():
        return [_config(_INTERPRETER_TILE, group_m=4)]
    return [_config(t) for t in dict.fromkeys(t for tiles in _TILES.values() for t in tiles)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """`early_config_prune`: keep the configs of the launch's operand dtype (x's), precision and activation.

    Why a prune function rather than one autotuned wrapper per list: one kernel object, an unchanged launcher,
    and `kernels.aot_check` calls this same function to compile exactly what will be tried."""
    wanted = set(gemm_tiles(named_args["x_ptr"].dtype, kwargs["DOT_PRECISION"], kwargs["ACTIVATION"]))
    return [c for c in configs if _tile(c) in wanted]


@triton.jit
def _gelu_erf(z):
    # 0.5 z (1 + erf(z / sqrt 2)), as torch.nn.functional.gelu(approximate="none")
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_tanh(z):
    # 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3), as gelu(approximate="tanh"); written as
    # z · sigmoid(2u) because 0.5 (1 + tanh(u)) = sigmoid(2u), which never overflows or cancels.
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _mma_step(acc, x_ptrs, w_ptrs, offs_k, k_left, mask_m, mask_n, DOT_PRECISION: tl.constexpr):
    # One BLOCK_K slice of the K loop; the K tail (k_left < BLOCK_K) loads zeros.
    mask_k = offs_k < k_left
    a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
    b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BK, BN)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# Key: the bucketed row count (`m_bucket`, never M itself), N and K, and the launch switches the config lists
# depend on; Triton appends every tensor argument's dtype to the key itself. M_BUCKET is not read by the kernel.
@triton.autotune(
    configs=_autotune_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "STORE_PRE", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_bias_act_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, y1_ptr, y2_ptr, pre_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym,
    split_n,  # with SPLIT: column c -> output c // split_n (y, y1, y2), column c % split_n
    ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: consecutive programs walk GROUP_M row-tiles down one column band, so the band of W
    # they share is reused from L2 instead of re-read from HBM.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M x K and M x N can pass 2**31 elements at BERT-large batch sizes.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN) = Wᵀ

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _mma_step(acc, x_ptrs, w_ptrs, offs_k, K - k0, mask_m, mask_n, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue, all in fp32: bias, optional pre-activation store, activation, one rounding on the store.
    bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = acc + bias[None, :]

    out_mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None] * stride_ym
    if SPLIT:
        # The three outputs are separate allocations: pick the base pointer per column.
        slab = (offs_n // split_n)[None, :]
        offs = rows + (offs_n % split_n)[None, :]
        y_ptrs = tl.where(slab == 0, y_ptr + offs, tl.where(slab == 1, y1_ptr + offs, y2_ptr + offs))
    else:
        offs = rows + offs_n[None, :]
        y_ptrs = y_ptr + offs
    if STORE_PRE:
        tl.store(pre_ptr + offs, z.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if ACTIVATION == 1:
        z = _gelu_erf(z)
    elif ACTIVATION == 2:
        z = _gelu_tanh(z)
    tl.store(y_ptrs, z.to(y_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------ TMA + persistent variant (Hopper)
# The same GEMM + epilogue for unsplit outputs (linear+GELU, the packed QKV buffer), written for sm_90: operands
# arrive through TMA tensor descriptors (hardware address generation and bounds: no masks, no cp.async), one
# program per SM walks the output tiles (persistent; grouped order as above), and the outputs leave through TMA
# stores. Compile-time evidence (sm_90, ptxas of the triton wheel; not a timing): every tile below lowers to
# wgmma with TMA loads and stores only (cp.async.bulk.tensor, no cp.async), no C7515 warning, no spills,
# 93-186 registers, 82-164 KB of shared memory. Exact fp32 ("ieee") has no TMA tiles: the cp.async kernel's.
# Interpreter: host TensorDescriptors run there too (numpy), so the CPU tests exercise this kernel's source.
_TMA_TILES: dict[tuple[str, bool], list[tuple[int, int, int, int, int]]] = {
    ("16bit", False): [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
    ("16bit", True): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
    ("tf32", False): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)],
    ("tf32", True): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)],
}  # fmt: skip
_TMA_INTERPRETER_TILE = (32, 32, 32, 4, 3)


def tma_tiles(dtype: torch.dtype, dot_precision: str, activation: int) -> list[tuple[int, int, int, int, int]]:
    """Tiles the TMA kernel's autotuner tries (the interpreter tile under TRITON_INTERPRET=1)."""
    if interpreter_on():
        return [_TMA_INTERPRETER_TILE]
    operands = dot_precision if dtype == torch.float32 else "16bit"
    return _TMA_TILES[operands, activation != ACT_NONE]


def _set_tma_blocks(nargs: dict) -> None:
    """Config pre-hook: the host descriptors' block shapes follow the config's tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["y_desc"].block_shape = [bm, bn]
    nargs["pre_desc"].block_shape = [bm, bn]


def _tma_config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    bm, bn, bk, w, st = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st,
                         pre_hook=_set_tma_blocks)  # fmt: skip


def _tma_autotune_configs() -> list[triton.Config]:
    if interpreter_on():
        return [_tma_config(_TMA_INTERPRETER_TILE)]
    return [_tma_config(t) for t in dict.fromkeys(t for tiles in _TMA_TILES.values() for t in tiles)]


def _tma_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    wanted = set(tma_tiles(named_args["x_desc"].base.dtype, kwargs["DOT_PRECISION"], kwargs["ACTIVATION"]))
    return [c for c in configs if _tile(c) in wanted]


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # The grouped order of `_gemm_bias_act_kernel`, for a persistent program's tile index.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.autotune(
    configs=_tma_autotune_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "STORE_PRE", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _tma_prune},
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_tma_persistent_kernel(
    x_desc, w_desc, b_ptr, y_desc, pre_desc,
    M, N, K, M_BUCKET,
    ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):  # fmt: skip
    # x_desc [M, K] and w_desc [N, K] (nn.Linear layout: the B tile is loaded as [BLOCK_N, BLOCK_K] and used
    # transposed); out-of-range rows/columns load as zeros and are clipped on store by the TMA unit.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])  # (BM, BK)
            b = w_desc.load([off_n, ki * BLOCK_K])  # (BN, BK)
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        cols = off_n + tl.arange(0, BLOCK_N)
        z = acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            pre_desc.store([off_m, off_n], z.to(pre_desc.dtype))
        if ACTIVATION == 1:
            z = _gelu_erf(z)
        elif ACTIVATION == 2:
            z = _gelu_tanh(z)
        y_desc.store([off_m, off_n], z.to(y_desc.dtype))


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def tma_supported(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, pre: torch.Tensor | None) -> bool:
    """Whether the TMA kernel can take these operands: Triton with host descriptors, sm_90+ (or the
    interpreter), 16-byte aligned bases and row strides, unit column strides."""
    if TensorDescriptor is None:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if not interpreter_on() and _dot_precision(x.dtype) == "ieee" and x.dtype == torch.float32:
        return False  # exact fp32 (no tensor cores): the cp.async kernel's FMA tiles
    for t in (x, weight, out) if pre is None else (x, weight, out, pre):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def _gemm_tma(x, weight, bias, out, pre, activation: int) -> None:
    M, K = x.shape
    N = weight.shape[0]
    # Placeholder block shapes: the config's pre-hook sets the real ones before every launch.
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [16, 16])
    w_desc = TensorDescriptor(weight, [N, K], [weight.stride(0), 1], [16, 16])
    y_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [16, 16])
    pre_desc = y_desc if pre is None else TensorDescriptor(pre, [M, N], [pre.stride(0), 1], [16, 16])
    num_sms = _num_sms(x.device)
    grid = lambda meta: (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    precision = _dot_precision(x.dtype)
    args = (x_desc, w_desc, bias, y_desc, pre_desc, M, N, K, m_bucket(M))
    switches = dict(ACTIVATION=activation, STORE_PRE=pre is not None, DOT_PRECISION=precision, NUM_SMS=num_sms)
    if _fixed_autotune():
        tile = tma_tiles(x.dtype, precision, activation)[0 if m_bucket(M) >= 1024 else -1]
        config = _tma_config(tile)
        config.pre_hook({"x_desc": x_desc, "w_desc": w_desc, "y_desc": y_desc, "pre_desc": pre_desc, **config.kwargs})
        bm, bn = tile[0], tile[1]
        _gemm_tma_persistent_kernel.fn[(min(num_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)](
            *args, **switches, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
        return
    _gemm_tma_persistent_kernel[grid](*args, **switches)


def gemm_dispatch(*tensors: torch.Tensor) -> bool:
    """`kernels._common.use_triton`, except bf16 on the CPU: Triton's interpreter computes bf16 ``tl.dot``
    wrongly, so that case takes the PyTorch reference, with a warning."""
    if not use_triton(*tensors):
        return False
    if tensors[0].dtype == torch.bfloat16 and tensors[0].device.type == "cpu":
        warnings.warn(
            "bf16 GEMM under Triton's interpreter is unsupported (wrong tl.dot results): using the PyTorch "
            "reference instead",
            stacklevel=3,
        )
        return False
    return True


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


def gemm_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    activation: int = ACT_NONE,
    pre: torch.Tensor | None = None,
    tma: bool | None = None,
) -> None:
    """Launch ``out = act(x · weightᵀ + bias)`` into preallocated buffers (no checks: callers validate).

    x ``[M, K]`` and weight ``[N, K]`` with any strides; bias ``[N]`` contiguous. ``out`` (and ``pre``) is one
    ``[M, N]`` buffer with unit column stride, or a tuple of three contiguous ``[M, N // 3]`` buffers that
    receive column thirds 0, 1, 2 (no activation, no ``pre`` then). ``tma``: take the TMA + persistent kernel
    (True; it must be `tma_supported`), the cp.async kernel (False), or decide (None: TMA on CUDA sm_90+ when
    supported and the output is one buffer; never under the interpreter unless asked).
    """
    M, K = x.shape
    N = weight.shape[0]
    if isinstance(out, tuple):
        if pre is not None or activation != ACT_NONE:
            raise ValueError("the three-way split supports neither an activation nor the pre-activation")
        y0, y1, y2 = out
        split, split_n = True, N // 3
    else:
        y0 = y1 = y2 = out
        split, split_n = False, N
        if pre is not None and pre.stride() != out.stride():
            raise ValueError("pre must have the same strides as out")
    if M == 0 or N == 0:
        return
    if tma is None:
        tma = not split and x.is_cuda and tma_supported(x, weight, y0, pre)
    if tma:
        if split or not tma_supported(x, weight, y0, pre):
            raise ValueError("the TMA kernel needs one output buffer and 16-byte aligned operands")
        _gemm_tma(x, weight, bias, y0, pre, activation)
        return
    precision = _dot_precision(x.dtype)
    args = (
        x, weight, bias, y0, y1, y2, y0 if pre is None else pre,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        y0.stride(0),
        split_n,
    )  # fmt: skip
    switches = dict(ACTIVATION=activation, STORE_PRE=pre is not None, SPLIT=split, DOT_PRECISION=precision)
    if _fixed_autotune():
        bm, bn, bk, warps, stages = fixed_tile(x.dtype, precision, activation, M)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_bias_act_kernel.fn[grid](
            *args, **switches, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages
        )
        return
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _gemm_bias_act_kernel[grid](*args, **switches)


# GELU backward: dz = dy · gelu'(z), elementwise, used by the linear+GELU backward before its cuBLAS GEMMs.
#   erf:  gelu'(z) = Φ(z) + z φ(z) = 0.5 (1 + erf(z/√2)) + z exp(-z²/2) / √(2π)
#   tanh: with s = sigmoid(2u), u = √(2/π)(z + 0.044715 z³):  gelu'(z) = s + 2 z s (1 - s) u'(z),
#         u'(z) = √(2/π)(1 + 3·0.044715 z²)
# Bytes moved: 2 reads + 1 write of M·N elements.
@triton.jit
def _gelu_backward_kernel(dy_ptr, z_ptr, dz_ptr, n_elements, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        d = s + 2.0 * z * s * (1.0 - s) * du
    else:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(dz_ptr + offs, (dy * d).to(dz_ptr.dtype.element_ty), mask=mask)


def gelu_backward(dy: torch.Tensor, z: torch.Tensor, approximate: str) -> torch.Tensor:
    """``dy · gelu'(z)`` in the input dtype (fp32 math); dy and z contiguous with one shape."""
    dz = torch.empty_like(z)
    n = z.numel()
    if n:
        block = 1024
        _gelu_backward_kernel[(triton.cdiv(n, block),)](
            dy, z, dz, n, APPROX_TANH=approximate == "tanh", BLOCK=block, num_warps=4
        )
    return dz
