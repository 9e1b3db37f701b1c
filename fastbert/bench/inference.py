"""The inference family: forward-only encoding throughput (sequences/s) of a whole encoder on batches with the
length distributions of real text (`lengths.py`: Rotten Tomatoes snippets, Wikipedia paragraphs), each batch
padded to its longest sequence as a tokenizer's ``padding="longest"`` does.

Candidates: `fastbert` (the model users import, fused layers on; CUDA), `fastbert-ref` (every fusion off),
`hf-sdpa`, `hf-sdpa-compile` (CUDA), `hf-flash-attention-2` (where flash_attn is importable), `hf-attn-fastbert`
(attn_implementation="fastbert"), `hf-sdpa+optimize` (fastbert's layers swapped into the transformers model;
CUDA) and `sentence-transformers` (`SentenceTransformer.encode` on texts of exactly the same token lengths: its time
includes tokenization, length sorting and mean pooling — end to end, as its users run it). Baseline: `hf-sdpa`.
All share one set of random weights (speed does not depend on their values); the `check` column compares each
candidate's last hidden state at the real positions with the baseline's (not sentence-transformers': pooled).
CUDA: bf16 weights; CPU: fp32. Models named "roberta-base", "xlm-roberta-base" are transformers' encoders of that
architecture (`cases.HF_ARCHS`; no fastbert model of their own).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, BertConfig
from . import peers
from .cases import (
    BERT,
    HF_ARCHS,
    HF_ATTN_FASTBERT,
    HF_FLASH,
    _compile_skip_reason,
    _fastbert_skip_reason,
    _gen,
    hf_arch_model,
    hf_attention_candidates,
    hf_attn,
    split_model,
)
from .lengths import LENGTHS
from .results import Row, report_rows
from .timing import BenchEnv, _short_error, extra_bytes, first_call_s, free_memory, interleaved_ms

# all-MiniLM-L6-v2's shape (the embedded checkpoint's config): 6 layers, hidden 384, 12 heads of 32.
MODELS = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          **PRESETS}
CORPORA = tuple(LENGTHS)
GPU_INFERENCE_CASES = ("minilm/rotten_tomatoes/128", "minilm/wikipedia/128", "base/rotten_tomatoes/128",
                       "base/wikipedia/128", "roberta-base/wikipedia/128", "xlm-roberta-base/wikipedia/128")
CPU_INFERENCE_CASES = ("tiny/rotten_tomatoes/16", "tiny/wikipedia/8", "roberta-tiny/rotten_tomatoes/16")
CPU_MAX_LEN = 128  # CPU cases cut the lengths here (a tiny model on two cores)
BASELINE = "hf-sdpa"


@dataclass
class InferenceCase:
    model: str
    corpus: str
    B: int
    max_len: int = 512

    @property
    def label(self) -> str:
        return f"encode {self.model}/{self.corpus}/{self.B}"

    @property
    def arch(self) -> str:
        return split_model(self.model)[0]

    @property
    def size(self) -> str:
        return split_model(self.model)[1]

    @classmethod
    def parse(cls, spec: str, max_len: int = 512) -> InferenceCase:
        """"minilm/wikipedia/128", "roberta-base/wikipedia/128"."""
        parts = spec.strip().split("/")
        arch, size = split_model(parts[0]) if parts else (BERT, "")
        known = size in (MODELS if arch == BERT else PRESETS)
        if len(parts) != 3 or not known or parts[1] not in CORPORA or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"inference case must look like minilm/wikipedia/128 with a model from "
                             f"{sorted(MODELS)} (or ARCH-preset, ARCH from {sorted(HF_ARCHS)}) and a corpus from "
                             f"{list(CORPORA)}, got {spec!r}")
        return cls(parts[0], parts[1], int(parts[2]), max_len)

    def lengths(self) -> list[int]:
        pool = LENGTHS[self.corpus]
        return [min(self.max_len, pool[i % len(pool)]) for i in range(self.B)]


def inference_candidates(env: BenchEnv, *, allow_compile: bool = True, allow_hf: bool = True,
                         only: Sequence[str] | None = None, arch: str = BERT) -> tuple[list[str], dict[str, str]]:
    """Candidate names that can run here, and the skipped ones with their reason."""
    names, skipped = ["fastbert-ref"], {}
    why_fb = "no CUDA device: the fused model is the reference model on a CPU (see fastbert-ref)" if not env.cuda \
        else _fastbert_skip_reason(env)
    if arch != BERT:
        names, why_fb = [], f"fastbert's own models are BERTs: for {arch} its layers run as hf-sdpa+optimize"
        skipped["fastbert-ref"] = why_fb
    if why_fb:
        skipped["fastbert"] = why_fb
    else:
        names.insert(0, "fastbert")
    hf_why = "" if allow_hf else "transformers baselines switched off (--no-hf)"
    if not hf_why:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf_why = "transformers is not installed"
    hf = (BASELINE, "hf-sdpa-compile", "hf-sdpa+optimize", peers.SENTENCE_TRANSFORMERS)
    if hf_why:
        skipped.update({n: hf_why for n in hf})
    else:
        names.append(BASELINE)
        why_c = _compile_skip_reason(env, allow_compile)
        if why_c:
            skipped["hf-sdpa-compile"] = why_c
        else:
            names.append("hf-sdpa-compile")
        if not env.cuda:
            skipped["hf-sdpa+optimize"] = "no CUDA device: fastbert.optimize swaps in CUDA kernels"
        else:
            names.append("hf-sdpa+optimize")
        attn_names, attn_skipped = hf_attention_candidates(env)
        names += attn_names
        skipped.update(attn_skipped)
        _, why_st = peers.sentence_transformers(env)
        if why_st:
            skipped[peers.SENTENCE_TRANSFORMERS] = why_st
        else:
            names.append(peers.SENTENCE_TRANSFORMERS)
    if only is not None:
        names = [n for n in names if n in only or n == BASELINE]
        skipped = {k: v for k, v in skipped.items() if k in only}
    return names, skipped


def make_encode_batch(cfg: BertConfig, lengths: Sequence[int], device: torch.device, seed: int = 0):
    """input_ids / attention_mask / token_type_ids [B, max(lengths)]: random ids, [CLS] first, [SEP] last."""
    B, T = len(lengths), max(lengths)
    g = _gen(device, seed)
    lens = torch.tensor(list(lengths), device=device)
    mask = torch.arange(T, device=device)[None, :] < lens[:, None]  # (B, T)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g, device=device).masked_fill(~mask, 0)
    ids[:, 0] = 101
    ids[torch.arange(B, device=device), lens - 1] = 102
    return dict(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids))


def _same_length_texts(lengths: Sequence[int]) -> list[str]:
    """Texts that a BERT uncased WordPiece tokenizer turns into exactly these lengths ("the" is one token)."""
    return [" ".join(["the"] * max(0, n - 2)) for n in lengths]


def _sentence_transformer(hf_model: torch.nn.Module, env: BenchEnv) -> Any:
    """A SentenceTransformer (Transformer + mean pooling) over `hf_model`'s weights, built from a temporary folder
    with the MiniLM tokenizer (the `data` extra)."""
    from .. import resources

    cls, why = peers.sentence_transformers(env)
    if cls is None:
        raise RuntimeError(why)
    src = resources.minilm_path()  # its vocab.txt / tokenizer files: the texts are tokenized for real
    folder = Path(tempfile.mkdtemp(prefix="fastbert_st_"))
    hf_model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            (folder / name).write_bytes((src / name).read_bytes())
    return cls(str(folder), device=str(env.device)).to(env.dtype).eval()


def _hf_encoder(arch: str, cfg: BertConfig, attn: str) -> torch.nn.Module:
    """transformers' encoder of `arch` at `cfg`'s size with attention implementation `attn`."""
    if arch != BERT:
        return hf_arch_model(arch, "base", cfg, attn)
    from transformers import BertModel as HFBertModel

    from .train_step import hf_config

    try:
        return HFBertModel._from_config(hf_config(cfg), attn_implementation=attn)
    except (AttributeError, TypeError):  # an older transformers
        hcfg = hf_config(cfg)
        hcfg._attn_implementation = attn
        return HFBertModel(hcfg)


def _build(names: Sequence[str], cfg: BertConfig, env: BenchEnv, errors: dict[str, str], arch: str = BERT):
    """name → forward callable factory inputs: the models, sharing the baseline's weights where possible."""
    from ..models import BertModel  # the fused model users import (fastbert/models.py)

    models: dict[str, Any] = {}
    hf = None
    if any(n.startswith("hf") or n == peers.SENTENCE_TRANSFORMERS for n in names):
        hf = _hf_encoder(arch, cfg, "sdpa").to(env.device, env.dtype).eval()
    for n in names:
        try:
            if n in ("fastbert", "fastbert-ref"):
                m = BertModel(cfg if n == "fastbert" else cfg.with_fusions(False))
                if hf is not None:
                    missing, _ = m.load_state_dict(hf.state_dict(), strict=False)
                    if missing:
                        raise RuntimeError(f"weights of transformers' BertModel missing here: {missing[:3]}")
                models[n] = m.to(env.device, env.dtype).eval()
            elif n == BASELINE:
                models[n] = hf
            elif n == "hf-sdpa-compile":
                models[n] = torch.compile(hf)
            elif n in (HF_FLASH, HF_ATTN_FASTBERT):  # the baseline's weights under another attention implementation
                m = _hf_encoder(arch, cfg, hf_attn(n))
                m.load_state_dict(hf.state_dict())
                models[n] = m.to(env.device, env.dtype).eval()
            elif n == "hf-sdpa+optimize":
                from ..optimize import optimize

                m = copy.deepcopy(hf)
                models[n] = (optimize(m) or m).eval()
            elif n == peers.SENTENCE_TRANSFORMERS:
                models[n] = _sentence_transformer(hf, env)
        except Exception as e:
            errors[n] = f"build: {_short_error(e)}"
    return models


