"""The reference BERT encoder in plain PyTorch, and the task heads on top of it.

This file is the truth the fused layers are checked against. It follows the original BERT (Google's TF code,
NVIDIA's PyTorch port) and uses Hugging Face's module names, so `state_dict` keys and shapes match
`transformers`' `BertModel` / `BertForPreTraining` / … exactly:

    embeddings = LayerNorm(word + position + segment), then dropout
    layer      = LN(x + dropout(Wo · attn(x))) → LN(h + dropout(W2 · gelu(W1 · h)))
    attn       = softmax(QKᵀ/√d + mask) → dropout → ·V, heads concatenated
    pooler     = tanh(W · h[:, 0])
    MLM head   = LN(gelu(W · h)) · Eᵀ + b   (E = the word embeddings, tied)
    NSP head   = linear(H → 2) on the pooled output

Attention masks are `[B, T]` with 1 (True) for real tokens. A fully padded row attends uniformly over its
(padding) keys, as Hugging Face's eager attention does: finite, never NaN. (Hugging Face's default SDPA path
gives such a row a zero attention context instead; real rows agree either way.)

The models here are the reference whatever the config's `fused_*` / `unpad` flags say: the classes users import
(`fastbert.BertModel`, ..., defined in `fastbert/models.py`) build these and swap in the fused layers the flags
ask for. This module never imports `fastbert.fused` (which imports it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig
from .packing import PackedBatch

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- outputs
class BertModelOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, H)
    pooler_output: torch.Tensor | None  # (B, H)


class PreTrainingOutput(NamedTuple):
    loss: torch.Tensor | None  # mlm_loss + nsp_loss (those given)
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    prediction_logits: torch.Tensor | None  # (B, T, V), or (n_labelled, V) with masked_only, or None
    seq_relationship_logits: torch.Tensor  # (B, 2)
    mlm_correct: torch.Tensor | None  # number of labelled positions predicted right (int64, no grad)
    mlm_count: torch.Tensor | None  # number of labelled positions (int64)


class MaskedLMOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    mlm_correct: torch.Tensor | None
    mlm_count: torch.Tensor | None


class SequenceClassifierOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, num_labels)


class QuestionAnsweringOutput(NamedTuple):
    loss: torch.Tensor | None
    start_logits: torch.Tensor  # (B, T)
    end_logits: torch.Tensor  # (B, T)


# ---------------------------------------------------------------------------------------------- input checks
def check_inputs(
    config: BertConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Clear errors for the mistakes people make feeding a BERT (instead of an index error deep inside)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError(f"input_ids has no tokens (shape {tuple(input_ids.shape)}); every sequence needs at least "
                         "[CLS]")
    if T > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {T} exceeds max_position_embeddings ({config.max_position_embeddings})"
        )
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")
    if token_type_ids is not None and (token_type_ids.is_floating_point() or token_type_ids.dtype == torch.bool):
        raise ValueError(f"token_type_ids must be integer segment ids (0 for A, 1 for B), got {token_type_ids.dtype}")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or \
                position_ids.dtype == torch.bool:
            raise ValueError(f"position_ids must be an integer tensor, got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
        if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must be [batch or 1, seq_len={T}], got shape {tuple(position_ids.shape)}")
    # Value checks cost a device sync on CUDA, where an out-of-range id raises a device assert anyway.
    if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            if ((attention_mask != 0) & (attention_mask != 1)).any():
                raise ValueError(
                    "attention_mask must hold 1 for real tokens and 0 for padding (not an additive "
                    f"0 / -10000 mask), got values in [{attention_mask.min().item()}, {attention_mask.max().item()}]"
                )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got [{lo}, {hi}]")
        if token_type_ids is not None:
            lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
            if lo < 0 or hi >= config.type_vocab_size:
                raise ValueError(
                    f"token_type_ids must lie in [0, type_vocab_size={config.type_vocab_size}), got [{lo}, {hi}]"
                )
        if position_ids is not None:
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= config.max_position_embeddings:
                raise ValueError(f"position_ids must lie in [0, max_position_embeddings="
                                 f"{config.max_position_embeddings}), got [{lo}, {hi}]")


def check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Labels of a reference-path loss must be class ids in [0, num_classes) (or `ignore_index`): a clear
    ValueError instead of an IndexError inside cross_entropy. Checked on the CPU only, as check_inputs (a value
    check costs a device sync on CUDA, where the fused paths check their own)."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class ids, got {labels.dtype}")
    if labels.device.type != "cpu" or not labels.numel() or torch.compiler.is_compiling():
        return
    real = labels if ignore_index is None else labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_classes):
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or {ignore_index} (ignored)")
        raise ValueError(f"{name} must lie in {allowed}, got values in [{int(real.min())}, {int(real.max())}]")


def _check_packed(packed: object, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"packed must be a fastbert.packing.PackedBatch or None, got {type(packed).__name__}")
    packed.check(input_ids, attention_mask)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32: fp16/bf16 logits are upcast, float32/float64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def extended_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] (1 = real) → bool [B, 1, 1, T] key mask (True = attend)."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def mlm_scores(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, masked_only: bool, packed: PackedBatch | None = None
):
    """Run the MLM head and its loss. hidden (B, T, H), labels (B, T) with -100 where nothing is predicted.

    Returns (logits, loss, correct, count): logits (B, T, V), or (n_labelled, V) with `masked_only` (rows in
    row-major order of the labelled positions); loss = mean cross-entropy over labelled positions, 0 with
    zero gradients when there is none (plain cross_entropy would give NaN there). With `packed` (checked
    against labels by the caller) the labelled rows are gathered at its positions: no data-dependent shape.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the input has {tuple(hidden.shape[:-1])}")
    fused = getattr(head, "fused_mlm_scores", None)  # fastbert.fused.FusedLMPredictionHead
    if fused is not None:
        out = fused(hidden, labels, masked_only, packed)  # None: no fused path for these tensors
        if out is not None:
            return out
    flat_l = labels.reshape(-1)  # (B·T,)
    keep = flat_l != IGNORE_INDEX
    if packed is not None and packed.labelled_positions is not None:
        positions = packed.labelled_positions  # (n,)
        target = flat_l.index_select(0, positions)  # (n,)
        if masked_only:
            logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))  # (n, V)
            picked = logits
        else:
            logits = head(hidden)  # (B, T, V)
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)  # (n, V)
        loss = picked.sum() * 0.0 if packed.num_labelled == 0 else F.cross_entropy(upcast(picked), target)
        return logits, loss, (picked.detach().argmax(-1) == target).sum(), keep.sum()
    if masked_only:
        logits = head(hidden.reshape(-1, hidden.shape[-1])[keep])  # (n, V)
        picked = logits
    else:
        logits = head(hidden)  # (B, T, V)
        picked = logits.reshape(-1, logits.shape[-1])[keep]  # (n, V)
    target = flat_l[keep]
    check_labels("labels (MLM)", flat_l, picked.shape[-1], IGNORE_INDEX)
    if picked.shape[0] == 0:
        loss = picked.sum() * 0.0
    else:
        loss = F.cross_entropy(upcast(picked), target)
    correct = (picked.detach().argmax(-1) == target).sum()
    return logits, loss, correct, keep.sum()


