"""Useful training FLOPs of BERT, for MFU (DESIGN.md): one formula, shared by `fastbert-bench` and
`fastbert-pretrain`.

    F = 72·L·H² + 12·L·T·H + 6·H·V·f     FLOP per real token, forward + backward

Derivation (one token, L layers of width H, sequence length T, vocabulary V; a matmul of a token's row with a
K×N weight is 2·K·N FLOP forward, and its backward twice that — input and weight gradients — so ×3 in all):

- the layer's weights: Q, K, V and output projections 4·H², the feed-forward 2·H·4H = 8·H² (I = 4H):
  12·H² multiply-adds = 24·H² FLOP forward, 72·L·H² with the backward;
- attention: the token's query against T keys (QKᵀ) and its probabilities against T values (P·V), T·H
  multiply-adds each = 4·T·H FLOP forward, 12·L·T·H with the backward;
- the MLM decoder: H·V multiply-adds for each predicted token, a fraction f of them (0.15 when the head
  decodes the masked positions only): 6·H·V·f.

Caution: it counts "useful" work only — not the embeddings, LayerNorms, softmax, GELU, the MLM transform, the
pooler or NSP head, nor the work spent on padding — and assumes intermediate_size = 4·hidden_size (every BERT
preset), so MFU from it is comparable across implementations, not a measure of all the arithmetic done.
"""

from __future__ import annotations

from .config import BertConfig


def train_flops_per_token(config: BertConfig, seq_len: int, mlm_fraction: float = 0.15) -> float:
    """Useful forward + backward FLOP per real token: 72·L·H² + 12·L·T·H + 6·H·V·f (module docstring).

    `seq_len` is the T the token attends over (its sequence's real length); `mlm_fraction` is f, the share
    of tokens the MLM head decodes. BERT-base at T=128, f=0.15: 5.45e8.
    """
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    return 72.0 * L * H * H + 12.0 * L * seq_len * H + 6.0 * H * V * mlm_fraction
