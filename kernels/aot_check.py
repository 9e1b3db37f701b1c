"""Compile every Triton kernel of `kernels/` ahead of time for a CUDA GPU, without a GPU.

    python -m kernels.aot_check [--arch 90] [--quick | --all | --gate [--family F] [--configs N] | --dropout-cost]
                                [--jobs N] [--kernel SUBSTRING] [--report PATH.json] [--csv PATH.csv] [--verbose]

Why: the CPU test-suite runs the kernels through Triton's interpreter, which accepts code the real
compiler rejects (and cannot run bf16 ``tl.dot`` at all). This script runs the real pipeline
(Triton → TTGIR → LLVM → PTX → ``ptxas``, the ptxas bundled in the triton wheel) for the target
architecture, sm_90 (H100/H200) by default, for each kernel in each constexpr variant its launcher uses,
and reports per variant: ok or the compile error, registers per thread, spills, shared memory against the
per-block limit, warps and stages. Exit status 1 on any compile error (or a fixed launch config over the
shared-memory limit), 0 otherwise.

What is compiled — the variants are read off the launchers (keep `_variants` in step with them):
- dtypes fp32 / fp16 / bf16 for the activation pointers; parameter pointers that may stay fp32 under
  autocast (LayerNorm γ/β and bias, the MLM decoder bias) also in fp32 beside fp16/bf16 activations;
- every boolean / code constexpr the launchers pass (ACTIVATION, STORE_PRE, SPLIT, DOT_PRECISION, VARLEN,
  HAS_MASK, HAS_DROPOUT, IEEE, FROM_SCORES, HAS_BIAS, HAS_RES, WRITE_GRAD, APPROX_TANH, NUM_SMS = 132) in
  the combinations the launchers produce — both GEMM kernels (cp.async `_gemm_bias_act_kernel`, and
  `_gemm_tma_persistent_kernel`, whose host TMA descriptors become ``tensordesc<fp16[BM, BK]>`` signature
  entries) and the cuBLAS path's GELU epilogue `_bias_gelu_kernel` (at N = 768 / 1024 / 3072 / 4096);
- every autotune config (block sizes, warps, stages) the kernel's autotuner keeps for that dtype / head dim /
  epilogue (its ``early_config_prune``, called here on stand-in tensors), or the launch-config rule's output at
  the BERT sizes: hidden 768 / 1024, head dim 32 / 64 / 128, sequence 128 / 512, vocabulary 30522.
How much of that space (see `QUICK`, `DEFAULT`, `ALL`): ``--quick`` — every kernel and dtype, the main
switch combination, the smallest autotune config (about 40 compiles, about a minute on two cores; what the
test-suite runs); the default — every autotune config × dtype × head dim for the main switch combinations,
every other combination with the smallest config (several hundred compiles, tens of minutes on two cores);
``--all`` — the full product; ``--gate`` — ``--family attention`` (the default): every shipped fp16 attention
config at head dims 32 / 64 / 128 with the training switches; ``--family gemm``: every shipped fp16 config of
both GEMM kernels in every launch combination (``--configs N``: the first N of each list, what the test-suite
runs; for the GEMM plus the fixed per-bucket table's tiles, QKV and training FFN-up launches); ``--dropout-cost``
— the attention configs at head dim 64 with dropout on and off. The report lists the problem rows and a
per-kernel summary; ``--verbose`` lists every variant.

What is read off the compiled code, per variant (compile-time evidence, not a time; see PERF.md):
- registers, spill bytes, shared memory (ptxas ``-v``), and every ptxas warning — notably C7515, "wgmma.mma_async
  instructions are serialized" (flag WGMMA-SERIALIZED);
- the tensor-core family and count from the PTX: ``wgmma.mma_async`` (Hopper) vs ``mma.sync`` (the Ampere path;
  flag MMA.SYNC for a 16-bit variant on sm_90) vs none (FMA loops, e.g. the IEEE fp32 dots);
- the copies from the PTX: TMA loads / stores (``cp.async.bulk.tensor``, shared / global destination) and
  ``cp.async`` (flag NO-TMA-LOADS or CP.ASYNC for a TMA kernel that lost them);
- SASS (the bundled nvdisasm, cuobjdump as a fallback): instructions of the kernel and of its main loop body —
  the longest span from a label to a branch back to it, NOPs excluded;
- duplicated work from the TTGIR layouts: a dot whose MMA layout gives two warps the same rows or columns
  (``warpsPerCTA`` [8, 1] on a 64-row tile: both warpgroups compute the same product; flag WARP-DUP);
- with pairs that differ only in HAS_DROPOUT (``--dropout-cost``): SASS main-loop instructions added by dropout
  per score element, (loop with − loop without) ÷ (BLOCK_M·BLOCK_N ÷ 32·num_warps).
``--report PATH.json`` writes one record per variant (kernel, dtype, constexprs, num_warps, num_stages, ok,
registers, spill_bytes = spill stores + spill loads, shared_bytes, wgmma, mma_sync, tma_loads, tma_stores,
cp_async, ptxas_warnings,
sass_instructions, sass_loop_instructions, plus shapes, warpgroup_dup, error) for any mode; ``--csv PATH.csv`` the
same as a small table (benchmarks/results/aot_sm90.csv holds the default mode's).

The signature is built from the kernel's own argument names plus the table `KERNELS` below (pointer
dtypes, float arguments, unit strides), the same types Triton's launcher derives from the real call:
Python ints → ``i32``, floats → ``fp32``, an int equal to 1 → the constant 1. Alignment hints (what the
launcher adds for 16-byte-aligned pointers and ints divisible by 16): every pointer is aligned (fresh
allocations; the q/k/v views into a packed QKV buffer are at multiples of 64 bytes), and every int is
a multiple of 16 except those listed as data-dependent in the table (token counts, heads, seeds, V).

Registers and spills come from ``ptxas -v`` (every variant is compiled afresh in a throw-away cache so its
log exists). Autotuned kernels: a config over the shared-memory limit is reported, not failed — the
autotuner skips configs that cannot launch. Must run without ``TRITON_INTERPRET=1`` (under the
interpreter ``@triton.jit`` functions are interpreter objects that cannot be compiled).

Caution: compiling is not running. This proves the kernels build and shows their resource use; numerical
correctness of the compiled code (bf16 above all) still needs a GPU run of the test-suite.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Max shared memory per block (opt-in), bytes, by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
ACT = "act"  # pointer placeholder: the variant's activation dtype
PARAM = "param"  # pointer placeholder: the variant's parameter dtype (fp32 master weights under autocast)
DTYPES = {"fp32": ("fp32",), "fp16": ("fp16", "fp32"), "bf16": ("bf16", "fp32")}  # act -> param dtypes
HEAD_DIMS = (64, 32, 128)  # first = the one --quick uses
SEQ_LENS = (128, 512)
HIDDEN = (768, 1024)
VOCAB = 30522


def _if(flag: str, yes: str, no: str) -> Callable[[dict], str]:
    """Pointer dtype that depends on a constexpr switch (launchers pass a dummy tensor when it is off)."""
    return lambda c: yes if c[flag] else no


# ----------------------------------------------------------------------------------------------------------
# The table: per kernel, what the arg names alone do not say
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """`pointers`: arg → ACT, PARAM, a fixed "*fp32"/"*i32"/"*i64"/"*u8", or a function of the constexprs.
    `floats`: fp32 scalars. `unit`: ints that are 1 at every launch (unit strides: Triton makes them the
    constant 1). `data_dependent`: ints without the divisible-by-16 hint. Every other non-constexpr arg is
    an ``i32`` that the launcher sees as a multiple of 16 at BERT sizes. `descriptors`: host TMA tensor
    descriptors (`triton.tools.tensor_descriptor.TensorDescriptor`) of the activation dtype, arg → the two
    constexprs that give its block shape (the launcher's config pre-hook sets it): signature
    ``tensordesc<fp16[BLOCK_M, BLOCK_K]>``, the spelling Triton's JIT gives a host descriptor."""

    module: str
    name: str
    pointers: dict[str, str | Callable[[dict], str]]
    floats: tuple[str, ...] = ()
    unit: tuple[str, ...] = ()
    data_dependent: tuple[str, ...] = ()
    descriptors: dict[str, tuple[str, str]] = field(default_factory=dict)


_MASK_PTR = _if("HAS_MASK", "*u8", ACT)  # bool mask viewed as uint8, else q / scores as a dummy
_CU_PTR = _if("VARLEN", "*i32", ACT)  # cu_seqlens, else q as a dummy
_ATTN_INTS = ("H", "Tq", "Tk", "sl_b", "sl_h")  # heads; lengths vary with the batch
# The autotuned attention kernels (each in `KERNELS`).
ATTN_TUNED = ("_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")

KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec(
            "kernels.matmul", "_gemm_bias_act_kernel",
            {p: ACT for p in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "y1_ptr", "y2_ptr", "pre_ptr")},
            unit=("stride_xk", "stride_wk"), data_dependent=("M",),
        ),
        KernelSpec(
            "kernels.matmul", "_gemm_tma_persistent_kernel", {"b_ptr": ACT}, data_dependent=("M",),
            descriptors={"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"),
                         "y_desc": ("BLOCK_M", "BLOCK_N"), "pre_desc": ("BLOCK_M", "BLOCK_N")},
        ),
        KernelSpec("kernels.matmul", "_gelu_backward_kernel", {"dy_ptr": ACT, "z_ptr": ACT, "dz_ptr": ACT}),
        KernelSpec(
            "kernels.bias_gelu", "_bias_gelu_kernel",
            {"x_ptr": ACT, "b_ptr": ACT, "y_ptr": ACT, "pre_ptr": ACT}, data_dependent=("M",),
        ),
        KernelSpec(
            "kernels.attention", "_attn_fwd_kernel",
            {"Q": ACT, "K": ACT, "V": ACT, "O": ACT, "LSE": "*fp32", "KEEP_KEY": _MASK_PTR, "CU": _CU_PTR},
            floats=("qk_scale", "inv_keep"), data_dependent=_ATTN_INTS,
        ),
        KernelSpec(
            "kernels.attention", "_attn_bwd_delta_kernel",
            {"O": ACT, "DO": ACT, "DELTA": "*fp32", "CU": _CU_PTR},
            data_dependent=("H", "Tq", "sl_b", "sl_h"),
        ),
        KernelSpec(
            "kernels.attention", "_attn_bwd_kernel",
            {"Q": ACT, "K": ACT, "V": ACT, "DO": ACT, "LSE": "*fp32", "DELTA": "*fp32", "DK": ACT, "DV": ACT,
             "DQ": "*fp32", "KEEP_KEY": _MASK_PTR, "CU": _CU_PTR},
            floats=("qk_scale", "sm_scale", "inv_keep"), data_dependent=_ATTN_INTS,
        ),
        KernelSpec(
            "kernels.attention", "_attn_bwd_dkdv_kernel",
            {"Q": ACT, "K": ACT, "V": ACT, "DO": ACT, "LSE": "*fp32", "DELTA": "*fp32", "DK": ACT, "DV": ACT,
             "KEEP_KEY": _MASK_PTR, "CU": _CU_PTR},
            floats=("qk_scale", "sm_scale", "inv_keep"), data_dependent=_ATTN_INTS,
        ),
        KernelSpec(
            "kernels.attention", "_attn_bwd_dq_kernel",
            {"Q": ACT, "K": ACT, "V": ACT, "DO": ACT, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ACT,
             "KEEP_KEY": _MASK_PTR, "CU": _CU_PTR},
            floats=("qk_scale", "sm_scale", "inv_keep"), data_dependent=_ATTN_INTS,
        ),
        KernelSpec(
            "kernels.softmax_dropout", "_softmax_dropout_fwd_kernel",
            {"X": ACT, "Y": ACT, "KEEP_KEY": _MASK_PTR},
            floats=("scale_log2e", "inv_keep"),
            data_dependent=("H", "Tq", "Tk", "sx_b", "sx_h", "sx_q"),
        ),
        KernelSpec(
            "kernels.softmax_dropout", "_softmax_dropout_bwd_kernel",
            {"DY": ACT, "SRC": ACT, "DX": ACT, "KEEP_KEY": _MASK_PTR},
            floats=("scale", "scale_log2e", "inv_keep"),
            data_dependent=("H", "Tq", "Tk", "ss_b", "ss_h", "ss_q"),
        ),
        KernelSpec(
            "kernels.bias_dropout_add_layernorm", "_bdaln_fwd_kernel",
            {"x_ptr": ACT, "bias_ptr": _if("HAS_BIAS", PARAM, ACT), "res_ptr": ACT, "gamma_ptr": PARAM,
             "beta_ptr": PARAM, "y_ptr": ACT, "mean_ptr": "*fp32", "rstd_ptr": "*fp32"},
            floats=("p", "scale", "eps"), data_dependent=("N", "seed"),
        ),
        KernelSpec(
            "kernels.bias_dropout_add_layernorm", "_bdaln_bwd_kernel",
            {"dy_ptr": ACT, "x_ptr": ACT, "bias_ptr": _if("HAS_BIAS", PARAM, ACT), "res_ptr": ACT,
             "gamma_ptr": PARAM, "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": ACT, "dres_ptr": ACT,
             "dgamma_part_ptr": "*fp32", "dbeta_part_ptr": "*fp32", "dbias_part_ptr": "*fp32"},
            floats=("p", "scale"), data_dependent=("N", "seed", "tiles_per_prog"),
        ),
        KernelSpec(
            "kernels.mlm_cross_entropy", "_ce_chunk_kernel",
            {"logits_ptr": ACT, "bias_ptr": PARAM, "labels_ptr": "*i64", "loss_ptr": "*fp32",
             "correct_ptr": "*i32"},
            data_dependent=("V", "stride_row"),
        ),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Variants: what each launcher passes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    kernel: str
    act: str  # activation dtype, "fp32" / "fp16" / "bf16"
    param: str  # parameter dtype
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3  # Triton's default when the launcher passes none
    shapes: str = ""  # the sizes whose launch rule gives this variant

    def label(self) -> str:
        dt = self.act if self.param == self.act else f"{self.act}/{self.param}"
        switches = " ".join(f"{k}={_short(v)}" for k, v in self.constexprs.items())
        return f"{dt} {switches}" + (f" [{self.shapes}]" if self.shapes else "")