# ---------------------------------------------------------------------------------------------- layers
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :T]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )  # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        H = config.hidden_size
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        q = self.query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        v = self.value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, T, T)
        if key_mask is not None:
            # masked_fill (not + mask): the fill value cannot overflow to -inf in fp16, so a fully
            # padded row stays a finite, uniform distribution.
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = probs @ v  # (B, h, T, d)
        return ctx.transpose(1, 2).reshape(B, T, H)  # (B, T, H)


class BertSelfOutput(nn.Module):
    """dense → dropout → + residual → LayerNorm (after attention)."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x), approximate=self.approximate)


class BertOutput(BertSelfOutput):
    """dense 4H → H → dropout → + residual → LayerNorm (after the FFN)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, key_mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packed: PackedBatch | None = None
    ) -> torch.Tensor:
        """`packed` (the batch's packing metadata) changes nothing here: the reference always runs padded."""
        key_mask = extended_mask(attention_mask)
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x), approximate=self.approximate))


class BertLMPredictionHead(nn.Module):
    """transform → decoder tied to the word embeddings, plus its own bias (`bias` and `decoder.bias` are
    one parameter, saved under both names as Hugging Face does)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


# ---------------------------------------------------------------------------------------------- models
class BertPreTrainedModel(nn.Module):
    """Weight init as the original BERT, and checkpoint load/save (see fastbert/checkpoint.py)."""

    # Prefix under which the encoder sits in this model's state_dict ("" for BertModel itself).
    base_prefix = "bert."

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise ValueError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """Original-BERT init, then tie the decoder. (The fused modules are swapped in one level up, by the
        model classes of `fastbert.models`; this module never imports `fastbert.fused`.)"""
        self.apply(self._init_module)
        self.tie_weights()

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Tie the MLM decoder to the word embeddings (no-op for models without an MLM head)."""
        cls = getattr(self, "cls", None)
        if cls is not None:
            cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @classmethod
    def from_pretrained(cls, folder, config: BertConfig | None = None, **config_overrides):
        from .checkpoint import load_pretrained

        return load_pretrained(cls, folder, config=config, **config_overrides)

    def save_pretrained(self, folder) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, folder)


