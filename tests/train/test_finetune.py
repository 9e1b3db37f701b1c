"""Fine-tuning end to end on tiny made-up tasks (random-init tiny BERT, tiny vocabulary), and the CLI.

The tasks are built so that a two-layer model learns them in seconds: "does the sentence contain `red`"
(classification), "how many times does `red` occur in the pair" (regression, STS-B layout), and "the answer is
the word `red` and the word after it" (SQuAD layout). Fusions are off: on the CPU they would run through the
Triton interpreter, which the kernel tests cover; here the training loop is what is tested.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastbert import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from fastbert.config import FUSION_FLAGS
from train.finetune import (
    FinetuneConfig,
    build_parser,
    finetune,
    load_tokenizer,
    main,
    parse_config,
    warmup_linear_decay,
)

FILLER = "cat dog sat ran on a mat in old town near river bank far away from big house".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds OpenMP synchronisation, which on a busy shared
    machine costs 20× (measured: 22 ms vs 490 ms per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join([*SPECIALS, *FILLER, "red", "where"]) + "\n")
    return path


def tiny_model(cls, vocab_size: int, **overrides):
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **overrides).with_fusions(False)
    torch.manual_seed(0)
    return cls(config)


def sentence(rng, with_red: bool, n_min=3, n_max=9) -> str:
    words = list(rng.choice(FILLER, size=rng.integers(n_min, n_max)))
    if with_red:
        words.insert(rng.integers(0, len(words) + 1), "red")
    return " ".join(words)


def write_tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header), *("\t".join(map(str, r)) for r in rows)]) + "\n")


def run_cfg(tmp_path, **kw) -> FinetuneConfig:
    base = dict(output_dir=str(tmp_path / "out"), fused=False, log_every=1000, eval_every_epoch=False)
    return FinetuneConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- learning
def test_classification_learns_contains_token(tmp_path, vocab):
    rng = np.random.default_rng(0)
    for name, n in (("train.tsv", 480), ("dev.tsv", 120)):
        labels = rng.permutation(np.arange(n) % 2)
        write_tsv(tmp_path / name, ["sentence", "label"], [(sentence(rng, bool(y)), y) for y in labels])
    tok = load_tokenizer(vocab)
    model = tiny_model(BertForSequenceClassification, tok.get_vocab_size(), num_labels=2)
    cfg = run_cfg(tmp_path, task="sst2", data_dir=str(tmp_path), epochs=6, batch_size=16, lr=2e-3,
                  max_length=16)
    m = finetune(cfg, model=model, tokenizer=tok, log=lambda s: None)
    assert m["metrics"]["accuracy"] >= 0.95, m["history"]
    assert m["history"][0]["train_loss"] > m["train_loss"]
    out = tmp_path / "out"
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 120 and {p["prediction"] for p in preds} <= {"0", "1"}
    assert np.mean([p["prediction"] == p["label"] for p in preds]) == pytest.approx(m["metrics"]["accuracy"])
    assert json.loads((out / "metrics.json").read_text())["metrics"] == m["metrics"]

    # The saved folder reloads (weights, label names, tokenizer) and gives the same logits.
    saved = BertForSequenceClassification.from_pretrained(out / "model", **{f: False for f in FUSION_FLAGS})
    assert json.loads((out / "model" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}
    tok2 = load_tokenizer(out / "model")
    enc = tok2.encode("cat red mat")
    ids = torch.tensor([enc.ids])
    model.eval()
    saved.eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, model(ids).logits)
    assert enc.ids == tok.encode("cat red mat").ids


def test_regression_stsb_layout_reports_pearson_spearman(tmp_path, vocab):
    rng = np.random.default_rng(1)
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    for name, n in (("train.tsv", 480), ("dev.tsv", 100)):
        rows = []
        for i in range(n):
            a, b = sentence(rng, rng.random() < 0.5), sentence(rng, rng.random() < 0.5)
            score = float((a + " " + b).split().count("red"))  # 0, 1 or 2
            rows.append((i, "g", "f", "2012", i, "s", "s", a, b, score))
        write_tsv(tmp_path / name, header, rows)
    tok = load_tokenizer(vocab)
    model = tiny_model(BertForSequenceClassification, tok.get_vocab_size(), num_labels=1)
    cfg = run_cfg(tmp_path, task="stsb", data_dir=str(tmp_path), epochs=5, batch_size=16, lr=2e-3,
                  max_length=24, save_model=False)
    m = finetune(cfg, model=model, tokenizer=tok, log=lambda s: None)
    assert set(m["metrics"]) == {"pearson", "spearman", "corr"}
    assert m["metrics"]["pearson"] > 0.8 and m["metrics"]["spearman"] > 0.7, m["metrics"]
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert isinstance(preds[0]["prediction"], float) and preds[0]["text_b"]
    assert not (tmp_path / "out" / "model").exists()


def squad_file(path, rng, n):
    paragraphs = []
    for i in range(n):
        words = list(rng.choice(FILLER, size=rng.integers(6, 14)))
        k = int(rng.integers(0, len(words)))
        words[k:k] = ["red", str(rng.choice(FILLER))]
        context = " ".join(words) + "."
        answer = " ".join(words[k : k + 2])
        start = len(" ".join(words[:k])) + (1 if k else 0)
        assert context[start : start + len(answer)] == answer
        paragraphs.append({"context": context, "qas": [
            {"id": f"q{i}", "question": "where red?", "answers": [{"text": answer, "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))


def test_squad_learns_a_span_task_with_document_stride(tmp_path, vocab):
    rng = np.random.default_rng(2)
    squad_file(tmp_path / "train-v1.1.json", rng, 300)
    squad_file(tmp_path / "dev-v1.1.json", rng, 60)
    tok = load_tokenizer(vocab)
    model = tiny_model(BertForQuestionAnswering, tok.get_vocab_size())
    # max_length 14 with a 3-token question: windows of 8 context tokens every 4, so most contexts are split.
    cfg = run_cfg(tmp_path, task="squad", data_dir=str(tmp_path), epochs=6, batch_size=16, lr=2e-3,
                  max_length=14, doc_stride=4, max_answer_length=4, n_best=5, save_model=False)
    logs = []
    m = finetune(cfg, model=model, tokenizer=tok, log=logs.append)
    assert any("windows" in line for line in logs)
    assert m["metrics"]["exact_match"] >= 80.0 and m["metrics"]["f1"] >= m["metrics"]["exact_match"], m["metrics"]
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    nbest = json.loads((tmp_path / "out" / "nbest_predictions.json").read_text())
    assert set(preds) == set(nbest) == {f"q{i}" for i in range(60)}
    assert all(nbest[q][0]["text"] == preds[q] for q in preds if nbest[q])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_runs_and_writes_outputs(tmp_path, vocab, capsys):
    rng = np.random.default_rng(3)
    for name, n in (("train.tsv", 64), ("dev.tsv", 32)):
        write_tsv(tmp_path / name, ["index", "sentence1", "sentence2", "label"],
                  [(i, sentence(rng, False), sentence(rng, False), rng.choice(["entailment", "not_entailment"]))
                   for i in range(n)])
    out = tmp_path / "cli"
    rc = main(["--task", "rte", "--data-dir", str(tmp_path), "--init", "preset:tiny", "--tokenizer", str(vocab),
               "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--no-fused", "--output-dir", str(out),
               "--log-every", "2"])
    assert rc == 0
    assert "step 2/4" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "rte" and metrics["num_train"] == 64 and metrics["config"]["max_length"] == 32
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["label2id"] == {"entailment": 0, "not_entailment": 1}


def test_init_from_a_pretraining_checkpoint(tmp_path, vocab):
    """A BertForPreTraining folder (as train/checkpointing.py writes it: step_N/model/ with vocab.txt) loads
    into the classifier: encoder weights from the file, the new head initialised."""
    from fastbert import BertForPreTraining

    tok = load_tokenizer(vocab)
    pretrained = tiny_model(BertForPreTraining, tok.get_vocab_size())
    folder = tmp_path / "step_00000010" / "model"
    pretrained.save_pretrained(folder)
    (folder / "vocab.txt").write_text(vocab.read_text())
    rng = np.random.default_rng(4)
    for name, n in (("train.tsv", 32), ("dev.tsv", 16)):
        write_tsv(tmp_path / name, ["sentence", "label"], [(sentence(rng, bool(i % 2)), i % 2) for i in range(n)])
    cfg = run_cfg(tmp_path, task="sst2", data_dir=str(tmp_path), init=str(tmp_path / "step_00000010"),
                  epochs=1, batch_size=16, lr=1e-9, max_length=16)
    with pytest.warns(UserWarning, match="classifier"):
        finetune(cfg, log=lambda s: None)
    tuned = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "model",
                                                          **{f: False for f in FUSION_FLAGS})
    # lr ≈ 0: the encoder is still the pretrained one.
    torch.testing.assert_close(tuned.bert.embeddings.word_embeddings.weight,
                               pretrained.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--task", "imdb"], "invalid choice: 'imdb'"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--task", "mrpc"], "needs --data-dir"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--warmup-ratio", "1.5"], r"warmup_ratio must be in \[0, 1\)"),
        (["--device", "tpu"], "device must be auto, cpu, cuda"),
        (["--max-length", "4"], r"max_length must be in \[8, 4096\]"),
        (["--init", "preset:huge"], "unknown preset"),
        (["--eval-file", "x.tsv"], "use --train-file"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "fastbert-finetune" in err
    assert re.search(match, err), err


def test_cli_run_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nbad\tnegative\n")
    assert main(["--task", "sst2", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 1
    assert "label 'negative' is not one of" in capsys.readouterr().err
    assert main(["--task", "sst2", "--data-dir", str(tmp_path / "nope")]) == 1
    assert "data folder not found" in capsys.readouterr().err
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    assert main(["--task", "sst2", "--data-dir", str(tmp_path), "--init", str(tmp_path / "no_model")]) == 1
    assert "init checkpoint folder not found" in capsys.readouterr().err
    (tmp_path / "ckpt").mkdir()
    assert main(["--task", "sst2", "--data-dir", str(tmp_path), "--init", str(tmp_path / "ckpt")]) == 1
    assert "no tokenizer.json or vocab.txt" in capsys.readouterr().err


def test_defaults_are_the_done_when_setting_and_help_lists_every_field():
    cfg = FinetuneConfig()
    assert (cfg.task, cfg.init, cfg.epochs, cfg.batch_size, cfg.seq_len, cfg.lr) == (
        "rotten_tomatoes", "minilm", 2, 32, 64, 5e-5)
    assert FinetuneConfig(task="squad", data_dir=".").seq_len == 384
    text = build_parser().format_help()
    for flag in ("--doc-stride", "--max-answer-length", "--train-size", "--no-save-model", "--data-seed"):
        assert flag in text


def test_model_task_mismatch_is_rejected(tmp_path, vocab):
    write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [("cat", 0), ("red", 1)])
    write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [("cat", 0)])
    tok = load_tokenizer(vocab)
    cfg = run_cfg(tmp_path, task="sst2", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="has 3 labels but task sst2 has 2"):
        finetune(cfg, model=tiny_model(BertForSequenceClassification, tok.get_vocab_size(), num_labels=3),
                 tokenizer=tok)
    with pytest.raises(ValueError, match="needs a BertForSequenceClassification"):
        finetune(cfg, model=tiny_model(BertForQuestionAnswering, tok.get_vocab_size()), tokenizer=tok)


def test_warmup_linear_decay_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear_decay(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[4:] == pytest.approx([(12 - s) / 8 for s in range(4, 12)])
    assert opt.param_groups[0]["lr"] == 0.0
