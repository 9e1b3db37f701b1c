"""The errors that used to be poor (an IndexError deep inside, or silence), each now a ValueError naming the
argument: bool token_type_ids, position_ids past the table, no tokens, labels out of range on the reference
losses (MLM, NSP, classification), NaN regression labels, pad_input with too small a batch."""

from __future__ import annotations

import pytest
import torch

from fastbert import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel
from kernels.padding import pad_input, unpad_input

CFG = dict(vocab_size=37, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
           max_position_embeddings=12)


def model(cls=BertModel, **kw):
    torch.manual_seed(0)
    return cls(BertConfig(**CFG, **kw).with_fusions(False)).eval()


def ids(B=2, T=5):
    return torch.randint(5, 37, (B, T), generator=torch.Generator().manual_seed(1))


def test_bool_token_type_ids():
    x = ids()
    with pytest.raises(ValueError, match="token_type_ids must be integer segment ids .* got torch.bool"):
        model()(x, token_type_ids=torch.zeros_like(x, dtype=torch.bool))


def test_position_ids_past_the_table_and_of_a_wrong_shape():
    m, x = model(), ids()
    m(x, position_ids=torch.arange(5)[None])  # in range: fine
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_position_embeddings=12\), got \[8, 12\]"):
        m(x, position_ids=torch.arange(8, 13)[None])
    with pytest.raises(ValueError, match=r"position_ids must be \[batch or 1, seq_len=5\]"):
        m(x, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        m(x, position_ids=torch.arange(5.0)[None])


def test_no_tokens():
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape \(2, 0\)\)"):
        model()(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("masked_only", [False, True])
def test_mlm_label_out_of_range_on_the_reference_path(masked_only):
    x = ids()
    labels = torch.full_like(x, -100)
    labels[0, 1] = 37  # == vocab_size
    with pytest.raises(ValueError, match=r"labels \(MLM\) must lie in \[0, 37\) or -100 \(ignored\), got .*37\]"):
        model(BertForPreTraining)(x, labels=labels, masked_only=masked_only)
    labels[0, 1] = -3
    with pytest.raises(ValueError, match=r"labels \(MLM\) must lie in"):
        model(BertForPreTraining)(x, labels=labels, masked_only=masked_only)


def test_nsp_label_out_of_range():
    with pytest.raises(ValueError, match=r"next_sentence_label must lie in \[0, 2\) or -100 \(ignored\), got "
                                         r"values in \[0, 2\]"):
        model(BertForPreTraining)(ids(), next_sentence_label=torch.tensor([0, 2]))


def test_class_label_out_of_range_and_nan_scores():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or -100 \(ignored\), got values in \[1, 3\]"):
        model(BertForSequenceClassification, num_labels=3)(ids(), labels=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="labels must be class ids"):
        model(BertForSequenceClassification, num_labels=3)(ids(), labels=torch.tensor([1.0, 2.5]))
    out = model(BertForSequenceClassification, num_labels=3)(ids(), labels=torch.tensor([1.0, 2.0]))
    assert torch.isfinite(out.loss)  # whole-number floats are class ids
    with pytest.raises(ValueError, match=r"labels \(regression scores\) hold NaN or inf"):
        model(BertForSequenceClassification, num_labels=1)(ids(), labels=torch.tensor([0.5, float("nan")]))


def test_pad_input_with_too_small_a_batch():
    x = torch.randn(3, 7, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    packed, indices, _, _ = unpad_input(x, mask)
    torch.testing.assert_close(pad_input(packed, indices, 3, 7), x * mask[..., None])
    with pytest.raises(ValueError, match=r"B=1, T=7 is too small for indices up to 13"):
        pad_input(packed, indices, 1, 7)  # (index_copy raised an IndexError naming nothing)
    with pytest.raises(ValueError, match=r"B=1, T=7 holds 7 positions but x_packed has 10 tokens"):
        pad_input(packed[:10], indices[:10].clamp(max=6), 1, 7)
    with pytest.raises(ValueError, match="B and T must be >= 0"):
        pad_input(packed, indices, -1, 7)
