"""The models users import: the reference architecture of `fastbert.modeling` with the fused layers its config's
flags ask for (`fastbert.fused`), chosen here, one level above both.

    fastbert.BertForPreTraining(config)   = modeling.BertForPreTraining(config), then fused.apply_fusions(model)

Each class subclasses its reference class (same constructor, parameters, `state_dict` keys, `from_pretrained`,
`save_pretrained`, forward), so `isinstance(model, fastbert.modeling.BertModel)` holds and a checkpoint moves
between the two unchanged. With every fusion flag off (`config.with_fusions(False)`) the model is the reference
itself. `model.fusion_report(device)` says which path each module takes (as `fastbert.fusion_report(model)`).
"""

from __future__ import annotations

import torch

from . import modeling
from .fused import apply_fusions, fusion_report

__all__ = [
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertModel",
]


class _FusedFromConfig:
    """Mixin placed before a reference model class: its constructor, then the fused modules swapped in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        apply_fusions(self)

    def fusion_report(self, device: torch.device | str | None = None) -> dict[str, str]:
        """Which path (fused kernel or reference) each module takes for tensors on `device`."""
        return fusion_report(self, device)


class BertModel(_FusedFromConfig, modeling.BertModel):
    __doc__ = modeling.BertModel.__doc__


class BertForPreTraining(_FusedFromConfig, modeling.BertForPreTraining):
    __doc__ = modeling.BertForPreTraining.__doc__


class BertForMaskedLM(_FusedFromConfig, modeling.BertForMaskedLM):
    __doc__ = modeling.BertForMaskedLM.__doc__


class BertForSequenceClassification(_FusedFromConfig, modeling.BertForSequenceClassification):
    __doc__ = modeling.BertForSequenceClassification.__doc__


class BertForQuestionAnswering(_FusedFromConfig, modeling.BertForQuestionAnswering):
    __doc__ = modeling.BertForQuestionAnswering.__doc__
