"""Pretraining data creation: plain text → sentence-pair instances, stored as memory-mappable arrays.

Pipeline (the original BERT `create_pretraining_data.py`, minus the masking — masking is done at load time
by `train.dataset.PretrainingDataset`, with a fresh seeded draw every epoch):

    documents   text files with one sentence per line and a blank line between documents, or a JSON object
                title → {"title", "extract"} (the embedded Wikipedia lead paragraphs, the default)
    sentences   `split_sentences`: a small rule-based splitter (below); lines of a text file are split too,
                so a line holding a whole paragraph is fine
    tokens      WordPiece through the `tokenizers` package: a given vocab.txt (default: the MiniLM one, the
                uncased vocabulary of the original BERT), or a new vocabulary of `vocab_size` trained here
    instances   [CLS] A [SEP] B [SEP] up to max_seq_len, by the original's selection rules
                (`instances_from_document`): segments of whole sentences packed to a target length (shorter
                with probability short_seq_prob), B the true continuation or, with probability 1/2 and always
                when the chunk is one sentence, a span of another document (~64 % random pairs on the embedded
                lead paragraphs); the longer segment trimmed at a random end (truncate_seq_pair).
                `split_single_sentence` is the near-50/50 variant that cuts one-sentence chunks instead
    splits      documents (not instances) are split into train / held-out, so no held-out text is trained on;
                a random B comes from the same split

Output directory (one per sequence length, e.g. phase 1 at 128 and phase 2 at 512), written as a temporary
sibling folder and swapped in by rename when complete (fastbert/_atomic.py). An existing --out-dir is replaced
only when it is empty or a previous fastbert-prepare output (its manifest says so); anything else is refused
unless --overwrite, and the working directory or a folder holding an input never:

    fastbert-manifest.json      written last: kind "prepared-data", each file's size and sha256
    meta.json                   format version, options, special-token ids, counts
    vocab.txt                   the vocabulary the ids refer to
    {split}.tokens.npy          A and B of every instance back to back (uint16, or int32 past 65,536 ids)
    {split}.offsets.npy         int64 [n + 1]: instance i is tokens[offsets[i]:offsets[i + 1]]
    {split}.len_a.npy           int32 [n]: length of segment A (the rest is B)
    {split}.is_random_next.npy  uint8 [n]: 1 when B is a random span (NSP label 1, as in BERT)

Caution: all documents are held in memory while instances are made (fine for corpora up to a few GB of text);
instance creation is pure Python (about 10 k instances per second).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastbert._atomic import (
    absolute,
    atomic_folder,
    fault_point,
    manifest_kind,
    recover,
    refuse_dangerous_target,
    verify_manifest,
)
from fastbert.tokenizer import SPECIAL_TOKENS, Tokenizer

from .cli import add_config_arguments

# 2: instances made as Google's create_pretraining_data.py (segments end at sentence ends, random-next B from
# another document with the unused segments put back). Version 1 data was paired by the earlier rule: the
# loaders refuse it, and the embedded corpus's cache is prepared again.
FORMAT_VERSION = 2
SPLITS = ("train", "heldout")
DATA_KIND = "prepared-data"  # the manifest kind of a fastbert-prepare output
_OUTPUT_NAMES = frozenset({"meta.json", "vocab.txt"} | {f"{s}.{a}.npy" for s in SPLITS
                                                        for a in ("tokens", "offsets", "len_a", "is_random_next")})


# ---------------------------------------------------------------------------------------------- sentences
# A boundary is sentence-final punctuation (plus closing quotes/brackets), whitespace, then something that can
# start a sentence (capital, digit, opening quote/bracket). The word before the punctuation vetoes the split when
# it is a known abbreviation or a single letter (initials: "Arthur C. Clarke", "U.S. Navy").
_BOUNDARY = re.compile(r"([.!?][\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx ca c no nos vol fig gen col lt sgt capt "
    "gov sen rep rev hon jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co corp bros u.s u.k".split()
)


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences with the rule above; whitespace is normalised, empty pieces dropped.

    Caution: rule-based — a sentence ending in an abbreviation ("... in the U.S. The next") stays joined to the
    next one, and a lowercase sentence start is not a boundary. Good enough for BERT's segment packing, which
    only needs roughly sentence-sized pieces.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1)
        words = text[start:m.start(1)].rsplit(" ", 1)
        last = words[-1].lower().lstrip("\"'“‘([")
        if m.group(1)[0] == "." and (last in _ABBREVIATIONS or len(last) == 1):
            continue
        sentences.append(text[start:end])
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return [s for s in (s.strip() for s in sentences) if s]


# ---------------------------------------------------------------------------------------------- documents
def read_text_documents(path: str | os.PathLike) -> list[list[str]]:
    """A text file with one sentence (or paragraph) per line and blank lines between documents."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"input file {path} is empty")
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.extend(split_sentences(line))
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def read_json_documents(path: str | os.PathLike) -> list[list[str]]:
    """A JSON object title → {"title", "extract", ...} (the embedded Wikipedia format); one document per entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object title → {{'extract': ...}}, got {type(data).__name__}")
    docs = []
    for title, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise ValueError(f"{path}: entry {title!r} has no 'extract' string")
        sentences = split_sentences(entry["extract"])
        if sentences:
            docs.append(sentences)
    return docs


def read_documents(paths: Sequence[str | os.PathLike]) -> list[list[str]]:
    """Documents (lists of sentences) from text files and/or `.json` files; a clear error when there are none."""
    if not paths:
        raise ValueError("no input files given")
    docs: list[list[str]] = []
    for p in paths:
        docs.extend(read_json_documents(p) if str(p).endswith(".json") else read_text_documents(p))
    if not docs:
        raise ValueError(f"no documents found in {', '.join(str(p) for p in paths)}")
    return docs


# ---------------------------------------------------------------------------------------------- vocabulary
def default_vocab_path() -> Path:
    """The uncased BERT WordPiece vocabulary shipped with the MiniLM checkpoint."""
    from fastbert.resources import minilm_path

    return minilm_path() / "vocab.txt"


def train_vocab(documents: list[list[str]], vocab_size: int, out_dir: Path, lowercase: bool = True) -> Path:
    """Train a new WordPiece vocabulary of `vocab_size` on the documents; returns the written vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 100}, got {vocab_size}")
    tok = BertWordPieceTokenizer(lowercase=lowercase)
    tok.train_from_iterator(
        (s for d in documents for s in d), vocab_size=vocab_size, min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out_dir))
    # The trainer orders tokens of equal frequency differently from one process to the next (hash order), so
    # the ids would change between identical runs: the special tokens first, then the rest sorted.
    path = out_dir / "vocab.txt"
    tokens = path.read_text(encoding="utf-8").splitlines()
    rest = sorted(t for t in tokens if t not in SPECIAL_TOKENS)
    path.write_text("\n".join([*SPECIAL_TOKENS, *rest]) + "\n", encoding="utf-8")
    return path


