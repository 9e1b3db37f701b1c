"""The reference model does not import the fused one: the choice of fused layers is made one level up, by the
model classes users import (`fastbert/models.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastbert
from fastbert import fused, modeling, models

FASTBERT = Path(fastbert.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (late imports inside functions included), made absolute."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                base = "fastbert." + base if base else "fastbert"
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_reference_modules_never_import_the_fused_ones():
    for name in ("modeling.py", "config.py", "checkpoint.py"):
        imported = _imported_modules(FASTBERT / name)
        assert not {m for m in imported if m.startswith(("fastbert.fused", "fastbert.models", "fastbert.optimize",
                                                         "kernels"))}, (name, imported)
    assert "fastbert.modeling" in _imported_modules(FASTBERT / "fused.py")  # the one direction left


def test_user_classes_choose_the_fused_layers():
    cfg = fastbert.BertConfig.from_preset("tiny", num_hidden_layers=1)
    for name in ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
                 "BertForQuestionAnswering"):
        user, ref = getattr(fastbert, name), getattr(modeling, name)
        assert user is getattr(models, name) and issubclass(user, ref) and user.__name__ == name
        fused_model = user(cfg)
        encoder = fused_model.encoder if name == "BertModel" else fused_model.bert.encoder
        assert isinstance(encoder, fused.FusedEncoder), name
        report = fused_model.fusion_report("cpu")
        assert report == fastbert.fusion_report(fused_model, "cpu") and report, name
        plain = user(cfg.with_fusions(False))  # every flag off: the reference itself
        assert type(plain.encoder if name == "BertModel" else plain.bert.encoder) is modeling.BertEncoder
        # The reference classes are the reference whatever the flags say, and share the state_dict keys.
        reference = ref(cfg)
        assert type(reference.encoder if name == "BertModel" else reference.bert.encoder) is modeling.BertEncoder
        assert list(reference.state_dict()) == list(fused_model.state_dict())
