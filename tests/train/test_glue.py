"""GLUE TSV readers, the embedded classification data, and the numpy metrics (no model involved)."""

from __future__ import annotations

import bz2
import itertools

import numpy as np
import pytest

from train.classification_data import read_bbc_news, read_rotten_tomatoes, seeded_split
from train.glue import (
    GLUE_TASKS,
    TextExample,
    accuracy,
    classification_metrics,
    f1_binary,
    matthews_corr,
    pearson,
    rankdata,
    read_glue_tsv,
    spearman,
)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- readers
def test_single_sentence_with_header(tmp_path):
    f = write(tmp_path / "train.tsv", ["sentence\tlabel", 'a "quoted" film \t1', "dull\t0"])
    ex = read_glue_tsv(f, "sst2")
    assert ex == [TextExample('a "quoted" film ', None, 1), TextExample("dull", None, 0)]


def test_cola_has_no_header_and_reads_by_position(tmp_path):
    f = write(tmp_path / "dev.tsv", ["gj04\t1\t\tThe boy ran.", "gj04\t0\t*\tRan boy the."])
    ex = read_glue_tsv(f, "cola")
    assert [(e.text_a, e.label) for e in ex] == [("The boy ran.", 1), ("Ran boy the.", 0)]


def test_pair_tasks_find_their_columns_by_name(tmp_path):
    mrpc = write(tmp_path / "mrpc.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                         '1\t7\t8\tHe said "hi".\tHe greeted.'])
    assert read_glue_tsv(mrpc, "mrpc") == [TextExample('He said "hi".', "He greeted.", 1)]

    header = "index\tpromptID\tpairID\tgenre\tb1\tb2\tp1\tp2\tsentence1\tsentence2\tlabel1\tgold_label"
    mnli = write(tmp_path / "mnli.tsv", [header, "0\t1\t2\tfic\t.\t.\t.\t.\tA cat.\tAn animal.\tentailment\tentailment",
                                         "1\t1\t2\tfic\t.\t.\t.\t.\tA cat.\tA dog.\tneutral\tcontradiction"])
    ex = read_glue_tsv(mnli, "mnli")
    labels = GLUE_TASKS["mnli"].labels
    assert [(e.text_a, e.text_b, labels[e.label]) for e in ex] == [
        ("A cat.", "An animal.", "entailment"), ("A cat.", "A dog.", "contradiction")]

    stsb = write(tmp_path / "stsb.tsv", ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                                         "sentence2\tscore", "0\tnews\tf\t2012\t1\ts\ts\tA plane.\tAn airplane.\t4.75"])
    assert read_glue_tsv(stsb, "stsb") == [TextExample("A plane.", "An airplane.", 4.75)]

    qnli = write(tmp_path / "qnli.tsv", ["index\tquestion\tsentence\tlabel", "0\tWho?\tNobody.\tnot_entailment"])
    assert read_glue_tsv(qnli, "qnli") == [TextExample("Who?", "Nobody.", 1)]


@pytest.mark.parametrize(
    "lines, task, match",
    [
        ([], "sst2", "empty file"),
        (["sentence\tlabel"], "sst2", "only a header"),
        (["text\tlabel", "good\t1"], "sst2", r"missing column.*'sentence'"),
        (["sentence\tlabel", "good\t1", "bad"], "sst2", r"train.tsv:3: 1 tab-separated field"),
        (["sentence\tlabel", "good\tpositive"], "sst2", r"train.tsv:2: label 'positive' is not one of \['0', '1'\]"),
        (["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"], "rte", "label 'maybe'"),
        (["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
          "0\tg\tf\ty\to\ts\ts\ta\tb\thigh"], "stsb", "score 'high' is not a number"),
        (["gj04\t1\tThe boy ran."], "cola", r"train.tsv:1: 3 tab-separated field"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path, lines, task, match):
    f = write(tmp_path / "train.tsv", lines)
    with pytest.raises(ValueError, match=match):
        read_glue_tsv(f, task)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'sts'"):
        read_glue_tsv(tmp_path / "x.tsv", "sts")
    with pytest.raises(FileNotFoundError, match="x.tsv"):
        read_glue_tsv(tmp_path / "x.tsv", "sst2")


# ---------------------------------------------------------------------------------------------- metrics
def test_accuracy_f1_matthews_against_hand_counts():
    preds = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 1])
    tp, tn, fp, fn = 3, 2, 2, 1
    assert accuracy(preds, labels) == pytest.approx(5 / 8)
    assert f1_binary(preds, labels) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corr(preds, labels) == pytest.approx(mcc)
    assert np.isnan(matthews_corr(np.ones(4), np.array([1, 0, 1, 0])))  # constant prediction: undefined → NaN
    assert f1_binary(np.zeros(3), np.ones(3)) == 0.0


