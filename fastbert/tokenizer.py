"""`Tokenizer`: BERT's WordPiece tokenizer (the Rust `tokenizers` package) returning model-ready tensors.

    tok = Tokenizer.from_file(folder)           # a folder with tokenizer.json or vocab.txt, or either file
    batch = tok.encode(["a sentence", "another"], pairs=None, max_length=128)
    model(**batch)                              # input_ids, token_type_ids, attention_mask: int64 [B, T]

Inputs are laid out as BERT was trained: `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, segment ids 0 for
`[CLS] A [SEP]` and 1 for `B [SEP]`. Pairs longer than `max_length` are truncated longest-first (one token at
a time from whichever sequence is longer), as the original BERT and Hugging Face do.

A `vocab.txt` is read with BERT's standard pipeline (clean text, split CJK characters, lowercase and strip
accents when `lowercase`, split on whitespace and punctuation, WordPiece with `##` continuations). A
`tokenizer.json` carries its own pipeline and is used as written (its stored padding/truncation settings are
replaced per call by `encode`'s arguments).

Caution: the special tokens must be spelled `[PAD] [UNK] [CLS] [SEP] [MASK]` (every BERT vocabulary does).
`encode` sets the wrapped tokenizer's truncation per call: do not share one `Tokenizer` between threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PADDING_CHOICES = ("longest", "max_length")


class Tokenizer:
    """A BERT WordPiece tokenizer. Build it with `Tokenizer.from_file`; call `encode` to get model inputs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing} (BERT's)")
        tokenizer.no_padding()  # a tokenizer.json may store its own; `encode` sets them per call
        tokenizer.no_truncation()
        probe = tokenizer.encode("a", "b")
        if probe.ids[0] != ids["[CLS]"] or probe.ids[-1] != ids["[SEP]"] or probe.type_ids[-1] != 1:
            raise ValueError("the tokenizer does not lay pairs out as [CLS] A [SEP] B [SEP] (no BERT post-processor)")
        self._tok = tokenizer
        self._pad, self._unk, self._cls, self._sep, self._mask = (ids[t] for t in SPECIAL_TOKENS)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, lowercase: bool | None = None) -> Tokenizer:
        """From `vocab.txt`, `tokenizer.json` (any file name ending in .json), or a folder holding either
        (tokenizer.json is preferred, unless `lowercase` is given: that asks for vocab.txt).

        `lowercase` (vocab.txt only) lowercases and strips accents; None (default) takes `do_lower_case` from a
        Hugging Face tokenizer_config.json beside the vocab.txt, else True (the uncased BERT models). A
        tokenizer.json has its own normalizer, so `lowercase` with a .json file is an error.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if path.is_dir():
            if (path / "tokenizer.json").is_file() and lowercase is None:
                path = path / "tokenizer.json"
            elif (path / "vocab.txt").is_file():
                path = path / "vocab.txt"
            else:
                raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
        if path.suffix == ".json":
            if lowercase is not None:
                raise ValueError(f"lowercase applies to vocab.txt files; {path.name} carries its own normalizer")
            try:
                tok = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust side raises plain Exception on malformed files
                raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        else:
            tok = _wordpiece_from_vocab(path, _do_lower_case(path.parent) if lowercase is None else lowercase)
        try:
            return cls(tok)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def cls_id(self) -> int:
        return self._cls

    @property
    def sep_id(self) -> int:
        return self._sep

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for offsets, `save`, ...). `encode` resets its truncation and
        padding per call; it has both off after construction."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        max_length: int = 128,
        padding: str = "longest",
        truncation: bool = True,
        return_tensors: bool = True,
    ) -> dict[str, torch.Tensor] | dict[str, list[list[int]]]:
        """Tokenize sentences (or sentence pairs) into `input_ids`, `token_type_ids`, `attention_mask`.

        Each is int64 [B, T] (or a list of B lists with `return_tensors=False`), padded with `pad_id` on the
        right to the longest sequence (`padding="longest"`) or to `max_length` (`"max_length"`). With
        `truncation` (default), sequences over `max_length` tokens, specials included, are cut (pairs
        longest-first); without it, such a sequence is an error.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
        for name, seq in (("texts", texts), ("pairs", pairs or [])):
            bad = [i for i, s in enumerate(seq) if not isinstance(s, str)]
            if bad:
                raise ValueError(f"{name}[{bad[0]}] is {type(seq[bad[0]]).__name__}, not str")
        if not texts:
            raise ValueError("texts is empty")
        if padding not in PADDING_CHOICES:
            raise ValueError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}")
        n_special = 3 if pairs is not None else 2
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= n_special:
            raise ValueError(
                f"max_length must be an int > {n_special} (the special tokens alone take {n_special}), "
                f"got {max_length!r}"
            )

        tok = self._tok
        if truncation:
            tok.enable_truncation(max_length, strategy="longest_first")
        else:
            tok.no_truncation()
        tok.no_padding()  # padded below, so that "longest" and "max_length" share one code path
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
        try:
            encodings = tok.encode_batch(inputs)
        except Exception as e:  # e.g. a pair whose second text cannot shrink enough
            raise ValueError(f"tokenization failed: {e}") from None

        lengths = [len(e.ids) for e in encodings]
        if not truncation and max(lengths) > max_length:
            i = max(range(len(lengths)), key=lengths.__getitem__)
            raise ValueError(
                f"sequence {i} has {lengths[i]} tokens > max_length={max_length}; pass truncation=True"
            )
        T = max_length if padding == "max_length" else max(lengths)
        out = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for e, n in zip(encodings, lengths, strict=True):
            out["input_ids"].append(e.ids + [self._pad] * (T - n))
            out["token_type_ids"].append(e.type_ids + [0] * (T - n))
            out["attention_mask"].append([1] * n + [0] * (T - n))
        if return_tensors:
            return {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
        return out

    __call__ = encode

    # ------------------------------------------------------------------ decoding and look-ups
    def decode(
        self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True
    ) -> str | list[str]:
        """Token ids back to text: one sequence (list or 1-D tensor) → str; a batch (2-D) → list of str."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return self._tok.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens)
        return self._tok.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        tokens = []
        for i in ids:
            t = self._tok.id_to_token(int(i))
            if t is None:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            tokens.append(t)
        return tokens

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one text, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).tokens


def _do_lower_case(folder: Path) -> bool:
    """`do_lower_case` of a Hugging Face tokenizer_config.json in `folder`; True without one (or unreadable)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(config.get("do_lower_case", True)) if isinstance(config, dict) else True


def _wordpiece_from_vocab(path: Path, lowercase: bool) -> tokenizers.Tokenizer:
    """BERT's tokenizer pipeline over a vocab.txt (one token per line, line number = id)."""
    try:
        model = WordPiece.from_file(str(path), unk_token="[UNK]")
    except Exception as e:
        raise ValueError(f"{path} is not a readable WordPiece vocab.txt: {e}") from None
    tok = tokenizers.Tokenizer(model)
    present = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    tok.add_special_tokens(present)  # never split or lowercased inside text
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is not None and sep_id is not None:
        tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    return tok
