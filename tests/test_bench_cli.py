"""CPU smoke test of the fastbert-bench CLI, its CSV writer and its FLOP formulas (no GPU needed)."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from fastbert import BertConfig
from fastbert.bench import CSV_COLUMNS, append_csv, attention_flops, main, train_flops
from fastbert.flops import train_flops_per_token


def test_flop_formulas_match_the_design_anchors():
    # DESIGN.md: BERT-base at T=128 is 5.45e8 useful FLOP per token.
    base = BertConfig.from_preset("base")
    assert train_flops_per_token(base, 128) == pytest.approx(5.45e8, rel=2e-3)
    # A padded batch is credited with its real tokens only, each sequence at its own length.
    assert train_flops(base, [128, 64]) == pytest.approx(
        128 * train_flops_per_token(base, 128) + 64 * train_flops_per_token(base, 64))
    # The H200 anchor: eager attention fwd+bwd at B=256, T=128 took 1.8154 ms for 24.84 TFLOP/s.
    assert 3.5 * attention_flops(256, 128, 12, 64) / 1.815392e-3 / 1e12 == pytest.approx(24.8416, rel=1e-4)


def test_csv_header_written_once(tmp_path):
    path = tmp_path / "kernels.csv"
    append_csv(path, [{"case": "a", "ms": 1.5, "gpu": "x"}])
    append_csv(path, [{"case": "b", "ms": None, "note": "skipped: why"}])
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(CSV_COLUMNS)
    assert [row[CSV_COLUMNS.index("case")] for row in lines[1:]] == ["a", "b"]
    assert lines[1][CSV_COLUMNS.index("ms")] == "1.5" and lines[2][CSV_COLUMNS.index("ms")] == ""
    # A file with other columns is never mixed with this layout.
    other = tmp_path / "train_step.csv"
    other.write_text("old,columns\n1,2\n")
    moved = append_csv(other, [{"case": "c"}])
    assert moved != other and other.read_text() == "old,columns\n1,2\n"


def test_cli_quick_on_cpu(tmp_path, capsys):
    threads = torch.get_num_threads()  # the CLI runs on one thread; give the rest of the session its own back
    try:
        rc = main(["--quick", "--rounds", "1", "--csv-dir", str(tmp_path), "--json", str(tmp_path / "rows.json"),
                   "--ops", "bias_dropout_add_layernorm", "--modes", "fwd+bwd", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipped: no CUDA device" in out
    # Every table printed holds figures measured here, on the CPU; none claims a GPU.
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    assert [h.split()[1] for h in headers] == ["kernels", "attention", "train"]
    assert all(h.split("(")[1].startswith("cpu") for h in headers), headers
    assert "bf16" not in "".join(headers) and "H100" not in out and "H200" not in out
    for name in ("kernels.csv", "attention.csv", "train_step.csv"):
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.DictReader(f))
        measured = [r for r in rows if r["ms"]]
        assert measured, name
        assert all(r["device"] == "cpu" and r["torch"] and r["run_id"] for r in rows)
        assert all(float(r["ms"]) > 0 for r in measured)
    with open(tmp_path / "train_step.csv", newline="") as f:
        train = {r["candidate"]: r for r in csv.DictReader(f) if r["ms"]}
    assert "fastbert-ref" in train and "hf-sdpa" in train  # the reference model vs transformers, same run
    with open(tmp_path / "train_step.csv", newline="") as f:  # the BERT family's quick case ran too
        assert any(r["case"].startswith("train roberta-") and r["ms"] for r in csv.DictReader(f))
    assert train["hf-sdpa"]["speedup"] == "1"


def test_cli_rejects_bad_train_case(capsys):
    assert main(["--family", "train", "--train-cases", "base/128", "--device", "cpu", "--csv-dir", ""]) == 2
    assert "train case must look like" in capsys.readouterr().err


def test_gpu_check_targets_read_the_rows():
    """benchmarks/gpu_check.py's pass/fail table, on made-up rows (the script itself needs a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(gpu_check)
    finally:
        del sys.modules["gpu_check"]

    def row(family, case, size, cand, mode, shape="", **kw):
        return dict(family=family, case=case, size=size, candidate=cand, mode=mode, shape=shape, **kw)

    att = "B=256 T=128 h=12 d=64 p=0.1 padded T/2..T"
    ln, mlm, train = "bias_dropout_add_layernorm", "mlm_cross_entropy", "train base/128/256"
    rows = [
        row("attention", "attention", "base", "sdpa", "fwd+bwd", att, ms=1.0),
        row("attention", "attention", "base", "fastbert", "fwd+bwd", att, ms=0.8),
        row("attention", "attention", "base", "fastbert-varlen", "fwd+bwd", att, ms=0.7),
        row("kernels", ln, "base", "fastbert", "fwd", gbps=3000.0, ms=0.1),
        row("kernels", ln, "base", "eager", "fwd+bwd", ms=1.0),
        row("kernels", ln, "base", "fastbert", "fwd+bwd", ms=0.4),
        row("kernels", mlm, "base", "eager", "fwd+bwd", ms=3.0, extra_GB=2.0),
        row("kernels", mlm, "base", "fastbert", "fwd+bwd", ms=1.0, extra_GB=0.4),
        row("train", train, "base", "fastbert", "step", seq_per_s=6000.0, peak_GB=10.0, ms=1.0),
        row("train", train, "base", "hf-sdpa-compile", "step", seq_per_s=4000.0, peak_GB=21.0, ms=1.0),
        row("train", train, "base", "hf-sdpa", "step", seq_per_s=2800.0, peak_GB=26.0, ms=1.0),
    ]
    result = {name: passed for name, _, _, passed in gpu_check.targets(rows, ceil_gbps=4000.0)}
    assert result["attention fused / SDPA-mask time, B=256 T=128"] is True  # 0.8 <= 0.9
    assert result["attention varlen / SDPA-mask time, B=256 T=128"] is False  # 0.7 > 0.6
    assert result["attention fused / SDPA-mask time, B=32 T=512"] is None  # not measured
    assert result["LayerNorm fwd bandwidth / copy ceiling (base)"] is False  # 75% < 80%
    assert result["LayerNorm fwd+bwd speed-up vs eager (base)"] is True
    assert result["MLM CE fwd+bwd speed-up vs eager (base)"] is True
    assert result["MLM CE memory: eager extra / fused extra (base)"] is True  # 5x
    assert result["train base/128/256 seq/s vs HF SDPA+compile"] is True  # 1.5x
    assert result["train base/128/256 peak memory / HF SDPA"] is True  # 0.38x
