"""What every op family shares: shapes, FLOP formulas, the `OpCase` (inputs, candidates, cost model), input
makers, candidate-availability helpers, and `run_op_case`, which measures one case's candidates interleaved; and
the BERT family (RoBERTa, XLM-R) the train and inference families measure besides BERT, with transformers'
attention paths as candidates."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import BertConfig
from ..flops import train_flops_per_token
from .results import Row, report_rows
from .timing import BenchEnv, _short_error, extra_bytes, free_memory, interleaved_ms, interpreter_on, sync

IGNORE_INDEX = -100
MLM_FRACTION = 0.15  # f in the useful-FLOP formula: share of tokens the MLM head scores
MODES = ("fwd", "bwd", "fwd+bwd")

# GPU batches from the issue: (preset, T, B) full and with --quick.
GPU_TRAIN_SHAPES = (("base", 128, 256), ("base", 512, 32), ("large", 128, 128), ("large", 512, 32))
GPU_TRAIN_SHAPES_QUICK = (("base", 128, 64), ("base", 512, 8), ("large", 128, 32), ("large", 512, 8))
# CPU: small enough for two cores, big enough to mean something (mini, T=64, B=8; --quick: tiny).
CPU_TRAIN_SHAPES = (("mini", 64, 8),)
CPU_TRAIN_SHAPES_QUICK = (("tiny", 32, 4),)

# ---------------------------------------------------------------------------------------------- formulas


def attention_flops(B: int, T: int, h: int, d: int) -> float:
    """Forward FLOPs of attention on the padded shape: QKᵀ and P·V, 2·T·T·d each per head."""
    return 4.0 * B * h * T * T * d


BWD_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # attention backward = 2.5 × forward
GEMM_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}  # a linear layer's backward = 2 GEMMs


def train_flops(cfg: BertConfig, lengths: Sequence[int], f: float = MLM_FRACTION) -> float:
    """Useful FLOPs of one training step: every sequence's real tokens, each at its own length."""
    return float(sum(n * train_flops_per_token(cfg, n, f) for n in lengths))


# ---------------------------------------------------------------------------------------------- op cases

Fn = Callable[[dict[str, Any], float], tuple[torch.Tensor, ...]]


@dataclass
class OpCase:
    """One op at one shape: inputs, candidates (name → fn(inputs, dropout_p) → outputs), cost model."""

    family: str
    name: str  # op name, e.g. "bias_dropout_add_layernorm"
    size: str  # model size label, e.g. "base"
    shape: str
    dtype: torch.dtype
    make: Callable[[], dict[str, Any]]  # inputs; key "leaves" → tensors that get gradients, per candidate
    candidates: dict[str, Fn]
    skipped: dict[str, str]  # candidate → reason it does not run
    baseline: str
    dropout_p: float = 0.0
    flops: float | None = None  # forward FLOPs (backward by BWD/GEMM factor)
    flop_factor: dict[str, float] = field(default_factory=lambda: dict(GEMM_FLOP_FACTOR))
    bytes: dict[str, float] | None = None  # mode → bytes a fused implementation must move
    real: Callable[[str, tuple[torch.Tensor, ...], dict[str, Any]], torch.Tensor] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # candidate → what a reader must know about its figure
    fwd_only: dict[str, str] = field(default_factory=dict)  # candidate → why it has no backward (fwd mode only)
    no_parity: tuple[str, ...] = ()  # candidates that compute something else on purpose (no mask, say)

    @property
    def label(self) -> str:
        return f"{self.name} {self.size} {self.shape}"


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, g, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(grad)


def _padding_mask(B: int, T: int, device, g) -> torch.Tensor:
    """bool [B, T], True = real token; lengths uniform in T/2..T."""
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g, device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def _import(module: str, *names: str) -> tuple[list[Any] | None, str]:
    """The named attributes of a kernel module, or (None, reason) when it is missing or incomplete."""
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names], ""
    except Exception as e:
        return None, f"{module} unavailable ({_short_error(e)})"