def _short(v: object) -> str:
    return {True: "1", False: "0"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def _module(spec: KernelSpec):
    return importlib.import_module(spec.module)


# How much of the launch space to compile:
#   quick    every kernel and dtype, the main switch combination, the smallest autotune config;
#   default  every autotune config × every dtype × every head dim for the main switch combinations, and every
#            other combination the launchers produce with the smallest config, at head dim 64;
#   all      the full product (about an hour on two cores).
QUICK, DEFAULT, ALL = "quick", "default", "all"


_TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "u8": "uint8", "i32": "int32",
                "i64": "int64"}  # fmt: skip


def _stand_in_args(spec: KernelSpec, act: str, constexprs: dict) -> dict:
    """Empty CPU tensors of the launch's pointer dtypes, by arg name: what an `early_config_prune` reads."""
    import types

    import torch

    args = {}
    for name, ty in spec.pointers.items():
        ty = ty(constexprs) if callable(ty) else ty
        ty = act if ty in (ACT, PARAM) else ty.lstrip("*")  # autotuned kernels: parameters share the act dtype
        args[name] = torch.empty(0, dtype=getattr(torch, _TORCH_DTYPE[ty]))
    for name in spec.descriptors:  # a host TensorDescriptor's prune-relevant part: its base tensor
        args[name] = types.SimpleNamespace(base=torch.empty(0, dtype=getattr(torch, _TORCH_DTYPE[act])))
    return args


