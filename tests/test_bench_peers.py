"""CPU tests of the benchmark peers, the inference family, the dry runs (fastbert-bench and benchmarks/gpu_check.py),
the install-from-folder path of the GPU machine's wheels, and the plots."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastbert.bench import (
    PEERS,
    BenchEnv,
    InferenceCase,
    Row,
    attention_case,
    finish_rows,
    format_table,
    kernel_cases,
    main,
    run_inference_cases,
    run_op_case,
    versions,
)

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


@pytest.fixture
def cpu_env() -> BenchEnv:
    return BenchEnv(torch.device("cpu"), "cpu (test)", versions(), "test", "run-test")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_peer_runs_or_is_skipped_with_a_reason_on_cpu(cpu_env):
    cases = {c.name: c for c in kernel_cases(cpu_env, "tiny", 3, 11)}
    for op, peers in (("linear_bias_gelu", ("cublaslt", "liger")), ("bias_dropout_add_layernorm", ("liger",)),
                      ("mlm_cross_entropy", ("liger",))):
        for p in peers:
            case = cases[op]
            assert p in case.candidates or case.skipped.get(p), (op, p)
    # cuBLASLt's epilogue is private torch API present on a CPU: it runs there (no cuBLASLt; the note says so).
    assert "cublaslt" in cases["linear_bias_gelu"].candidates
    assert cases["linear_bias_gelu"].skipped["liger"]  # no GELU kernel in Liger, or no CUDA here
    att = attention_case(cpu_env, "tiny", 3, 13, 2, 16)
    for p in PEERS["attention"]:
        assert att.skipped.get(p), p  # CUDA only (or not importable): listed with the reason


def test_cublaslt_is_timed_forward_only_and_ratios_to_the_best_peer(cpu_env, one_thread):
    (case,) = kernel_cases(cpu_env, "tiny", 3, 11, ops=["linear_bias_gelu"])
    rows = run_op_case(case, cpu_env, modes=("fwd", "fwd+bwd"), rounds=1, cpu_reps=1)
    measured = {(r.candidate, r.mode): r for r in rows if r.ms is not None}
    assert {("eager", "fwd"), ("eager", "fwd+bwd"), ("cublaslt", "fwd")} <= set(measured)
    assert ("cublaslt", "fwd+bwd") not in measured
    assert any(r.candidate == "cublaslt" and "forward only" in r.note for r in rows)
    assert "erf GELU" in measured["cublaslt", "fwd"].note  # on a CPU the call is addmm + erf GELU
    eager = measured["eager", "fwd"]
    assert eager.best_peer == "cublaslt"
    assert eager.vs_peer == pytest.approx(measured["cublaslt", "fwd"].ms / eager.ms)
    assert measured["eager", "fwd+bwd"].vs_peer is None  # no peer measured in that mode
    assert "x peer" in format_table(rows, cpu_env)


def test_best_peer_is_the_fastest_peer_of_the_same_case_and_mode(cpu_env):
    def row(cand, ms, mode="fwd+bwd", case="bias_dropout_add_layernorm"):
        return Row("kernels", case, "base", cand, mode, "bf16", "N=1", ms=ms)

    rows = [row("eager", 4.0), row("fastbert", 1.0), row("liger", 2.0), row("cublaslt", 3.0),
            row("eager", 9.0, case="other"), row("liger", 1.0, mode="fwd")]
    finish_rows(rows, cpu_env, "eager")
    assert rows[1].speedup == 4.0 and rows[1].best_peer == "liger" and rows[1].vs_peer == 2.0
    assert rows[0].vs_peer == 0.5
    assert rows[4].best_peer == "" and rows[4].vs_peer is None


def test_inference_family_quick_on_cpu(cpu_env, one_thread):
    cases = [InferenceCase("tiny", "rotten_tomatoes", 3, max_len=24), InferenceCase("tiny", "wikipedia", 2, 40)]
    rows = run_inference_cases(cases, cpu_env, rounds=1, cpu_reps=1)
    for case in cases:
        got = {r.candidate: r for r in rows if r.case == case.label}
        for name in ("fastbert-ref", "hf-sdpa"):
            r = got[name]
            assert r.ms > 0 and r.seq_per_s == pytest.approx(case.B / (r.ms * 1e-3)) and r.mode == "fwd"
        assert got["fastbert-ref"].parity.startswith("ok"), got["fastbert-ref"].parity
        assert got["hf-sdpa"].speedup == 1.0
        for name in ("fastbert", "hf-sdpa-compile", "hf-sdpa+optimize"):
            assert got[name].ms is None and got[name].note.startswith("skipped: ")
        st = got["sentence-transformers"]
        assert st.ms is not None or st.note.startswith("skipped: sentence-transformers")
    assert InferenceCase("tiny", "wikipedia", 2, 40).lengths() == [min(40, n) for n in
                                                                    InferenceCase("tiny", "wikipedia", 2).lengths()]
    with pytest.raises(ValueError, match="inference case must look like"):
        InferenceCase.parse("minilm/imdb/128")


def test_bench_dry_run_lists_what_a_gpu_run_would_measure(capsys):
    assert main(["--dry-run", "--family", "attention", "kernels", "train", "inference", "--op-shapes",
                 "base/128/256"]) == 0
    out = capsys.readouterr().out
    for name in ("fastbert-varlen", "sdpa-flash", "sdpa-flash-varlen", "flash-attn-varlen", "cublaslt", "liger",
                 "hf-sdpa-compile", "hf-sdpa+optimize", "encode minilm/wikipedia/128"):
        assert name in out, name
    assert "qkv_projection base N=32768" in out
    assert main(["--dry-run", "--candidates", "fastbert", "ligre"]) == 2  # a typo is caught before any GPU time
    assert "ligre" in capsys.readouterr().err


def _tiny_wheel(folder: Path, name: str = "fastbert_wheel_probe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, built here (no network, no build backend)."""
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": meta,
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   b"Tag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