def _fastbert_skip_reason(env: BenchEnv) -> str:
    if interpreter_on():
        return "TRITON_INTERPRET=1: the kernels would run in Triton's interpreter (timings meaningless)"
    return ""


def _compile_skip_reason(env: BenchEnv, allow_compile: bool) -> str:
    if not allow_compile:
        return "torch.compile baselines switched off (--no-compile)"
    if not env.cuda:
        return "torch.compile baselines run on CUDA only (CPU inductor builds take minutes and are not the target)"
    return ""


# --- running an op case --------------------------------------------------------------------------------


def _grads_like(outs: tuple[torch.Tensor, ...], seed: int = 7) -> list[torch.Tensor]:
    g = _gen(outs[0].device, seed)
    return [torch.ones_like(o) if o.dim() == 0 else
            torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_op_case(case: OpCase, env: BenchEnv, *, modes: Sequence[str] = MODES, rounds: int = 3,
                rep_ms: float = 100.0, cpu_reps: int = 5, only: Sequence[str] | None = None,
                callables: dict[str, Callable[[], Any]] | None = None) -> list[Row]:
    """Measure every candidate of `case` in each mode, interleaved; parity of every candidate (but those in
    `case.no_parity`) against the baseline at dropout 0 (a sanity gate: the tests in tests/kernels are the real
    check for fastbert's; for a peer it catches a wrong layout or argument before its time is believed).
    `callables`, when given, receives each working candidate's forward+backward call (inputs kept alive),
    for a caller that times one of them again (the pytest-benchmark suite)."""
    dev, dt = env.device, str(case.dtype).replace("torch.", "")
    names = [n for n in case.candidates if only is None or n in only or n == case.baseline]
    rows: list[Row] = []

    def row(name: str, mode: str, **kw) -> Row:
        return Row(case.family, case.name, case.size, name, mode, dt, case.shape, **kw)

    for name, why in case.skipped.items():
        if only is None or name in only:
            rows.append(row(name, "-", note=f"skipped: {why}"))
    backward_modes = [m for m in modes if m != "fwd"]
    for name, why in case.fwd_only.items():
        if name in names and backward_modes:
            rows.append(row(name, "-", note=f"skipped {', '.join(backward_modes)}: forward only ({why})"))
    report_rows(rows, env, case.baseline)
    try:
        inp = case.make()
    except Exception as e:
        return rows + report_rows([row("-", "-", note=f"error making inputs: {_short_error(e)}")], env, case.baseline)
    leaves = inp["leaves"]
    fwd = {n: (lambda n=n: case.candidates[n](inp, case.dropout_p)) for n in names}
    grads: dict[str, list[torch.Tensor]] = {}
    warm: dict[str, float] = {}
    errors: dict[str, str] = {}

    def fwd_bwd(n: str):
        outs = fwd[n]()
        torch.autograd.backward(outs, grads[n])

    # First call of each candidate (forward + backward): compilation and autotuning, reported apart.
    for n in names:
        try:
            t0 = time.perf_counter()
            outs = fwd[n]()
            if n not in case.fwd_only:
                grads[n] = _grads_like(outs)
                torch.autograd.backward(outs, grads[n])
            sync(dev)
            warm[n] = time.perf_counter() - t0
            del outs
        except Exception as e:
            errors[n] = _short_error(e)
    live = [n for n in names if n not in errors]

    parity: dict[str, str] = {}
    if case.baseline in live:
        real = case.real or (lambda n, outs, i: torch.cat([o.reshape(-1) for o in outs]))
        tol = 1e-4 if case.dtype == torch.float32 else 3e-2
        try:
            ref = real(case.baseline, case.candidates[case.baseline](inp, 0.0), inp).detach()
            for n in live:
                if n != case.baseline and n not in case.no_parity:
                    err = _rel_err(real(n, case.candidates[n](inp, 0.0), inp), ref)
                    parity[n] = f"{'ok' if err <= tol else 'FAIL'} {err:.1e}"
        except Exception as e:
            for n in live:
                if n != case.baseline and n not in case.no_parity and n not in parity:
                    parity[n] = f"error {_short_error(e)}"

    for mode in modes:
        mode_live = [n for n in live if mode == "fwd" or n not in case.fwd_only]
        if mode == "fwd":
            fns = {n: fwd[n] for n in mode_live}
        elif mode == "fwd+bwd":
            fns = {n: (lambda n=n: fwd_bwd(n)) for n in mode_live}
        else:  # bwd: one forward kept alive, its backward replayed (retain_graph)
            fns = {}
            for n in mode_live:
                try:
                    outs = fwd[n]()
                    fns[n] = (lambda outs=outs, n=n: torch.autograd.backward(outs, grads[n], retain_graph=True))
                except Exception as e:
                    errors[n] = _short_error(e)
        mode_err: dict[str, str] = {}
        ms = interleaved_ms(fns, dev, rounds=rounds, rep_ms=rep_ms, cpu_reps=cpu_reps,
                            grad_to_none={n: leaves[n] for n in fns}, errors=mode_err)
        mode_rows: list[Row] = []
        for n in mode_live:
            if n in mode_err or n not in ms:
                mode_rows.append(row(n, mode, note=f"error: {mode_err.get(n, errors.get(n, 'not measured'))}"))
                continue
            r = row(n, mode, ms=ms[n], warm_s=warm.get(n), parity=parity.get(n, ""))
            if case.flops is not None:
                r.tflops = case.flops * case.flop_factor[mode] / (ms[n] * 1e-3) / 1e12
            if case.bytes is not None:
                r.gbps = case.bytes[mode] / (ms[n] * 1e-3) / 1e9
            if env.cuda:
                try:
                    for t in leaves[n]:
                        t.grad = None
                    in_bytes = sum(t.numel() * t.element_size() for t in leaves[n])
                    extra = extra_bytes(fns[n] if mode != "bwd" else (lambda n=n: fwd_bwd(n)), dev)
                    r.extra_GB, r.peak_GB = extra / 1e9, (extra + in_bytes) / 1e9
                except Exception as e:
                    r.note = f"memory: {_short_error(e)}"
            if not env.cuda and n.startswith("fastbert"):
                r.note = "CPU: the public function runs its plain-PyTorch reference path"
            elif n in case.notes:
                r.note = case.notes[n]
            mode_rows.append(r)
        rows += report_rows(mode_rows, env, case.baseline)  # this mode's rows land now, before the next mode
        del fns
    error_rows = [row(n, "-", note=f"error: {e}") for n, e in errors.items()
                  if not any(r.candidate == n and r.note.startswith("error") for r in rows)]
    rows += report_rows(error_rows, env, case.baseline)
    if callables is not None:
        callables.update({n: (lambda n=n: fwd_bwd(n)) for n in live if n not in errors and n not in case.fwd_only})
    free_memory(dev)
    return rows



# ---------------------------------------------------------------------------------------------- the BERT family
# transformers encoders measured besides BERT in the train and inference families: the size comes from a fastbert
# preset ("roberta-base"), the rest of the config as the published checkpoints have it.


@dataclass(frozen=True)
class HFArch:
    config: str  # transformers config class
    pretraining: str  # the model a training step runs (RoBERTa and XLM-R train masked LM only)
    base: str  # the encoder inference runs
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int


HF_ARCHS = {
    "roberta": HFArch("RobertaConfig", "RobertaForMaskedLM", "RobertaModel", 50265, 514, 1, 1),
    "xlm-roberta": HFArch("XLMRobertaConfig", "XLMRobertaForMaskedLM", "XLMRobertaModel", 250002, 514, 1, 1),
}
# The training-step cases of these a run measures besides BERT's (padded batches, lengths T/2..T): GPU (--quick), CPU
# (--quick). XLM-R's 250k-token vocabulary makes its masked-LM head too heavy for a CPU smoke run.
GPU_FAMILY_TRAIN = ("roberta-base/128/256/padded", "xlm-roberta-base/128/64/padded")
GPU_FAMILY_TRAIN_QUICK = ("roberta-base/128/64/padded", "xlm-roberta-base/128/16/padded")
CPU_FAMILY_TRAIN = ("roberta-mini/64/8/padded",)
CPU_FAMILY_TRAIN_QUICK = ("roberta-tiny/16/2/padded",)
BERT = "bert"  # the architecture of fastbert's own models (and of every case named by a bare preset)
HF_FLASH = "hf-flash-attention-2"  # transformers' flash_attention_2 path (FlashAttention-2 varlen, unpads per layer)
HF_ATTN_FASTBERT = "hf-attn-fastbert"  # transformers with attn_implementation="fastbert" (fastbert's backend)


def split_model(name: str) -> tuple[str, str]:
    """"roberta-base" -> ("roberta", "base"); a bare preset or model name -> ("bert", name)."""
    for arch in HF_ARCHS:
        if name.startswith(arch + "-"):
            return arch, name[len(arch) + 1:]
    return BERT, name


def hf_arch_config(arch: str, cfg: BertConfig) -> Any:
    """The transformers config of `arch` at `cfg`'s size (hidden, layers, heads, FFN, activation, dropout)."""
    import transformers

    a = HF_ARCHS[arch]
    return getattr(transformers, a.config)(
        vocab_size=a.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob, layer_norm_eps=1e-5,
        max_position_embeddings=a.max_position_embeddings, type_vocab_size=a.type_vocab_size,
        pad_token_id=a.pad_token_id,
    )  # fmt: skip


def hf_arch_model(arch: str, kind: str, cfg: BertConfig, attn: str) -> torch.nn.Module:
    """transformers' `kind` ("pretraining" or "base") model of `arch` at `cfg`'s size, with attention `attn`."""
    import transformers

    cls = getattr(transformers, getattr(HF_ARCHS[arch], kind))
    return cls._from_config(hf_arch_config(arch, cfg), attn_implementation=attn)


def hf_attention_candidates(env: BenchEnv) -> tuple[list[str], dict[str, str]]:
    """transformers' own attention paths beyond SDPA that run here: (names, skipped with their reason)."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    if not env.cuda:
        skipped[HF_FLASH] = "flash_attention_2 runs on CUDA only"
    else:
        try:
            from transformers.utils import is_flash_attn_2_available

            ok = is_flash_attn_2_available()
        except ImportError:
            ok = False
        if ok:
            names.append(HF_FLASH)
        else:
            skipped[HF_FLASH] = "flash_attn is not importable here (transformers' flash_attention_2 needs it)"
    try:  # `import fastbert` (done: this is fastbert.bench) registers the backend, where this fastbert has one
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        registered = "fastbert" in ALL_ATTENTION_FUNCTIONS.valid_keys()
    except (ImportError, AttributeError):
        registered = False
    if not registered:
        skipped[HF_ATTN_FASTBERT] = 'attn_implementation="fastbert" is not registered by this fastbert'
    elif not env.cuda:
        skipped[HF_ATTN_FASTBERT] = "no CUDA device: the attention backend's kernels run on CUDA (CPU: reference path)"
    elif _fastbert_skip_reason(env):
        skipped[HF_ATTN_FASTBERT] = _fastbert_skip_reason(env)
    else:
        names.append(HF_ATTN_FASTBERT)
    return names, skipped


def hf_attn(candidate: str) -> str:
    """The attn_implementation a transformers candidate builds its model with."""
    return {"hf-eager": "eager", HF_FLASH: "flash_attention_2", HF_ATTN_FASTBERT: "fastbert"}.get(candidate, "sdpa")