def _autotune_configs(name: str, smallest: bool, act: str, constexprs: dict) -> list[tuple[dict, int, int]]:
    """(block constexprs, num_warps, num_stages) of every autotune config kernel `name` tries for a launch with
    activation dtype `act` and these switch constexprs, or of the smallest one (fewest tile elements: it compiles
    fastest). The configs come from the kernel's own autotuner, through its `early_config_prune` (the per-dtype /
    head-dim / epilogue lists of the launchers) when it has one: what is compiled is what will be tried."""
    spec = KERNELS[name]
    tuner = getattr(_module(spec), spec.name)
    configs = tuner.configs
    if tuner.early_config_prune is not None:
        configs = tuner.early_config_prune(configs, _stand_in_args(spec, act, constexprs), **constexprs)
    if smallest and configs:  # an empty list: the launcher never runs the kernel for this launch
        configs = [min(configs, key=lambda c: (math.prod(c.kwargs.values()), c.num_warps, c.num_stages))]
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def _tuned(name: str, combos: list[dict], n_main: int, n_quick: int, mode: str, dims: list[dict],
           switches: Callable[[dict, dict], dict]):  # fmt: skip
    """(switch constexprs, dim, config) triples for autotuned kernel `name`. `combos[:n_main]` are the main
    switch combinations (`combos[:n_quick]` in quick mode); `dims` are the other per-launch choices (dtype, head
    dim), those with ``_main=False`` compiled only with the main combinations in the default mode;
    `switches(combo, dim)` gives the launch's non-block constexprs."""
    for i, combo in enumerate(combos[:n_quick] if mode == QUICK else combos):
        main = i < n_main
        for dim in dims:
            if mode == DEFAULT and not main and dim.get("_main") is False:
                continue
            constexprs = switches(combo, dim)
            smallest = mode == QUICK or (mode == DEFAULT and not main)
            for config in _autotune_configs(name, smallest, dim["dt"], constexprs):
                yield constexprs, dim, config


# The TMA + persistent GEMM's NUM_SMS constexpr: the launcher passes the device's SM count (H100 SXM / H200: 132).
NUM_SMS_SM90 = 132


def _gemm_variants(mode: str) -> Iterator[Variant]:
    # qkv_projection: three-way split, no activation; linear_bias_gelu: GELU erf/tanh, pre-activation
    # stored when training. fp32 uses IEEE unless torch's float32 matmul precision allows TF32. The unsplit
    # launches (packed QKV buffer, linear+GELU) take this kernel when the TMA kernel cannot (exact fp32, operands
    # not 16-byte aligned); the packed-QKV one (no activation, unsplit) is the last combination.
    combos = [dict(ACTIVATION=0, STORE_PRE=False, SPLIT=True), dict(ACTIVATION=1, STORE_PRE=True, SPLIT=False),
              dict(ACTIVATION=2, STORE_PRE=True, SPLIT=False), dict(ACTIVATION=1, STORE_PRE=False, SPLIT=False),
              dict(ACTIVATION=2, STORE_PRE=False, SPLIT=False),
              dict(ACTIVATION=0, STORE_PRE=False, SPLIT=False)]  # fmt: skip
    dims = [dict(dt="fp32", DOT_PRECISION="ieee"), dict(dt="fp16", DOT_PRECISION="tf32"),
            dict(dt="bf16", DOT_PRECISION="tf32"), dict(dt="fp32", DOT_PRECISION="tf32", _main=False)]  # fmt: skip
    launch_switches = lambda combo, dim: {**combo, "DOT_PRECISION": dim["DOT_PRECISION"]}
    dims = dims[:3] if mode == QUICK else dims
    for constexprs, dim, (blocks, warps, stages) in _tuned("_gemm_bias_act_kernel", combos, 2, 2, mode, dims,
                                                           launch_switches):  # fmt: skip
        yield Variant("_gemm_bias_act_kernel", dim["dt"], dim["dt"], {**constexprs, **blocks}, warps, stages)
    yield from _gemm_tma_variants(mode)


