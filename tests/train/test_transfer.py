"""The transfer comparison's in-domain pretraining text never holds a fine-tuning train or test snippet."""

from __future__ import annotations

import bz2
import csv

import pytest

from train.classification_data import embedded_task_split
from train.transfer import TransferConfig, domain_documents, main, write_documents


def write_rt_csv(path, rows) -> None:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writeheader()
        for category, text, movie in rows:
            w.writerow({"category": category, "text": text, "movie_name": movie, "has_plot_and_reviews": "True"})


def test_domain_documents_leave_out_the_splits_on_a_small_file(tmp_path):
    rows = [("plot", "A man walks.\n\nHe talks.", "m0")]
    rows += [("fresh" if k % 3 else "rotten", f"review number {k} of the film", f"m{k % 4}") for k in range(40)]
    rows += [("fresh", "review number 7 of the film", "m9")]  # a duplicate of a snippet: left out when 7 is used
    path = tmp_path / "rt.csv.bz2"
    write_rt_csv(path, rows)
    train, test, _ = embedded_task_split("rotten_tomatoes", 12, 8, 0, source=path)
    docs, counts = domain_documents(path, data_seed=0, sizes=(12, 8))
    assert docs[0] == ["A man walks.", "He talks."] and counts["plot_documents"] == 1
    lines = {line for d in docs[1:] for line in d}
    used = {ex.text_a for ex in (*train, *test)}
    assert not lines & used
    assert lines == {f"review number {k} of the film" for k in range(40)} - used
    dup_left_out = "review number 7 of the film" in used
    assert counts["reviews_left_out"] == 20 + dup_left_out and counts["reviews"] == 41
    # Grouped by movie: every line of a document comes from one movie.
    movie = {f"review number {k} of the film": k % 4 for k in range(40)}
    assert all(len({movie[line] for line in d}) == 1 for d in docs[1:])
    write_documents(docs, tmp_path / "d.txt")
    assert (tmp_path / "d.txt").read_text().split("\n\n")[0] == "A man walks.\nHe talks."


def test_domain_text_of_the_embedded_file_is_disjoint_from_the_test_snippets():
    from fastbert.resources import ResourceNotFound, rotten_tomatoes_path

    try:
        rotten_tomatoes_path()
    except ResourceNotFound as e:
        pytest.skip(str(e))
    train, test, _ = embedded_task_split("rotten_tomatoes", None, None, 0)
    docs, counts = domain_documents()
    assert counts["plot_documents"] > 1000 and counts["reviews_used"] > 8000
    assert counts["reviews_used"] + counts["reviews_left_out"] == counts["reviews"]
    lines = {line for d in docs for line in d}
    assert not lines & {ex.text_a for ex in (*train, *test)}
    # Stronger for the test split: no test snippet occurs anywhere in the text, even inside a longer line.
    text = "\n".join(lines)
    inside = [ex.text_a for ex in test if ex.text_a in text]
    assert not inside, inside[:3]


def test_transfer_options_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="seeds"):
        TransferConfig(seeds=0).validate()
    with pytest.raises(ValueError, match="warmup_steps"):
        TransferConfig(pretrain_steps=10, warmup_steps=20).validate()
    with pytest.raises(ValueError, match="ft_dropout"):
        TransferConfig(ft_dropout=1.5).validate()
    with pytest.raises(ValueError, match="only"):
        TransferConfig(only="neither").validate()
    with pytest.raises(ValueError, match="curve_every"):
        TransferConfig(curve_every=-1).validate()
    assert main(["--pretrained", str(tmp_path / "missing")]) == 2
    assert "pretrained model folder not found" in capsys.readouterr().err


