"""The training-step family: a whole BertForPreTraining step (forward, backward, fused AdamW under bf16 autocast
on CUDA; forward + backward in fp32 on a CPU), fastbert against transformers eager / SDPA / SDPA + compile /
flash_attention_2 / attn_implementation="fastbert" / `optimize()`d SDPA, with seq/s, MFU and peak memory. Cases
named "roberta-base/…", "xlm-roberta-base/…" run transformers' masked-LM model of that architecture instead (no
fastbert model of their own: fastbert's layers run there as `hf-sdpa+optimize`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import PRESETS, BertConfig
from .cases import (
    BERT,
    CPU_FAMILY_TRAIN,
    CPU_FAMILY_TRAIN_QUICK,
    GPU_FAMILY_TRAIN,
    GPU_FAMILY_TRAIN_QUICK,
    HF_ARCHS,
    IGNORE_INDEX,
    MLM_FRACTION,
    _compile_skip_reason,
    _fastbert_skip_reason,
    _gen,
    hf_arch_model,
    hf_attention_candidates,
    hf_attn,
    split_model,
    train_flops,
)
from .results import Row, report_rows
from .timing import BenchEnv, _short_error, extra_bytes, first_call_s, free_memory, interleaved_ms

# ---------------------------------------------------------------------------------------------- train step


@dataclass
class TrainCase:
    size: str
    T: int
    B: int
    padded: bool = False
    arch: str = BERT  # or a key of cases.HF_ARCHS: transformers' model of that architecture

    @property
    def label(self) -> str:
        model = self.size if self.arch == BERT else f"{self.arch}-{self.size}"
        return f"train {model}/{self.T}/{self.B}{' padded' if self.padded else ''}"

    @classmethod
    def parse(cls, spec: str) -> TrainCase:
        """"base/128/256", "base/128/256/padded" or "roberta-base/128/256/padded"."""
        parts = spec.strip().split("/")
        arch, size = split_model(parts[0])
        if len(parts) not in (3, 4) or size not in PRESETS or (len(parts) == 4 and parts[3] != "padded"):
            raise ValueError(f"train case must look like [ARCH-]base/128/256[/padded] with a preset from "
                             f"{sorted(PRESETS)} and ARCH from {sorted(HF_ARCHS)}, got {spec!r}")
        return cls(size, int(parts[1]), int(parts[2]), len(parts) == 4, arch)


def family_train_cases(cuda: bool, quick: bool, sizes: Sequence[str] | None = None) -> list[TrainCase]:
    """The BERT-family cases (RoBERTa, XLM-R) a run measures besides BERT's on a GPU or a CPU (presets in `sizes`)."""
    if cuda:
        specs = GPU_FAMILY_TRAIN_QUICK if quick else GPU_FAMILY_TRAIN
    else:
        specs = CPU_FAMILY_TRAIN_QUICK if quick else CPU_FAMILY_TRAIN
    cases = [TrainCase.parse(s) for s in specs]
    return [c for c in cases if not sizes or c.size in sizes]