def _gemm_tma_variants(mode: str) -> Iterator[Variant]:
    # `gemm_bias_act` on sm_90 with one output buffer: linear+GELU (pre-activation stored when training) and the
    # packed QKV buffer (no activation); never exact fp32 (`tma_supported`), so fp32 only with TF32.
    combos = [dict(ACTIVATION=1, STORE_PRE=True), dict(ACTIVATION=0, STORE_PRE=False),
              dict(ACTIVATION=2, STORE_PRE=True), dict(ACTIVATION=1, STORE_PRE=False),
              dict(ACTIVATION=2, STORE_PRE=False)]  # fmt: skip
    dims = [dict(dt="fp16"), dict(dt="bf16"), dict(dt="fp32", _main=False)]
    launch_switches = lambda combo, dim: {**combo, "DOT_PRECISION": "tf32", "NUM_SMS": NUM_SMS_SM90}
    for constexprs, dim, (blocks, warps, stages) in _tuned("_gemm_tma_persistent_kernel", combos, 2, 1, mode, dims,
                                                           launch_switches):  # fmt: skip
        yield Variant("_gemm_tma_persistent_kernel", dim["dt"], dim["dt"], {**constexprs, **blocks}, warps, stages)


# The N of the cuBLAS path's GELU epilogue at BERT sizes: FFN up (4·hidden) and the MLM transform (hidden).
BIAS_GELU_N = (3072, 4096, 768, 1024)


def _bias_gelu_variants(mode: str) -> Iterator[Variant]:
    from kernels.bias_gelu import _launch_config

    # (HAS_BIAS, STORE_PRE): after torch.addmm (linear_bias_gelu: cuBLASLt added the bias) first; the public
    # bias_gelu with a bias in training (stores x + b) and in inference.
    combos = [(False, False), (True, True), (True, False)]
    by_config: dict[tuple[int, int, int], list[int]] = {}
    for n in BIAS_GELU_N:  # sizes whose launch rule gives the same blocks compile to one variant
        by_config.setdefault(_launch_config(n), []).append(n)
    for dt, act in itertools.product(DTYPES, (1,) if mode == QUICK else (1, 2)):
        for bias, pre in combos[:1] if mode == QUICK else combos:
            for (block_m, block_n, warps), sizes in by_config.items():
                constexprs = dict(ACTIVATION=act, HAS_BIAS=bias, STORE_PRE=pre, BLOCK_M=block_m, BLOCK_N=block_n)
                yield Variant("_bias_gelu_kernel", dt, dt, constexprs, warps, shapes="N=" + ",".join(map(str, sizes)))


def _gelu_bwd_variants(mode: str) -> Iterator[Variant]:
    for dt, tanh in itertools.product(DTYPES, (False,) if mode == QUICK else (False, True)):
        yield Variant("_gelu_backward_kernel", dt, dt, dict(APPROX_TANH=tanh, BLOCK=1024), num_warps=4)


def _attn_variants(mode: str) -> Iterator[Variant]:
    # (VARLEN, HAS_MASK, HAS_DROPOUT) the launchers produce (varlen calls never have a mask); the main ones:
    # padded with key padding and dropout, and varlen with dropout (training).
    switches = [(False, True, True), (True, False, True), (False, False, True), (False, True, False),
                (False, False, False), (True, False, False)]  # fmt: skip
    combos = [dict(VARLEN=varlen, HAS_MASK=mask, HAS_DROPOUT=drop) for varlen, mask, drop in switches]
    head_dims = HEAD_DIMS[:1] if mode == QUICK else HEAD_DIMS
    dims = [dict(dt=dt, d=d, _main=d == HEAD_DIMS[0]) for d in head_dims for dt in DTYPES]
    launch_switches = lambda combo, dim: {**combo, "IEEE": dim["dt"] == "fp32", "BLOCK_D": dim["d"]}
    for name in ATTN_TUNED:
        for constexprs, dim, (blocks, warps, stages) in _tuned(name, combos, 2, 1, mode, dims, launch_switches):
            yield Variant(name, dim["dt"], dim["dt"], {**constexprs, **blocks}, warps, stages, shapes=f"d={dim['d']}")
    # delta pass: fixed launch (BLOCK_M = 64, default warps and stages)
    for dt, d, varlen in itertools.product(DTYPES, head_dims, (False,) if mode == QUICK else (False, True)):
        yield Variant("_attn_bwd_delta_kernel", dt, dt, dict(VARLEN=varlen, BLOCK_M=64, BLOCK_D=d), shapes=f"d={d}")


def _attn_shipped(dt: str, head_dims: tuple[int, ...], switch_sets: list[dict], first: int = 0) -> Iterator[Variant]:
    """Every autotune config (the first `first` of each list when > 0) of every autotuned attention kernel for
    `dt`, per head dim and switch set."""
    for name, d, switches in itertools.product(ATTN_TUNED, head_dims, switch_sets):
        constexprs = {**switches, "IEEE": dt == "fp32", "BLOCK_D": d}
        configs = _autotune_configs(name, False, dt, constexprs)
        for blocks, warps, stages in configs[:first] if first > 0 else configs:
            yield Variant(name, dt, dt, {**constexprs, **blocks}, warps, stages, shapes=f"d={d}")


GATE_FAMILIES = ("attention", "gemm")


def _gate_variants(first: int = 0, family: str = "attention") -> Iterator[Variant]:
    """What the CPU tests gate on, for sm_90, fp16 (bf16 lowers the same way); `first` > 0: only the first
    configs of each list (the test-suite's budget). ``attention``: every shipped attention config, the training
    switches (key padding + dropout), head dims 32 / 64 / 128. ``gemm``: every shipped config of both GEMM
    kernels (cp.async and TMA + persistent) for every switch combination their launchers pass; with `first` > 0
    the QKV launch (no activation) and the training FFN-up launch (erf GELU, pre-activation stored) only, with
    the first configs plus the tiles of the fixed per-bucket table (`fixed_tile`, the TMA launch's fixed rule)."""
    if family not in GATE_FAMILIES:
        raise ValueError(f"family must be one of {GATE_FAMILIES}, got {family!r}")
    if family == "attention":
        yield from _attn_shipped("fp16", (32, 64, 128), [dict(VARLEN=False, HAS_MASK=True, HAS_DROPOUT=True)], first)
    else:
        yield from _gemm_shipped("fp16", first)