def tokenize_documents(tok, documents: list[list[str]], max_sentence_tokens: int | None = None,
                       stats: dict | None = None) -> list[list[list[int]]]:
    """documents of sentences → documents of token-id lists (empty sentences and documents dropped).

    A sentence longer than `max_sentence_tokens` (a document that is one giant "sentence": no punctuation the
    splitter knows, a table, a list) is cut into consecutive pieces of at most that many tokens, so no instance
    has to drop most of it; `stats["split_sentences"]` / `["split_pieces"]` count them."""
    flat = [s for d in documents for s in d]
    ids = [e.ids for e in tok.encode_batch(flat, add_special_tokens=False)]
    out, i, n_split, n_pieces = [], 0, 0, 0
    for d in documents:
        sents = []
        for s in ids[i:i + len(d)]:
            if max_sentence_tokens is not None and len(s) > max_sentence_tokens:
                pieces = [s[k:k + max_sentence_tokens] for k in range(0, len(s), max_sentence_tokens)]
                n_split, n_pieces = n_split + 1, n_pieces + len(pieces)
                sents.extend(pieces)
            elif s:
                sents.append(s)
        i += len(d)
        if sents:
            out.append(sents)
    if stats is not None:
        stats.update(split_sentences=n_split, split_pieces=n_pieces)
    return out