class BertModel(BertPreTrainedModel):
    base_prefix = ""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed: PackedBatch | None = None,
    ) -> BertModelOutput:
        """`packed`: the batch's `fastbert.packing.PackedBatch` (from the data loader), or None. With it the fused
        encoder unpads without a host synchronisation; without it, behaviour is unchanged."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        if packed is not None:
            _check_packed(packed, input_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        hidden = self.encoder(x, attention_mask, packed) if packed is not None else self.encoder(x, attention_mask)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BertModelOutput(hidden, pooled)


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        masked_only: bool = False,
        packed: PackedBatch | None = None,
    ) -> PreTrainingOutput:
        """`labels` (B, T): token id to predict, -100 elsewhere. With `masked_only`, the MLM head decodes
        only the labelled positions (prediction_logits is then (n_labelled, V), in row-major order). `packed`:
        the batch's packing metadata (see `BertModel.forward`), which also names the labelled positions."""
        if packed is not None and labels is not None:
            _check_packed(packed, input_ids, attention_mask)
            packed.check_labels(labels, self.config.vocab_size)
        hidden, pooled = self.bert(input_ids, attention_mask, token_type_ids, packed=packed)
        nsp_logits = self.cls.seq_relationship(pooled)  # (B, 2)
        mlm_loss = nsp_loss = correct = count = None
        if labels is not None:
            logits, mlm_loss, correct, count = mlm_scores(self.cls.predictions, hidden, labels, masked_only, packed)
        elif masked_only:
            raise ValueError("masked_only=True needs labels (it scores the labelled positions only)")
        else:
            logits = self.cls.predictions(hidden)  # (B, T, V)
        if next_sentence_label is not None:
            check_labels("next_sentence_label", next_sentence_label, 2, IGNORE_INDEX)
            nsp_loss = F.cross_entropy(upcast(nsp_logits), next_sentence_label.reshape(-1))
        parts = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(parts) if parts else None
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, logits, nsp_logits, correct, count)


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masked_only: bool = False,
        packed: PackedBatch | None = None,
    ) -> MaskedLMOutput:
        if packed is not None and labels is not None:
            _check_packed(packed, input_ids, attention_mask)
            packed.check_labels(labels, self.config.vocab_size)
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids, packed=packed)
        loss = correct = count = None
        if labels is not None:
            logits, loss, correct, count = mlm_scores(self.cls.predictions, hidden, labels, masked_only, packed)
        elif masked_only:
            raise ValueError("masked_only=True needs labels (it scores the labelled positions only)")
        else:
            logits = self.cls.predictions(hidden)  # (B, T, V)
        return MaskedLMOutput(loss, logits, correct, count)


class BertForSequenceClassification(BertPreTrainedModel):
    """Single sentence or sentence pair → num_labels logits from the pooled [CLS]; MSE when num_labels == 1."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed: PackedBatch | None = None,
    ) -> SequenceClassifierOutput:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, packed=packed)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                scores = upcast(logits.squeeze(-1))  # (B,)
                if labels.device.type == "cpu" and labels.is_floating_point() and not torch.isfinite(labels).all():
                    raise ValueError("labels (regression scores) hold NaN or inf")
                loss = F.mse_loss(scores, labels.reshape(-1).to(scores.dtype))
            else:
                if labels.is_floating_point() and (labels != labels.round()).any():
                    raise ValueError("labels must be class ids for num_labels > 1, got non-integer floats")
                check_labels("labels", labels.long(), self.num_labels, IGNORE_INDEX)
                loss = F.cross_entropy(upcast(logits), labels.reshape(-1).long())
        return SequenceClassifierOutput(loss, logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span QA (SQuAD): start/end logits per token; loss = mean of the start and end cross-entropies,
    positions outside the sequence clamped and ignored, as Hugging Face does."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        packed: PackedBatch | None = None,
    ) -> QuestionAnsweringOutput:
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids, packed=packed)
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, T)
            end = end_positions.reshape(-1).clamp(0, T)
            loss = (
                F.cross_entropy(upcast(start_logits), start, ignore_index=T)
                + F.cross_entropy(upcast(end_logits), end, ignore_index=T)
            ) / 2
        return QuestionAnsweringOutput(loss, start_logits, end_logits)