def test_pearson_and_spearman():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone → rank correlation 1
    assert rankdata([10, 20, 10, 30, 20, 10]).tolist() == [2.0, 4.5, 2.0, 6.0, 4.5, 2.0]
    # Ties: Spearman is Pearson of the tie-averaged ranks, checked against a brute-force rank.
    a, b = np.array([1, 2, 2, 3, 5, 5, 5]), np.array([2, 1, 4, 3, 7, 6, 6])
    brute = [np.mean([j + 1 for j, w in enumerate(sorted(v)) if w == u]) for v in (a, b) for u in v]
    ra, rb = np.array(brute[: len(a)]), np.array(brute[len(a):])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_classification_metrics_per_task():
    p, y = np.array([1, 0, 1]), np.array([1, 1, 1])
    assert set(classification_metrics("mrpc", p, y)) == {"accuracy", "f1"}
    assert set(classification_metrics("cola", p, y)) == {"accuracy", "matthews_corr"}
    assert set(classification_metrics("rotten_tomatoes", p, y)) == {"accuracy"}
    reg = classification_metrics("stsb", np.array([0.1, 2.0, 3.5]), np.array([0.0, 2.5, 5.0]))
    assert set(reg) == {"pearson", "spearman", "corr"} and reg["spearman"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- embedded data
RT_ROWS = ["category,text,movie_name,has_plot_and_reviews", 'fresh,"A joy, start to end.",m1,True',
           "plot,Someone does something.,m1,True", "rotten,Tedious.,m2,False", "fresh,  Lovely   film ,m3,False"]


@pytest.mark.parametrize("compressed", [False, True])
def test_rotten_tomatoes_reader_drops_plot(tmp_path, compressed):
    text = "\n".join(RT_ROWS) + "\n"
    if compressed:
        path = tmp_path / "rt.csv.bz2"
        path.write_bytes(bz2.compress(text.encode()))
    else:
        path = tmp_path / "rt.csv"
        path.write_text(text)
    ex = read_rotten_tomatoes(path)
    assert [(e.text_a, e.label) for e in ex] == [("A joy, start to end.", 1), ("Tedious.", 0), ("Lovely film", 1)]


@pytest.mark.parametrize(
    "content, match",
    [("", "empty file"), ("category,words\nfresh,x\n", r"missing column.*'text'"),
     ("category,text\nsplat,x\n", "category 'splat'"), ("category,text\nplot,x\n", "no fresh / rotten rows")],
)
def test_rotten_tomatoes_bad_files(tmp_path, content, match):
    path = tmp_path / "rt.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_rotten_tomatoes(path)
    bad_bz2 = tmp_path / "bad.csv.bz2"
    bad_bz2.write_text("not compressed")
    with pytest.raises(ValueError, match="cannot be read as CSV"):
        read_rotten_tomatoes(bad_bz2)


def test_seeded_split_is_deterministic_disjoint_and_keeps_the_test_set():
    data = [TextExample(str(i), None, i % 2) for i in range(100)]
    train, test = seeded_split(data, 30, 20, seed=0)
    train2, test2 = seeded_split(data, 60, 20, seed=0)
    assert len(train) == 30 and len(test) == 20
    assert test == test2 and train == train2[:30]  # a bigger training set leaves the test set alone
    assert not {e.text_a for e in train} & {e.text_a for e in test}
    assert seeded_split(data, 30, 20, seed=1)[1] != test
    with pytest.raises(ValueError, match="exceeds the 100 examples"):
        seeded_split(data, 90, 20, seed=0)


def test_bbc_reader(tmp_path):
    for i, topic in itertools.product(range(2), ("business", "entertainment", "politics", "sports", "tech")):
        (tmp_path / topic).mkdir(exist_ok=True)
        (tmp_path / topic / f"{i:03d}.txt").write_bytes(f"{topic} headline\n\nBody \u201c{i}\u201d.".encode("cp1252"))
    ex = read_bbc_news(tmp_path)
    assert len(ex) == 10 and [e.label for e in ex[:3]] == [0, 0, 1]
    assert ex[0].text_a == "business headline Body \u201c0\u201d."  # Windows-1252 quotes decoded
    (tmp_path / "tech" / "000.txt").unlink()
    (tmp_path / "tech" / "001.txt").unlink()
    (tmp_path / "tech").rmdir()
    with pytest.raises(ValueError, match=r"missing topic folder.*'tech'"):
        read_bbc_news(tmp_path)