def test_transfer_fine_tunes_a_pretraining_checkpoint_and_random_init(tmp_path):
    """End to end on a tiny checkpoint and a few snippets: both models go through finetune() (which accepts only
    its own model class), the pretrained one starts from the file's encoder weights."""
    from fastbert.checkpoint import save_pretrained
    from train.transfer import finetune_both

    pretrained = _tiny_pretrained(tmp_path)
    folder = tmp_path / "model"
    save_pretrained(pretrained, folder, extra_files=lambda f: (f / "vocab.txt").write_text(
        (_minilm_folder() / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8"))
    cfg = TransferConfig(pretrained=str(folder), out_dir=str(tmp_path / "out"), seeds=1, epochs=1, batch_size=8,
                         max_length=24, train_size=24, test_size=16)
    cfg.validate()
    summary = finetune_both(cfg, folder, tmp_path / "out", log=lambda m: None)
    assert set(summary) >= {"pretrained_mean", "random_init_mean", "gain_points", "majority_class_acc"}
    assert all(0.0 <= summary[k] <= 1.0 for k in ("pretrained_mean", "random_init_mean", "majority_class_acc"))


def test_a_pretraining_run_folder_stands_for_its_final_model(tmp_path):
    """`make demo-transfer` hands transfer() the run folder, whose own config.json holds the run's options."""
    from train.transfer import model_folder

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text("{}")  # the pretraining run's options, not a model's
    (run / "model" / "config.json").write_text("{}")
    assert model_folder(run) == run / "model"
    assert model_folder(run / "model") == run / "model"


def _tiny_pretrained(tmp_path):
    """A tiny BertForPreTraining with the MiniLM vocabulary; skips without the embedded task file."""
    import torch

    from fastbert import BertConfig
    from fastbert.models import BertForPreTraining
    from fastbert.resources import ResourceNotFound, rotten_tomatoes_path
    from fastbert.tokenizer import Tokenizer

    try:
        rotten_tomatoes_path()
    except ResourceNotFound as e:
        pytest.skip(str(e))
    minilm_vocab = Tokenizer.from_file(_minilm_folder()).backend_tokenizer.get_vocab_size()
    config = BertConfig.from_preset("tiny", hidden_size=24, intermediate_size=40, vocab_size=minilm_vocab,
                                    max_position_embeddings=40)
    torch.manual_seed(0)
    return BertForPreTraining(config)


def test_curve_fine_tunes_every_checkpoint_and_one_baseline_and_reruns(tmp_path):
    """--curve-every: each checkpoint of the run is fine-tuned (pretrained only), one random-init baseline; a second
    run into the same out_dir replaces its own outputs, and a folder holding other files is refused."""
    import torch

    from train.checkpointing import save_checkpoint
    from train.transfer import finetune_both, finetune_curve

    model = _tiny_pretrained(tmp_path)
    run = tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    vocab = _minilm_folder() / "vocab.txt"
    for step in (2, 4):
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight.add_(0.01)  # the checkpoints differ
        save_checkpoint(run, step, model, opt, sched, None, {}, vocab=vocab, keep=0, run_id="r")
    cfg = TransferConfig(out_dir=str(tmp_path / "out"), pretrain_steps=4, warmup_steps=0, curve_every=2, seeds=1,
                         epochs=1, batch_size=8, max_length=24, train_size=24, test_size=16)
    cfg.validate()
    seen = []
    summary = finetune_curve(cfg, run, tmp_path / "out", pretrain_cpu_s=60.0, log=seen.append)
    assert [r["step"] for r in summary["curve"]] == [2, 4]
    assert [r["pretrain_cpu_s"] for r in summary["curve"]] == [30.0, 60.0]
    assert len(summary["random_init_acc"]) == 1 and all(len(r["pretrained_acc"]) == 1 for r in summary["curve"])
    for r in summary["curve"]:
        assert r["gain_points"] == pytest.approx(100 * (r["pretrained_mean"] - summary["random_init_mean"]))
    assert sum("random_init" in m for m in seen) == 1 and sum("pretrained" in m for m in seen) == 2
    # Rerun into the same folders: replaced, not refused.
    again = finetune_both(cfg, run / "checkpoints" / "step_00000004" / "model", tmp_path / "out" / "step4",
                          log=lambda m: None)
    assert again["pretrained_acc"] == summary["curve"][1]["pretrained_acc"]  # deterministic for the seed
    foreign = tmp_path / "out" / "step2" / "ft-pretrained-seed0"
    (foreign / "fastbert-manifest.json").unlink()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files"):
        finetune_both(cfg, run / "checkpoints" / "step_00000002" / "model", tmp_path / "out" / "step2",
                      log=lambda m: None)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="curve_every"):
        TransferConfig(curve_every=2, pretrained=str(tmp_path)).validate()


def _minilm_folder():
    from fastbert.resources import minilm_path

    return minilm_path()