# ---------------------------------------------------------------------------------------------- instances
def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """Trim the longer of a, b (b when they are equal) one token at a time, from the front or the back at random,
    until they fit — the original BERT's rule."""
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _random_b(docs: list[list[list[int]]], doc_index: int, target_len: int, rng: random.Random) -> list[int]:
    """Consecutive sentences of another document (10 draws to avoid this one), from a random sentence on, until
    `target_len` tokens (at least one sentence)."""
    other = doc_index
    for _ in range(10):
        other = rng.randrange(len(docs))
        if other != doc_index:
            break
    other_doc = docs[other]
    b: list[int] = []
    for s in other_doc[rng.randrange(len(other_doc)):]:
        b.extend(s)
        if len(b) >= target_len:
            break
    return b


def instances_from_document(
    docs: list[list[list[int]]], doc_index: int, max_seq_len: int, short_seq_prob: float, rng: random.Random,
    split_single_sentence: bool = False,
) -> list[tuple[list[int], list[int], bool]]:
    """(A, B, is_random_next) triples from one document, by the selection rules of the original BERT:

    - one target length per document: max_seq_len − 3, or with probability `short_seq_prob` a uniform length in
      [2, max_seq_len − 3];
    - sentences are gathered into a chunk until it reaches the target (or the document ends); A is the first
      `a_end` sentences of the chunk (a_end uniform in [1, sentences − 1]), so segments end at sentence ends;
    - B is the rest of the chunk (true next), or — with probability 1/2, and always when the chunk holds a single
      sentence — a span of another document (random next), in which case the chunk's unused sentences are put
      back and start the next chunk;
    - the pair is trimmed to fit by `truncate_seq_pair`.

    `split_single_sentence=True` is fastbert's earlier variant: a one-sentence chunk is cut inside the sentence
    and gets a true-next B with probability 1/2, which keeps NSP near 50/50 on short documents (Google's rule
    gives ~64 % random pairs on the embedded lead paragraphs) at the price of true-next pairs cut mid-sentence
    while random B segments always start at a sentence start.
    """
    document = docs[doc_index]
    max_num_tokens = max_seq_len - 3  # [CLS] A [SEP] B [SEP]
    target = max_num_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_num_tokens)
    instances: list[tuple[list[int], list[int], bool]] = []
    chunk: list[list[int]] = []
    chunk_len, i = 0, 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target:
            pieces, rewindable = chunk, True
            if split_single_sentence and len(chunk) == 1 and len(chunk[0]) >= 2:
                cut = rng.randint(1, len(chunk[0]) - 1)
                pieces, rewindable = [chunk[0][:cut], chunk[0][cut:]], False
            a_end = rng.randint(1, len(pieces) - 1) if len(pieces) >= 2 else 1
            a = [t for s in pieces[:a_end] for t in s]
            if len(pieces) == 1 or rng.random() < 0.5:
                is_random = True
                b = _random_b(docs, doc_index, target - len(a), rng)
                if rewindable:
                    i -= len(pieces) - a_end  # the unused sentences of this chunk start the next one
            else:
                is_random = False
                b = [t for s in pieces[a_end:] for t in s]
            truncate_seq_pair(a, b, max_num_tokens, rng)
            if a and b:
                instances.append((a, b, is_random))
            chunk, chunk_len = [], 0
        i += 1
    return instances


def create_instances(
    docs: list[list[list[int]]], max_seq_len: int, dupe_factor: int, short_seq_prob: float, rng: random.Random,
    split_single_sentence: bool = False,
) -> list[tuple[list[int], list[int], bool]]:
    """Every document `dupe_factor` times (different packing and random B each time), then shuffled."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to draw random next segments from, got {len(docs)}")
    instances = []
    for _ in range(dupe_factor):
        for d in range(len(docs)):
            instances.extend(
                instances_from_document(docs, d, max_seq_len, short_seq_prob, rng, split_single_sentence)
            )
    rng.shuffle(instances)
    return instances


def write_split(out_dir: Path, split: str, instances: list[tuple[list[int], list[int], bool]], vocab_size: int) -> None:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    lengths = np.array([len(a) + len(b) for a, b, _ in instances], dtype=np.int64)
    offsets = np.zeros(len(instances) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for a, b, _ in instances for t in (*a, *b)), dtype=dtype, count=int(offsets[-1]))
    np.save(out_dir / f"{split}.tokens.npy", tokens)
    fault_point(f"prepare:{split}.tokens-written")
    np.save(out_dir / f"{split}.offsets.npy", offsets)
    np.save(out_dir / f"{split}.len_a.npy", np.array([len(a) for a, _, _ in instances], dtype=np.int32))
    np.save(out_dir / f"{split}.is_random_next.npy", np.array([r for _, _, r in instances], dtype=np.uint8))


def load_array(path: Path, mmap: bool = False) -> np.ndarray:
    """np.load of one prepared array; a truncated or corrupt file is a ValueError that names it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; prepare the data again (fastbert-prepare)") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); prepare the data again (fastbert-prepare)") from None