def make_batch(cfg: BertConfig, B: int, T: int, padded: bool, device: torch.device, seed: int = 0,
               arch: str = BERT):
    """A pretraining batch: random token ids, segments A/B, 15% of the real tokens (not position 0)
    labelled, random NSP labels; padded → lengths uniform in T/2..T. Another architecture than BERT: masked-LM
    inputs only (no segments, no NSP; its padding id)."""
    g = _gen(device, seed)
    lengths = (torch.randint(T // 2, T + 1, (B,), generator=g, device=device) if padded
               else torch.full((B,), T, device=device))
    pos = torch.arange(T, device=device)[None, :]
    mask = pos < lengths[:, None]  # (B, T)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g, device=device).masked_fill(~mask, 0)
    segment = ((pos >= (lengths[:, None] // 2)) & mask).long()
    chosen = (torch.rand((B, T), generator=g, device=device) < MLM_FRACTION) & mask & (pos > 0)
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    nsp = torch.randint(0, 2, (B,), generator=g, device=device)
    if arch != BERT:
        ids = ids.masked_fill(~mask, HF_ARCHS[arch].pad_token_id)
        return dict(input_ids=ids, attention_mask=mask.long(), labels=labels), lengths.tolist()
    return dict(input_ids=ids, attention_mask=mask.long(), token_type_ids=segment, labels=labels,
                next_sentence_label=nsp), lengths.tolist()


def hf_config(cfg: BertConfig):
    import transformers

    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
    )


def hf_pretraining_model(cfg: BertConfig, attn: str) -> torch.nn.Module:
    from transformers import BertForPreTraining as HFBertForPreTraining

    hcfg = hf_config(cfg)
    try:
        return HFBertForPreTraining._from_config(hcfg, attn_implementation=attn)
    except (AttributeError, TypeError):  # an older transformers without _from_config(attn_implementation=)
        hcfg._attn_implementation = attn
        return HFBertForPreTraining(hcfg)


def train_candidates(env: BenchEnv, *, allow_compile: bool = True, allow_hf: bool = True,
                     only: Sequence[str] | None = None, arch: str = BERT) -> tuple[list[str], dict[str, str]]:
    """Candidate names that can run here, and the skipped ones with their reason."""
    skipped: dict[str, str] = {}
    names: list[str] = []
    if arch != BERT:
        why = f"fastbert's own models are BERTs: for {arch} its layers run as hf-sdpa+optimize"
        skipped.update({"fastbert": why, "fastbert-ref": why})
    elif env.cuda:
        names += ["fastbert", "fastbert-ref"]
    else:
        skipped["fastbert"] = "no CUDA device: the fused model is the reference model on a CPU (see fastbert-ref)"
        names.append("fastbert-ref")
    hf_ok = allow_hf
    if allow_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf_ok = False
            for n in ("hf-eager", "hf-sdpa", "hf-sdpa-compile"):
                skipped[n] = "transformers is not installed"
    else:
        for n in ("hf-eager", "hf-sdpa", "hf-sdpa-compile"):
            skipped[n] = "transformers baselines switched off (--no-hf)"
    if hf_ok:
        names += ["hf-eager", "hf-sdpa"]
        why = _compile_skip_reason(env, allow_compile)
        if why:
            skipped["hf-sdpa-compile"] = why
        else:
            names.append("hf-sdpa-compile")
        if _optimize_fn() is None:
            skipped["hf-sdpa+optimize"] = "fastbert.optimize is not available"
        elif not env.cuda:
            skipped["hf-sdpa+optimize"] = "no CUDA device: fastbert.optimize swaps in CUDA kernels"
        else:
            names.append("hf-sdpa+optimize")
        attn_names, attn_skipped = hf_attention_candidates(env)
        names += attn_names
        skipped.update(attn_skipped)
    if _fastbert_skip_reason(env) and "fastbert" in names:
        names.remove("fastbert")
        skipped["fastbert"] = _fastbert_skip_reason(env)
    if only is not None:
        names = [n for n in names if n in only]
        skipped = {k: v for k, v in skipped.items() if k in only}
    return names, skipped


def _optimize_fn() -> Callable[..., Any] | None:
    """`fastbert.optimize` (swaps the fused layers into a transformers BERT), wherever it is exported."""
    import fastbert

    fn = getattr(fastbert, "optimize", None)
    if not callable(fn):  # the submodule, or nothing: look for the function inside it
        try:
            fn = getattr(importlib.import_module("fastbert.optimize"), "optimize", None)
        except ImportError:
            fn = None
    return fn if callable(fn) else None


@dataclass
class _Trainer:
    model: torch.nn.Module
    call: torch.nn.Module  # model or its compiled wrapper
    opt: torch.optim.Optimizer | None
    fastbert_api: bool

    def static_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.model.parameters())
        n += sum(t.numel() * t.element_size() for t in self.model.buffers())
        if self.opt is not None:
            for st in self.opt.state.values():
                n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n


def _build_trainer(name: str, cfg: BertConfig, env: BenchEnv, with_optimizer: bool, arch: str = BERT) -> _Trainer:
    if name in ("fastbert", "fastbert-ref"):
        from ..models import BertForPreTraining  # the fused model users import

        model = BertForPreTraining(cfg if name == "fastbert" else cfg.with_fusions(False))
    else:
        model = (hf_pretraining_model(cfg, hf_attn(name)) if arch == BERT
                 else hf_arch_model(arch, "pretraining", cfg, hf_attn(name)))
        if name == "hf-sdpa+optimize":
            model = _optimize_fn()(model) or model
    model = model.to(env.device).train()
    call = torch.compile(model) if name.endswith("-compile") else model
    opt = None
    if with_optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=env.cuda)
    return _Trainer(model, call, opt, name.startswith("fastbert"))


def _step_fn(tr: _Trainer, batch: dict[str, torch.Tensor], env: BenchEnv) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        if tr.opt is not None:
            tr.opt.zero_grad(set_to_none=True)
        else:
            for p in tr.model.parameters():
                p.grad = None
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.cuda):
            if tr.fastbert_api:
                loss = tr.call(**batch, masked_only=True).loss
            else:
                loss = tr.call(**batch).loss
        loss.backward()
        if tr.opt is not None:
            tr.opt.step()
        return loss

    return step