def _encode_fn(name: str, model: Any, batch: dict[str, torch.Tensor], texts: list[str],
               B: int) -> Callable[[], torch.Tensor]:
    if name == peers.SENTENCE_TRANSFORMERS:
        def st() -> torch.Tensor:
            with torch.inference_mode():
                return model.encode(texts, batch_size=B, convert_to_tensor=True, show_progress_bar=False)
        return st

    def fwd() -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"])
        return out[0]  # last hidden state (B, T, H)
    return fwd


def run_inference_cases(cases: Sequence[InferenceCase], env: BenchEnv, *, rounds: int = 3, rep_ms: float = 200.0,
                        cpu_reps: int = 3, allow_compile: bool = True, allow_hf: bool = True,
                        only: Sequence[str] | None = None,
                        callables: dict[str, Callable[[], Any]] | None = None) -> list[Row]:
    """Every case's candidates interleaved; cases of one model share the models (built once). `callables`
    receives each working candidate's call of the last case (models kept alive), as in `run_op_case`."""
    rows: list[Row] = []
    dt = str(env.dtype).replace("torch.", "")
    by_model: dict[str, list[InferenceCase]] = {}
    for c in cases:
        by_model.setdefault(c.model, []).append(c)
    for group in by_model.values():
        arch = group[0].arch
        names, skipped = inference_candidates(env, allow_compile=allow_compile, allow_hf=allow_hf, only=only,
                                              arch=arch)
        cfg = BertConfig(**MODELS[group[0].size])
        errors: dict[str, str] = {}
        models = _build(names, cfg, env, errors, arch)
        for case in group:
            lengths = case.lengths()
            shape = (f"B={case.B} T={max(lengths)} L={cfg.num_hidden_layers} H={cfg.hidden_size} "
                     f"mean_len={sum(lengths) / len(lengths):.1f}")

            def row(n: str, m: str, case=case, shape=shape, **kw) -> Row:
                return Row("inference", case.label, case.model, n, m, dt, shape, **kw)

            rows += report_rows([row(n, "-", note=f"skipped: {why}") for n, why in skipped.items()], env, BASELINE)
            case_rows: list[Row] = []
            batch = make_encode_batch(cfg, lengths, env.device)
            texts = _same_length_texts(lengths)
            fns, warm, case_err = {}, {}, dict(errors)
            for n, m in models.items():
                fn = _encode_fn(n, m, batch, texts, case.B)
                try:
                    warm[n] = first_call_s(fn, env.device)
                    fn()
                    fns[n] = fn
                except Exception as e:
                    case_err[n] = _short_error(e)
            parity: dict[str, str] = {}
            if BASELINE in fns:
                real = batch["attention_mask"].bool()
                ref = fns[BASELINE]()[real].float()
                tol = 1e-4 if env.dtype == torch.float32 else 3e-2
                for n in fns:
                    if n not in (BASELINE, peers.SENTENCE_TRANSFORMERS):  # ST returns pooled embeddings
                        err = float((fns[n]()[real].float() - ref).norm() / ref.norm().clamp_min(1e-12))
                        parity[n] = f"{'ok' if err <= tol else 'FAIL'} {err:.1e}"
            ms = interleaved_ms(fns, env.device, rounds=rounds, rep_ms=rep_ms, cpu_reps=cpu_reps, errors=case_err)
            for n in names:
                if n not in ms:
                    case_rows.append(row(n, "fwd", note=f"error: {case_err.get(n, 'not measured')}"))
                    continue
                r = row(n, "fwd", ms=ms[n], warm_s=warm.get(n), seq_per_s=case.B / (ms[n] * 1e-3),
                        parity=parity.get(n, ""))
                if n == peers.SENTENCE_TRANSFORMERS:
                    r.note = "end to end: tokenization, length sorting, forward and mean pooling"
                if env.cuda:
                    try:
                        r.extra_GB = extra_bytes(fns[n], env.device) / 1e9
                    except Exception as e:
                        r.note = f"memory: {_short_error(e)}"
                case_rows.append(r)
            rows += report_rows(case_rows, env, BASELINE)  # this case's rows land now, before the next case
            if callables is not None:
                callables.clear()
                callables.update(fns)
            del fns, batch
        del models
        free_memory(env.device)
    return rows