def _gemm_shipped(dt: str, first: int = 0) -> Iterator[Variant]:
    import torch

    from kernels.matmul import fixed_tile, tma_tiles

    tdt = getattr(torch, _TORCH_DTYPE[dt])
    cp_combos = [dict(ACTIVATION=0, STORE_PRE=False, SPLIT=True), dict(ACTIVATION=1, STORE_PRE=True, SPLIT=False)]
    tma_combos = [dict(ACTIVATION=0, STORE_PRE=False), dict(ACTIVATION=1, STORE_PRE=True)]
    if first <= 0:  # every combination the launchers pass
        cp_combos += [dict(ACTIVATION=a, STORE_PRE=pre, SPLIT=False) for a, pre in ((2, True), (1, False), (2, False))]
        cp_combos.append(dict(ACTIVATION=0, STORE_PRE=False, SPLIT=False))
        tma_combos += [dict(ACTIVATION=a, STORE_PRE=pre) for a, pre in ((2, True), (1, False), (2, False))]
    precision = "ieee" if dt == "fp32" else "tf32"
    kernels = (("_gemm_bias_act_kernel", cp_combos, {}), ("_gemm_tma_persistent_kernel", tma_combos,
                                                          {"NUM_SMS": NUM_SMS_SM90}))  # fmt: skip
    for name, combos, extra in kernels:
        for combo in combos:
            constexprs = {**combo, "DOT_PRECISION": precision, **extra}
            configs = _autotune_configs(name, False, dt, constexprs)
            if first > 0:
                act = combo["ACTIVATION"]
                if name == "_gemm_tma_persistent_kernel":
                    fixed = {tuple(t) for t in (tma_tiles(tdt, precision, act)[i] for i in (0, -1))}
                else:
                    fixed = {fixed_tile(tdt, precision, act, m) for m in (8192, 64)}
                tile = lambda c: (c[0]["BLOCK_M"], c[0]["BLOCK_N"], c[0]["BLOCK_K"], c[1], c[2])
                configs = [c for i, c in enumerate(configs) if i < first or tile(c) in fixed]
            for blocks, warps, stages in configs:
                yield Variant(name, dt, dt, {**constexprs, **blocks}, warps, stages)


def _dropout_cost_variants() -> Iterator[Variant]:
    """The shipped fp16 attention configs at head dim 64, padded layout with key padding, dropout on and off:
    the pairs `dropout_costs` reads."""
    switch_sets = [dict(VARLEN=False, HAS_MASK=True, HAS_DROPOUT=drop) for drop in (True, False)]
    yield from _attn_shipped("fp16", (64,), switch_sets)


def _softmax_variants(mode: str) -> Iterator[Variant]:
    from kernels.softmax_dropout import _launch_shape

    switches = [(True, True)] if mode == QUICK else list(itertools.product((True, False), repeat=2))
    for dt, T, (mask, drop) in itertools.product(DTYPES, SEQ_LENS[:1] if mode == QUICK else SEQ_LENS, switches):
        block_r, block_n, warps = _launch_shape(T, T)
        blocks = dict(BLOCK_R=block_r, BLOCK_N=block_n)
        yield Variant("_softmax_dropout_fwd_kernel", dt, dt, dict(HAS_MASK=mask, HAS_DROPOUT=drop, **blocks), warps,
                      shapes=f"T={T}")  # fmt: skip
        # backward saves the scores (recomputes P) exactly when there is dropout
        constexprs = dict(FROM_SCORES=drop, HAS_MASK=mask, HAS_DROPOUT=drop, **blocks)
        yield Variant("_softmax_dropout_bwd_kernel", dt, dt, constexprs, warps, shapes=f"T={T}")


def _dtype_pairs(mode: str) -> Iterator[tuple[str, str]]:
    """(activation, parameter) dtypes: fp32 parameters beside fp16/bf16 activations too (autocast)."""
    for act, params in DTYPES.items():
        for param in params[:1] if mode == QUICK else params:
            yield act, param


def _bdaln_variants(mode: str) -> Iterator[Variant]:
    from kernels.bias_dropout_add_layernorm import _launch_config

    # (HAS_BIAS, HAS_RES, HAS_DROPOUT): sub-layer tail in training and in eval; MLM-transform LayerNorm.
    combos = [(True, True, True), (True, True, False), (False, False, False)]
    for dt, param in _dtype_pairs(mode):
        for bias, res, drop in combos[:1] if mode == QUICK else combos:
            for name, backward in (("_bdaln_fwd_kernel", False), ("_bdaln_bwd_kernel", True)):
                # Hidden sizes whose launch rule gives the same blocks compile to one variant.
                by_config: dict[tuple[int, int, int], list[int]] = {}
                for H in HIDDEN:
                    by_config.setdefault(_launch_config(H, backward), []).append(H)
                for (block_h, block_m, warps), sizes in by_config.items():
                    constexprs = dict(HAS_BIAS=bias, HAS_RES=res, HAS_DROPOUT=drop, BLOCK_M=block_m, BLOCK_H=block_h)
                    yield Variant(name, dt, param, constexprs, warps, shapes="H=" + ",".join(map(str, sizes)))


def _ce_variants(mode: str) -> Iterator[Variant]:
    from kernels.mlm_cross_entropy import BLOCK_V_MAX, NUM_WARPS

    block_v = min(BLOCK_V_MAX, 1 << (VOCAB - 1).bit_length())  # as the launcher: next power of two, capped
    for dt, param in _dtype_pairs(mode):
        for grad in (True,) if mode == QUICK else (True, False):
            constexprs = dict(WRITE_GRAD=grad, BLOCK_V=block_v)
            yield Variant("_ce_chunk_kernel", dt, param, constexprs, NUM_WARPS, shapes=f"V={VOCAB}")


def _variants(mode: str) -> list[Variant]:
    groups = (_gemm_variants, _gelu_bwd_variants, _bias_gelu_variants, _attn_variants, _softmax_variants,
              _bdaln_variants, _ce_variants)  # fmt: skip
    return [v for group in groups for v in group(mode)]


# ----------------------------------------------------------------------------------------------------------
# Signature from the arg names + the table
# ----------------------------------------------------------------------------------------------------------


def _jit_function(spec: KernelSpec):
    obj = getattr(_module(spec), spec.name)
    fn = obj.fn if hasattr(obj, "configs") else obj  # triton.autotune wraps the JITFunction
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{spec.name} is not a JITFunction ({type(fn).__name__}): is TRITON_INTERPRET=1 set?")
    return fn


def build_source_args(v: Variant) -> tuple[object, dict, dict, dict]:
    """(JITFunction, signature, constexprs, attrs) for `triton.compiler.ASTSource`, as the launcher's call
    would specialise them. Raises ValueError when the table or the variant disagrees with the kernel."""
    spec = KERNELS[v.kernel]
    fn = _jit_function(spec)
    names = [p.name for p in fn.params]
    declared = set(spec.pointers) | set(spec.floats) | set(spec.unit) | set(spec.data_dependent) | set(spec.descriptors)
    if unknown := declared - set(names):
        raise ValueError(f"{v.kernel}: the table names args the kernel does not have: {sorted(unknown)}")
    wanted = {p.name for p in fn.params if p.is_constexpr}
    if wanted != set(v.constexprs):
        raise ValueError(f"{v.kernel}: constexprs {sorted(v.constexprs)} != the kernel's {sorted(wanted)}")
    dtype = {ACT: f"*{v.act}", PARAM: f"*{v.param}"}
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v.constexprs[name]
        elif name in spec.descriptors:
            rows, cols = (v.constexprs[c] for c in spec.descriptors[name])
            signature[name] = f"tensordesc<{v.act}[{rows}, {cols}]>"
        elif name in spec.pointers:
            ty = spec.pointers[name]
            ty = ty(v.constexprs) if callable(ty) else ty
            signature[name] = dtype.get(ty, ty)
            attrs[(p.num,)] = aligned
        elif name in spec.floats:
            signature[name] = "fp32"
        elif name in spec.unit:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name not in spec.data_dependent and not p.do_not_specialize:
                attrs[(p.num,)] = aligned
    return fn, signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------------------