def run_train_cases(cases: Sequence[TrainCase], env: BenchEnv, *, rounds: int = 3, rep_ms: float = 300.0,
                    cpu_reps: int = 3, allow_compile: bool = True, allow_hf: bool = True,
                    only: Sequence[str] | None = None, with_optimizer: bool | None = None,
                    callables: dict[str, Callable[[], Any]] | None = None) -> list[Row]:
    """Training steps of each case; cases sharing an (arch, size, T, B) share their models (so a compiled model
    is compiled once for the full and the padded batch). GPU: forward + backward + fused AdamW, bf16
    autocast. CPU: forward + backward in fp32 (no optimizer), as the issue asks. `callables` receives the
    step of each working candidate of the last case (models kept alive), as in `run_op_case`."""
    with_optimizer = env.cuda if with_optimizer is None else with_optimizer
    mode = "step" if with_optimizer else "fwd+bwd"
    rows: list[Row] = []
    groups: dict[tuple[str, str, int, int], list[TrainCase]] = {}
    for c in cases:
        groups.setdefault((c.arch, c.size, c.T, c.B), []).append(c)
    for (arch, size, T, B), group in groups.items():
        names, skipped = train_candidates(env, allow_compile=allow_compile, allow_hf=allow_hf, only=only, arch=arch)
        cfg = BertConfig.from_preset(size)
        if arch != BERT:  # its vocabulary, for the MLM head's FLOPs
            cfg = cfg.replace(vocab_size=HF_ARCHS[arch].vocab_size)
        trainers: dict[str, _Trainer] = {}
        errors: dict[str, str] = {}
        for n in names:
            try:
                trainers[n] = _build_trainer(n, cfg, env, with_optimizer, arch)
            except Exception as e:
                errors[n] = f"build: {_short_error(e)}"
        for case in sorted(group, key=lambda c: c.padded):
            shape = f"B={B} T={T} L={cfg.num_hidden_layers} H={cfg.hidden_size}" + (" padded T/2..T" if case.padded
                                                                                 else "")
            dt = "bf16-autocast" if env.cuda else "fp32"

            def row(n: str, m: str, case=case, shape=shape, dt=dt, **kw) -> Row:
                return Row("train", case.label, case.size, n, m, dt, shape, **kw)

            rows += report_rows([row(n, "-", note=f"skipped: {why}") for n, why in skipped.items()], env, "hf-sdpa")
            case_rows: list[Row] = []
            batch, lengths = make_batch(cfg, B, T, case.padded, env.device, arch=arch)
            flops = train_flops(cfg, lengths)
            steps: dict[str, Callable[[], torch.Tensor]] = {}
            warm: dict[str, float] = {}
            for n, tr in trainers.items():
                if n in errors:
                    continue
                step = _step_fn(tr, batch, env)
                try:
                    warm[n] = first_call_s(step, env.device)
                    for _ in range(2):  # optimizer state exists, allocator and autotuning settled
                        loss = step()
                    if not torch.isfinite(loss.detach()).item():
                        raise RuntimeError(f"loss is {loss.item()}")
                    steps[n] = step
                except Exception as e:
                    errors[n] = _short_error(e)
            ms = interleaved_ms(steps, env.device, rounds=rounds, rep_ms=rep_ms, cpu_reps=cpu_reps,
                                errors=errors)
            for n in names:
                if n not in ms:
                    case_rows.append(row(n, mode, note=f"error: {errors.get(n, 'not measured')}"))
                    continue
                sec = ms[n] * 1e-3
                r = row(n, mode, ms=ms[n], warm_s=warm.get(n), seq_per_s=B / sec, tflops=flops / sec / 1e12)
                if env.ceil_tflops:
                    r.mfu = r.tflops / env.ceil_tflops
                if n.startswith("hf"):
                    r.note = "decodes all tokens; MFU counts the useful FLOPs only"
                if env.cuda:
                    try:
                        extra = extra_bytes(steps[n], env.device)
                        own = trainers[n].static_bytes() + sum(t.numel() * t.element_size() for t in batch.values())
                        r.extra_GB, r.peak_GB = extra / 1e9, (extra + own) / 1e9
                    except Exception as e:
                        r.note = f"memory: {_short_error(e)}"
                case_rows.append(r)
            rows += report_rows(case_rows, env, "hf-sdpa")  # this case's rows land now, before the next case
            if callables is not None:
                callables.clear()
                callables.update(steps)
            del steps, batch
        del trainers
        free_memory(env.device)
    return rows