def test_gpu_check_installs_the_wheels_from_their_folder(tmp_path, monkeypatch):
    gpu_check = _load("gpu_check")
    monkeypatch.setattr(sys, "path", list(sys.path))  # install_wheels puts the target first: undone after
    _tiny_wheel(tmp_path / "wheels")
    status, names = gpu_check.install_wheels(tmp_path / "wheels", tmp_path / "site", print)
    assert status == "ok" and names == ["fastbert_wheel_probe-0.1-py3-none-any.whl"]
    assert (tmp_path / "site" / "fastbert_wheel_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert sys.path[0] == str(tmp_path / "site")
    env = gpu_check.stage_env(tmp_path / "site")
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path / "site")  # every stage sees it first
    status, names = gpu_check.install_wheels(tmp_path / "empty", tmp_path / "site2", print)
    assert names == [] and status.startswith("no wheels") and "make gpu-wheels" in status


def test_gpu_check_dry_run_passes_on_cpu(tmp_path, monkeypatch, capsys):
    """The first GPU run must not discover a typo: every stage's arguments and imports are checked here."""
    gpu_check = _load("gpu_check")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    _tiny_wheel(tmp_path / "wheels")
    # --no-collect: the suite itself collects every test module; the dry run still checks the test paths and -k
    assert gpu_check.main(["--dry-run", "--no-collect", "--wheels", str(tmp_path / "wheels")]) == 0
    out = capsys.readouterr().out
    assert "wheels: ok (fastbert_wheel_probe-0.1-py3-none-any.whl)" in out
    for stage in gpu_check.STAGES:
        assert f"== {stage.name}: " in out, stage.name
    assert "0 failed" in out and "FAILED" not in out
    assert "python -m fastbert.bench in a child process: exit 0" in out
    assert "pytest collection skipped" in out and "no such test path" not in out
    assert "guaranteed stage limits add up to 485 s" in out
    assert not (tmp_path / "out" / "summary.json").exists()  # a dry run measures and writes nothing there


def test_gpu_check_peer_lines_read_the_rows():
    gpu_check = _load("gpu_check")

    def row(cand, ms, speedup=None, mode="fwd+bwd", family="kernels", case="bias_dropout_add_layernorm"):
        return dict(family=family, case=case, size="base", candidate=cand, mode=mode, ms=ms, speedup=speedup,
                    baseline="eager")

    lines = gpu_check.peer_lines([row("eager", 4.0, 1.0), row("liger", 2.0, 2.0), row("fastbert", 1.0, 4.0),
                                  row("fastbert", 0.5, 8.0, mode="fwd")])
    assert len(lines) == 1
    assert "4.00x eager" in lines[0] and "2.00x liger" in lines[0]


def test_plot_draws_baseline_peer_and_fastbert(tmp_path):
    plot = _load("plot")
    common = dict(gpu="NVIDIA X", run_id="r1", commit="abc", dtype="bfloat16", size="base", baseline="eager")
    rows = [dict(common, case="bias_dropout_add_layernorm", candidate=c, mode="fwd+bwd", ms=str(ms))
            for c, ms in (("eager", 4.0), ("liger", 2.0), ("cublaslt", 3.0), ("fastbert", 1.0), ("compile", 2.5))]
    got = plot.bars(rows, "kernels")["bias_dropout_add_layernorm base"]
    assert got == [("baseline", "eager", 1.0, 4.0), ("peer", "liger", 2.0, 2.0), ("fastbert", "fastbert", 4.0, 1.0)]
    with open(tmp_path / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert plot.main(["--results", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("kernels_nvidia-x_r1.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
