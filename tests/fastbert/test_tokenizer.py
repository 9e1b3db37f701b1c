"""fastbert.tokenizer.Tokenizer on small hand-made vocabularies (MiniLM parity is in test_hf_parity.py)."""

from __future__ import annotations

import pytest
import torch

from fastbert.tokenizer import Tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s", "a", ".",
         "!", "run", "##ning", "cafe", "hello", "world", ","]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def test_special_ids_and_lookups(vocab_file):
    tok = Tokenizer.from_file(vocab_file)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(tok) == len(VOCAB)
    assert tok.token_to_id("cat") == 6 and tok.token_to_id("zebra") is None
    assert tok.convert_ids_to_tokens(torch.tensor([2, 10, 11, 3])) == ["[CLS]", "dog", "##s", "[SEP]"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens([len(VOCAB)])
    assert tok.tokenize("Dogs RUNNING, café!") == ["dog", "##s", "run", "##ning", ",", "cafe", "!"]


def test_single_sentences_layout_and_padding(vocab_file):
    tok = Tokenizer.from_file(vocab_file)
    out = tok.encode(["The cat sat.", "Hello zebra"])
    assert set(out) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(t.dtype == torch.int64 for t in out.values())
    assert out["input_ids"].tolist() == [[2, 5, 6, 7, 13, 3], [2, 18, 1, 3, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0] * 6, [0] * 6]
    fixed = tok.encode("the cat", max_length=7, padding="max_length")
    assert fixed["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0, 0]]
    lists = tok.encode(["the cat"], return_tensors=False)
    assert lists["input_ids"] == [[2, 5, 6, 3]]


def test_pairs_and_longest_first_truncation(vocab_file):
    tok = Tokenizer.from_file(vocab_file)
    out = tok.encode(["the cat sat on the mat"], ["a dog"], max_length=9)
    # 6 + 2 tokens + 3 specials = 11 > 9: longest-first takes two tokens off the first sentence.
    assert out["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3, 12, 10, 3]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1]]
    out = tok.encode(["the cat sat"], ["the dog sat on a mat"], max_length=8)
    assert out["input_ids"].tolist() == [[2, 5, 6, 3, 5, 10, 7, 3]]  # both cut to 2 tokens


def test_decode(vocab_file):
    tok = Tokenizer.from_file(vocab_file)
    ids = tok.encode(["the dogs sat", "hello world"])["input_ids"]
    assert tok.decode(ids[0]) == "the dogs sat"
    assert tok.decode(ids) == ["the dogs sat", "hello world"]
    assert tok.decode(ids[1].tolist(), skip_special_tokens=False).startswith("[CLS] hello world [SEP]")


def test_lowercase_option(vocab_file):
    assert Tokenizer.from_file(vocab_file, lowercase=False).tokenize("The cat") == ["[UNK]", "cat"]


def test_tokenizer_json_and_folder(vocab_file, tmp_path):
    # A tokenizer.json written from the vocab.txt pipeline loads back (directly and from its folder).
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    Tokenizer.from_file(vocab_file)._tok.save(str(json_dir / "tokenizer.json"))
    a = Tokenizer.from_file(vocab_file).encode(["the cats sat", "hello"], ["a dog", "the mat"])
    for source in (json_dir / "tokenizer.json", json_dir, vocab_file.parent):
        b = Tokenizer.from_file(source).encode(["the cats sat", "hello"], ["a dog", "the mat"])
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lowercase applies to vocab.txt"):
        Tokenizer.from_file(json_dir / "tokenizer.json", lowercase=True)


def test_bad_inputs(vocab_file, tmp_path):
    tok = Tokenizer.from_file(vocab_file)
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        tok.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="padding must be one of"):
        tok.encode("a", padding="right")
    with pytest.raises(ValueError, match="max_length must be an int > 3"):
        tok.encode("a", "b", max_length=3)
    with pytest.raises(ValueError, match="texts\\[1\\] is int"):
        tok.encode(["a", 5])
    with pytest.raises(ValueError, match="pass truncation=True"):
        tok.encode("the cat sat on the mat", max_length=5, truncation=False)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_file(empty)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad_json)
    no_specials = tmp_path / "plain_vocab.txt"
    no_specials.write_text("the\ncat\n[UNK]\n")
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_file(no_specials)


def test_backend_tokenizer_and_do_lower_case_from_tokenizer_config(vocab_file):
    tok = Tokenizer.from_file(vocab_file)
    backend = tok.backend_tokenizer  # the wrapped `tokenizers.Tokenizer`: offsets, save, ...
    enc = backend.encode("The cat", add_special_tokens=False)
    assert enc.tokens == ["the", "cat"] and enc.offsets == [(0, 3), (4, 7)]
    assert backend.token_to_id("[SEP]") == tok.sep_id and backend.truncation is None and backend.padding is None
    # A Hugging Face tokenizer_config.json beside the vocab.txt decides the case unless `lowercase` is given.
    (vocab_file.parent / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert Tokenizer.from_file(vocab_file).tokenize("The cat") == ["[UNK]", "cat"]
    assert Tokenizer.from_file(vocab_file, lowercase=True).tokenize("The cat") == ["the", "cat"]