# Compiling (in worker processes) and reporting
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    variant: Variant
    ok: bool
    error: str = ""
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    flags: list[str] = field(default_factory=list)
    wgmma: int = 0  # `wgmma.mma_async` instructions in the PTX (Hopper tensor cores)
    mma_sync: int = 0  # `mma.sync` instructions in the PTX (the Ampere tensor-core path)
    tma_loads: int = 0  # `cp.async.bulk.tensor` global → shared instructions in the PTX (TMA loads)
    tma_stores: int = 0  # `cp.async.bulk.tensor` shared → global (TMA stores)
    cp_async: int = 0  # `cp.async.ca` / `cp.async.cg` (the pre-TMA asynchronous copies)
    ptxas_warnings: list[str] = field(default_factory=list)
    sass_instructions: int | None = None  # SASS instructions of the kernel (NOPs excluded)
    sass_loop_instructions: int | None = None  # of its main loop body (the largest backward-branch span)
    warpgroup_dup: list[str] = field(default_factory=list)  # MMA layouts that give warps the same rows/columns

    def record(self) -> dict:
        """The JSON record of `--report`: one per variant."""
        v = self.variant
        return {
            "kernel": v.kernel, "dtype": v.act, "param_dtype": v.param, "constexprs": dict(v.constexprs),
            "num_warps": v.num_warps, "num_stages": v.num_stages, "shapes": v.shapes, "ok": self.ok,
            "error": self.error, "registers": self.registers, "spill_bytes": self.spill_stores + self.spill_loads,
            "shared_bytes": self.shared, "wgmma": self.wgmma, "mma_sync": self.mma_sync,
            "tma_loads": self.tma_loads, "tma_stores": self.tma_stores, "cp_async": self.cp_async,
            "ptxas_warnings": list(self.ptxas_warnings), "sass_instructions": self.sass_instructions,
            "sass_loop_instructions": self.sass_loop_instructions, "warpgroup_dup": list(self.warpgroup_dup),
        }  # fmt: skip


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}
TMA = "_tma"  # kernels whose name holds this load through TMA descriptors
# C7515 reads "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...".
SERIALIZED = "C7515"


# ----------------------------------------------------------------------------------------------------------
# Reading the compiled code: PTX, ptxas log, SASS, TTGIR
# ----------------------------------------------------------------------------------------------------------


def ptx_mma_counts(ptx: str) -> tuple[int, int]:
    """(wgmma.mma_async, mma.sync) instruction counts of a PTX listing (static counts, not executions)."""
    wgmma = mma = 0
    for line in ptx.splitlines():
        op = line.strip()
        wgmma += op.startswith("wgmma.mma_async")
        mma += op.startswith("mma.sync")
    return wgmma, mma


_TMA_COPY = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.(shared|global)")


def ptx_copy_counts(ptx: str) -> tuple[int, int, int]:
    """(TMA loads, TMA stores, cp.async copies) of a PTX listing: ``cp.async.bulk.tensor.Nd.<dst>`` with a
    shared-memory destination is a TMA load, with a global one a TMA store; ``cp.async.ca/cg`` the Ampere copies."""
    loads = stores = cp = 0
    for line in ptx.splitlines():
        op = re.sub(r"^@!?%p\d+\s+", "", line.strip())  # TMA copies are issued by one thread: predicated
        if m := _TMA_COPY.match(op):
            loads += m.group(1) == "shared"
            stores += m.group(1) == "global"
        cp += op.startswith(("cp.async.ca.", "cp.async.cg."))
    return loads, stores, cp


def ptxas_warnings(log: str) -> list[str]:
    """Every warning line of a ptxas log, without the temporary file name."""
    out = []
    for line in log.splitlines():
        if "warning" in line.lower():
            out.append(re.sub(r"^ptxas\s+\S+\.ptx(, line \d+)?;?\s*", "ptxas ", line.strip()))
    return out


_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


def sass_counts(sass: str) -> tuple[int, int | None]:
    """(instructions, instructions of the main loop) of an nvdisasm listing, NOPs excluded.

    A loop is the span from a label to a branch back to it; the main loop is the longest such span (the
    inner loop of the kernel: software pipelining leaves one steady-state body). None when there is no loop."""
    labels: dict[str, int] = {}
    count = 0
    best = None
    for line in sass.splitlines():
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = count
            continue
        m = _SASS_INSTR.match(line)
        if not m:
            continue
        text = m.group(1)
        if text.split()[0] == "NOP":
            continue
        count += 1
        if (b := _SASS_BRANCH.search(text)) and b.group(1) in labels:
            body = count - labels[b.group(1)]
            best = body if best is None else max(best, body)
    return count, best


_TTGIR_MMA = re.compile(r"^(#mma\w*) = #ttg\.nvidia_mma<\{versionMajor = (\d+),.*?warpsPerCTA = \[(\d+), (\d+)\],"
                        r".*?instrShape = \[(\d+), (\d+)", re.M)  # fmt: skip
_TTGIR_DOT = re.compile(r"= (?:ttng\.warp_group_dot|tt\.dot) .*?-> tensor<(\d+)x(\d+)x\w+, (#mma\w*)>")


def warpgroup_duplication(ttgir: str) -> list[str]:
    """The dots whose MMA layout gives two warps (two warpgroups on Hopper) the same rows or columns.

    A warp of an MMA layout covers 16 rows (Hopper: 4 warps along M make a 64-row warpgroup) and instrShape[1]
    columns: a [M, N] dot with warpsPerCTA [wm, wn] repeats work when M < 16·wm or N < n·wn."""
    layouts = {m.group(1): tuple(int(x) for x in m.groups()[1:]) for m in _TTGIR_MMA.finditer(ttgir)}
    out = []
    for m in _TTGIR_DOT.finditer(ttgir):
        rows, cols, name = int(m.group(1)), int(m.group(2)), m.group(3)
        if name not in layouts:
            continue
        version, wm, wn, _, instr_n = layouts[name]
        if rows < 16 * wm or cols < instr_n * wn:
            out.append(f"{rows}x{cols} warpsPerCTA=[{wm},{wn}] v{version}")
    return sorted(set(out))