# ---------------------------------------------------------------------------------------------- API
@dataclass
class PrepareConfig:
    out_dir: str = "runs/data/wiki-128"  # output directory (one per sequence length)
    inputs: tuple[str, ...] = ()  # text / .json files; empty = the embedded Wikipedia lead paragraphs
    vocab: str | None = None  # vocab.txt; None = the MiniLM (original BERT uncased) vocabulary
    vocab_size: int = 0  # > 0: train a new WordPiece vocabulary of this size on the corpus instead
    lowercase: bool = True  # the default vocabulary is uncased
    max_seq_len: int = 128  # 128 for phase 1, 512 for phase 2
    dupe_factor: int = 5  # passes over the corpus, each packed and paired differently (BERT used 10)
    short_seq_prob: float = 0.1  # fraction of documents packed to a random shorter length
    split_single_sentence: bool = False  # cut a one-sentence chunk inside the sentence instead of always
    #                                      pairing it with a random B (off = the original BERT's rule)
    heldout_fraction: float = 0.02  # of the documents, for evaluation (0 = no held-out split)
    seed: int = 12345
    overwrite: bool = False  # replace an out_dir that is not a previous fastbert-prepare output (deleting it)

    def validate(self) -> None:
        if not 8 <= self.max_seq_len <= 4096:
            raise ValueError(f"max_seq_len must be in [8, 4096], got {self.max_seq_len}")
        if self.dupe_factor < 1:
            raise ValueError(f"dupe_factor must be >= 1, got {self.dupe_factor}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if self.vocab is not None and self.vocab_size:
            raise ValueError("give either vocab (an existing vocab.txt) or vocab_size (train one), not both")


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a complete dataset of this format. Its manifest (when there is one) is checked
    for sizes — cheap, and it catches truncated files — and ValueError names a file that does not match."""
    out_dir = Path(out_dir)
    recover(out_dir)
    meta = out_dir / "meta.json"
    if not meta.is_file():
        return False
    verify_manifest(out_dir, hashes=False)
    return data_format(out_dir) == FORMAT_VERSION


def data_format(out_dir: str | os.PathLike):
    """The `format_version` recorded in out_dir/meta.json; None without a readable one."""
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None


def _is_own_output(folder: Path) -> bool:
    """A previous fastbert-prepare output: its manifest says so, or (written before manifests) it holds only the
    files prepare writes, meta.json included."""
    if manifest_kind(folder) == DATA_KIND:
        return True
    names = {p.name for p in folder.iterdir()}
    return "meta.json" in names and names <= _OUTPUT_NAMES


def check_out_dir(out_dir: Path, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """The refusal rule of the module docstring (ValueError, one line)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    refuse_dangerous_target(out_dir, "--out-dir", protected=inputs)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite and not _is_own_output(out_dir):
        raise ValueError(f"--out-dir {out_dir} exists and is not a fastbert-prepare output; choose a new or empty "
                         "folder, or pass --overwrite to replace it (its files are deleted)")


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Create the dataset directory described in the module docstring; returns its metadata.

    Written to a temporary sibling directory and renamed at the end, so an interrupted run leaves nothing
    that looks complete.
    """
    cfg.validate()
    t0 = time.time()
    if cfg.inputs:
        inputs = [str(p) for p in cfg.inputs]
    else:
        from fastbert.resources import wiki_corpus_path

        inputs = [str(wiki_corpus_path())]
    vocab_path = Path(cfg.vocab) if cfg.vocab else (None if cfg.vocab_size else default_vocab_path())
    if vocab_path is not None and not vocab_path.is_file():
        raise FileNotFoundError(f"vocab file not found: {vocab_path}")
    out_dir = absolute(cfg.out_dir)
    recover(out_dir)
    check_out_dir(out_dir, cfg.overwrite, [*inputs, *([cfg.vocab] if cfg.vocab else [])])
    docs_text = read_documents(inputs)
    log(f"read {len(docs_text)} documents, {sum(map(len, docs_text))} sentences from {len(inputs)} file(s)")

    with atomic_folder(out_dir, DATA_KIND, format_version=FORMAT_VERSION) as tmp:
        if vocab_path is None:
            vocab_path = train_vocab(docs_text, cfg.vocab_size, tmp, cfg.lowercase)
            log(f"trained a WordPiece vocabulary of {cfg.vocab_size} on the corpus")
        else:
            shutil.copyfile(vocab_path, tmp / "vocab.txt")
        tok = Tokenizer.from_file(tmp / "vocab.txt", lowercase=cfg.lowercase).backend_tokenizer
        split_stats: dict = {}
        docs = tokenize_documents(tok, docs_text, cfg.max_seq_len - 3, split_stats)
        if split_stats["split_sentences"]:
            log(f"note: {split_stats['split_sentences']} sentence(s) longer than {cfg.max_seq_len - 3} tokens (one "
                f"giant 'sentence' each) were cut into {split_stats['split_pieces']} pieces")
        if len(docs) < 2:
            raise ValueError(f"need at least 2 non-empty documents, got {len(docs)}")

        rng = random.Random(cfg.seed)
        order = list(range(len(docs)))
        rng.shuffle(order)
        n_held = round(len(docs) * cfg.heldout_fraction)
        if cfg.heldout_fraction > 0:
            n_held = max(2, n_held)
            if len(docs) - n_held < 2:
                raise ValueError(
                    f"{len(docs)} documents are too few for a held-out split of {cfg.heldout_fraction}; "
                    "give more text or heldout_fraction=0"
                )
        split_docs = {"heldout": [docs[i] for i in order[:n_held]], "train": [docs[i] for i in order[n_held:]]}
        counts = {}
        for split in SPLITS:
            if not split_docs[split]:
                instances = []
            else:
                instances = create_instances(
                    split_docs[split], cfg.max_seq_len, cfg.dupe_factor, cfg.short_seq_prob, rng,
                    cfg.split_single_sentence,
                )
            write_split(tmp, split, instances, tok.get_vocab_size())
            counts[split] = {
                "documents": len(split_docs[split]),
                "instances": len(instances),
                "tokens": sum(len(a) + len(b) for a, b, _ in instances),
                "random_next": sum(r for _, _, r in instances),
            }
        if counts["train"]["instances"] == 0:
            raise ValueError("the corpus produced no training instances")
        meta = {
            "format_version": FORMAT_VERSION,
            "config": {**asdict(cfg), "inputs": inputs, "vocab": str(vocab_path)},
            "vocab_size": tok.get_vocab_size(),
            "special_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
            "max_seq_len": cfg.max_seq_len,
            "splits": counts,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
    c = counts["train"]
    log(
        f"wrote {out_dir}: {c['instances']} train / {counts['heldout']['instances']} held-out instances "
        f"of ≤ {cfg.max_seq_len} tokens ({c['tokens'] / max(1, c['instances']):.1f} tokens each, "
        f"{c['random_next'] / max(1, c['instances']):.1%} random next) in {time.time() - t0:.1f} s"
    )
    return meta


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastbert-prepare",
        description="Make BERT pretraining instances (NSP pairs; masking happens at load time) from plain text.",
    )
    p.add_argument("inputs", nargs="*", help="text files (one sentence per line, blank line between documents) "
                   "or .json title→{extract} files; default: the embedded Wikipedia lead paragraphs")
    add_config_arguments(p, PrepareConfig, exclude=("inputs",))
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = vars(build_parser().parse_args(None if argv is None else list(argv)))
    cfg = PrepareConfig(inputs=tuple(args.pop("inputs")), **args)
    try:
        prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastbert-prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastbert-prepare: interrupted; {cfg.out_dir} is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