def _disassemble(cubin: bytes) -> str:
    """SASS of a cubin, with the nvdisasm bundled in triton (cuobjdump as a fallback)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        for tool, flags in ((knobs.nvidia.nvdisasm, ["-c"]), (knobs.nvidia.cuobjdump, ["-sass"])):
            with contextlib.suppress(Exception):
                proc = subprocess.run([tool.path, *flags, f.name], capture_output=True, text=True, timeout=120)
                if proc.returncode == 0 and proc.stdout:
                    return proc.stdout
        return ""
    finally:
        os.unlink(f.name)


def _init_worker(cache_dir: str) -> None:
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True  # printed to stdout by the backend: captured below


def _compile_one(v: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    log = io.StringIO()
    try:
        fn, signature, constexprs, attrs = build_source_args(v)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": v.num_warps, "num_stages": v.num_stages}
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # every failure is a row of the report
        message = f"{type(e).__name__}: {e}".strip()
        return Result(v, ok=False, error=message, seconds=time.perf_counter() - start)
    r = Result(v, ok=True, shared=compiled.metadata.shared)
    text = log.getvalue()
    for attr, pattern in _PTXAS.items():
        if m := pattern.search(text):
            setattr(r, attr, int(m.group(1)))
    r.ptxas_warnings = ptxas_warnings(text)
    r.wgmma, r.mma_sync = ptx_mma_counts(compiled.asm.get("ptx", ""))
    r.tma_loads, r.tma_stores, r.cp_async = ptx_copy_counts(compiled.asm.get("ptx", ""))
    r.warpgroup_dup = warpgroup_duplication(compiled.asm.get("ttgir", ""))
    if sass := _disassemble(compiled.asm["cubin"]) if "cubin" in compiled.asm else "":
        r.sass_instructions, r.sass_loop_instructions = sass_counts(sass)
    r.seconds = time.perf_counter() - start
    return r


def _row(r: Result, limit: int) -> str:
    v = r.variant
    head = f"{v.kernel:<30} {v.label():<92} w{v.num_warps}/s{v.num_stages}"
    if not r.ok:
        return f"{head}  COMPILE ERROR"
    spill = f"{r.spill_stores}/{r.spill_loads}"
    smem = f"{r.shared:>6} ({r.shared / limit:4.0%})"
    mma = f"wgmma {r.wgmma:>3} mma.sync {r.mma_sync:>3}"
    mma += f" tma {r.tma_loads}/{r.tma_stores}" if TMA in v.kernel else ""
    sass = f"sass {r.sass_instructions!s:>5} loop {r.sass_loop_instructions!s:>5}"
    flags = f"  {' '.join(r.flags)}" if r.flags else ""
    return (f"{head}  ok  regs {r.registers!s:>3}  spill {spill:>11}  smem {smem}  {mma}  {sass}  "
            f"{r.seconds:4.1f}s{flags}")  # fmt: skip


def _classify(r: Result, limit: int, autotuned: bool, arch: int) -> None:
    if not r.ok:
        return
    if r.shared > limit:
        r.flags.append("SMEM>LIMIT (autotuner skips)" if autotuned else "SMEM>LIMIT (launch fails)")
    if r.spill_stores:
        r.flags.append("HEAVY-SPILL" if r.spill_stores >= 256 else "spills")
    if arch == 90 and r.variant.act in ("fp16", "bf16") and r.mma_sync:
        r.flags.append("MMA.SYNC")  # a 16-bit dot that missed Hopper's wgmma
    if any(SERIALIZED in w for w in r.ptxas_warnings):
        r.flags.append("WGMMA-SERIALIZED")
    elif r.ptxas_warnings:
        r.flags.append("PTXAS-WARNING")
    if r.warpgroup_dup:
        r.flags.append("WARP-DUP")
    if TMA in r.variant.kernel and (not r.tma_loads or r.cp_async):
        r.flags.append("NO-TMA-LOADS" if not r.tma_loads else "CP.ASYNC")  # the TMA kernel fell back to cp.async


def score_elements_per_thread(r: Result) -> float | None:
    """BLOCK_M·BLOCK_N ÷ (32·num_warps): the score elements one thread holds per loop iteration."""
    c = r.variant.constexprs
    if "BLOCK_M" not in c or "BLOCK_N" not in c:
        return None
    return c["BLOCK_M"] * c["BLOCK_N"] / (32 * r.variant.num_warps)


def dropout_costs(results: list[Result]) -> list[tuple[Result, Result, float]]:
    """(with dropout, without, SASS loop instructions added per score element) for every pair of results that
    differ only in HAS_DROPOUT: (loop with − loop without) ÷ score elements per thread."""
    def key(r: Result):
        c = {k: v for k, v in r.variant.constexprs.items() if k != "HAS_DROPOUT"}
        return r.variant.kernel, r.variant.act, tuple(sorted(c.items())), r.variant.num_warps, r.variant.num_stages

    off = {key(r): r for r in results if r.ok and r.variant.constexprs.get("HAS_DROPOUT") is False}
    pairs = []
    for r in results:
        if not (r.ok and r.variant.constexprs.get("HAS_DROPOUT") is True) or key(r) not in off:
            continue
        base = off[key(r)]
        per_thread = score_elements_per_thread(r)
        if per_thread and r.sass_loop_instructions is not None and base.sass_loop_instructions is not None:
            pairs.append((r, base, (r.sass_loop_instructions - base.sass_loop_instructions) / per_thread))
    return pairs


def _write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename (never a torn file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aot_check_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


CSV_COLUMNS = ("kernel", "dtype", "variant", "num_warps", "num_stages", "ok", "registers", "spill_bytes",
               "shared_bytes", "wgmma", "mma_sync", "tma_loads", "ptxas_warnings", "warpgroup_dup",
               "sass_instructions", "sass_loop_instructions")  # fmt: skip


def summary_csv(results: list[Result]) -> str:
    """One CSV row per variant (the compile-time cost of every kernel, small enough to commit and diff)."""
    import csv

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results:
        v, rec = r.variant, r.record()
        label = " ".join(f"{k}={_short(x)}" for k, x in v.constexprs.items()) + (f" [{v.shapes}]" if v.shapes else "")
        dt = v.act if v.param == v.act else f"{v.act}/{v.param}"
        w.writerow([v.kernel, dt, label, v.num_warps, v.num_stages, int(r.ok), rec["registers"], rec["spill_bytes"],
                    rec["shared_bytes"], r.wgmma, r.mma_sync, r.tma_loads, len(r.ptxas_warnings), len(r.warpgroup_dup),
                    r.sass_instructions, r.sass_loop_instructions])  # fmt: skip
    return out.getvalue()


def toolchain_problem(arch: int = 90) -> str | None:
    """Why CUDA code cannot be compiled here (no NVIDIA backend, no ptxas), or None when it can."""
    try:
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # a broken install: say why
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return "this triton install has no NVIDIA backend"
    try:
        tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
    except RuntimeError as e:
        return f"no ptxas for CUDA in this triton install ({e})"
    return None if tool else "no ptxas for CUDA in this triton install"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("--quick", action="store_true", help="every kernel and dtype, main variant, one config")
    parser.add_argument("--all", action="store_true", help="the full product of variants (about an hour)")
    parser.add_argument("--gate", action="store_true",
                        help="every shipped 16-bit (fp16) config of a kernel family (--family), for the CPU gates")
    parser.add_argument("--family", choices=GATE_FAMILIES, default="attention",
                        help="with --gate: attention (head dims 32/64/128, training switches) or gemm (the cp.async "
                             "and TMA GEMMs, every launch combination)")
    parser.add_argument("--dropout-cost", action="store_true",
                        help="the attention kernels' shipped fp16 configs at head dim 64 with and without dropout")
    parser.add_argument("--configs", type=int, default=0, metavar="N",
                        help="with --gate: only the first N autotune configs of each list (gemm: plus the fixed-table "
                             "tiles, main launches only; default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--report", metavar="PATH.json", help="write one JSON record per variant to PATH.json")
    parser.add_argument("--csv", metavar="PATH.csv", help="write the per-variant summary as CSV to PATH.csv")
    parser.add_argument("--verbose", action="store_true", help="print every variant, not only problems")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (interpreter objects cannot be compiled)", file=sys.stderr)
        return 2
    if problem := toolchain_problem(args.arch):
        print(f"aot_check: {problem}", file=sys.stderr)
        return 2
    limit = SHARED_LIMIT.get(args.arch, 227 * 1024)
    if sum((args.quick, args.all, args.gate, args.dropout_cost)) > 1:
        parser.error("--quick, --all, --gate and --dropout-cost exclude each other")
    if args.gate:
        mode, variants = f"gate {args.family}", list(_gate_variants(args.configs, args.family))
    elif args.dropout_cost:
        mode, variants = "dropout-cost", list(_dropout_cost_variants())
    else:
        mode = QUICK if args.quick else ALL if args.all else DEFAULT
        variants = _variants(mode)
    variants = [v for v in variants if args.kernel in v.kernel]
    print(f"aot_check: {len(variants)} kernel variants ({mode}) for sm_{args.arch}, {args.jobs} jobs", flush=True)

    start = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="aot_check_")
    try:
        # spawn: fresh interpreters (no forked LLVM/torch state); the worker count is what the CPU allows.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(cache_dir,)) as pool:
            results = []
            for r in pool.map(_compile_one, variants, itertools.repeat(args.arch)):
                results.append(r)
                if len(results) % 50 == 0:
                    print(f"  {len(results)}/{len(variants)} compiled", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - start
    status = _report(results, limit, args, wall)
    if args.report:
        meta = {"arch": args.arch, "mode": mode, "triton": _triton_version(), "wall_s": round(wall, 1)}
        _write_atomic(args.report, json.dumps({**meta, "variants": [r.record() for r in results]}, indent=1) + "\n")
        print(f"report: {len(results)} records -> {args.report}")
    if args.csv:
        _write_atomic(args.csv, summary_csv(results))
        print(f"summary CSV: {len(results)} rows -> {args.csv}")
    return status


def _triton_version() -> str:
    import triton

    return triton.__version__


def _report(results: list[Result], limit: int, args, wall: float) -> int:
    autotuned = {name for name in KERNELS if hasattr(getattr(_module(KERNELS[name]), name), "configs")}
    for r in results:
        _classify(r, limit, r.variant.kernel in autotuned, args.arch)
    for r in results:
        if args.verbose or not r.ok or r.flags:
            print(_row(r, limit))
            if not r.ok:
                lines = r.error.splitlines()  # Triton's message: source excerpt first, the reason last
                lines = lines if len(lines) <= 40 else [*lines[:8], "...", *lines[-30:]]
                print("    " + "\n    ".join(lines))
            for w in r.ptxas_warnings:
                print(f"    {w}")
            for d in r.warpgroup_dup:
                print(f"    duplicated MMA work: {d}")
    print(f"\nsummary (sm_{args.arch}, shared-memory limit {limit} bytes per block):")
    print(f"{'kernel':<30} {'variants':>8} {'ok':>5} {'errors':>6} {'smem>lim':>8} {'spilling':>8} "
          f"{'mma.sync':>8} {'warned':>6} {'dup':>4} {'regs min-max':>12} {'smem max':>9} "
          f"{'compile s':>9}")  # fmt: skip
    for name in KERNELS:
        rs = [r for r in results if r.variant.kernel == name]
        if not rs:
            continue
        ok = [r for r in rs if r.ok]
        regs = [r.registers for r in ok if r.registers is not None]
        reg_range = f"{min(regs)}-{max(regs)}" if regs else "-"
        print(f"{name:<30} {len(rs):>8} {len(ok):>5} {len(rs) - len(ok):>6} "
              f"{sum(r.shared > limit for r in ok):>8} {sum(r.spill_stores > 0 for r in ok):>8} "
              f"{sum(r.mma_sync > 0 for r in ok):>8} {sum(bool(r.ptxas_warnings) for r in ok):>6} "
              f"{sum(bool(r.warpgroup_dup) for r in ok):>4} {reg_range:>12} "
              f"{max((r.shared for r in ok), default=0):>9} {sum(r.seconds for r in rs):>9.1f}")  # fmt: skip
    if pairs := dropout_costs(results):
        print("\ndropout cost (compile-time evidence): SASS main-loop instructions added per score element")
        print(f"{'kernel':<30} {'dtype':<5} {'tile':<14} {'loop off':>8} {'loop on':>8} {'elem/thread':>11} "
              f"{'added/elem':>10}")  # fmt: skip
        for on, off, cost in pairs:
            c, v = on.variant.constexprs, on.variant
            tile = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{v.num_warps}/s{v.num_stages}"
            loops = f"{off.sass_loop_instructions:>8} {on.sass_loop_instructions:>8}"
            print(f"{v.kernel:<30} {v.act:<5} {tile:<14} {loops} "
                  f"{score_elements_per_thread(on):>11.0f} {cost:>10.1f}  {v.shapes}")  # fmt: skip
    errors = [r for r in results if not r.ok]
    fatal_smem = [r for r in results if r.ok and r.shared > limit and r.variant.kernel not in autotuned]
    print(f"\n{len(results)} variants, {len(errors)} compile errors, wall {wall:.1f} s")
    return 1 if errors or fatal_smem else 0


if __name__ == "__main__":
    sys.exit(main())
