"""A text corpus of any size from the embedded Wikipedia lead paragraphs, to measure fastbert-prepare at scale.

The 10,033 paragraphs, repeated, each pass in a new shuffled order, written in fastbert-prepare's text format
(one paragraph per line, a blank line between documents) until the size is reached:

    python -m train.corpus_text runs/data/wiki-120mb.txt --mb 120

Caution: repeated text — every document occurs many times (a held-out one is held out in every copy, the split
being a hash of the text); it measures speed and memory, not what a model learns from a large corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path


def write_wiki_text(path: str | os.PathLike, megabytes: float, seed: int = 0) -> int:
    """Write at least `megabytes` MiB (2^20 bytes, what fastbert-prepare calls MB; ending at a document's end) to
    `path`, atomically; returns the bytes written."""
    from fastbert.resources import wiki_corpus_path

    with open(wiki_corpus_path(), encoding="utf-8") as f:
        entries = json.load(f).values()
    docs = [d for d in ("\n".join(line for line in e["extract"].splitlines() if line.strip()) for e in entries) if d]
    target, written = int(megabytes * (1 << 20)), 0
    rng = random.Random(seed)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            while written < target:
                rng.shuffle(docs)
                for doc in docs:
                    written += out.write(doc.encode("utf-8") + b"\n\n")
                    if written >= target:
                        break
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.corpus_text", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the text file to write (replaced)")
    p.add_argument("--mb", type=float, required=True, help="its size in MB (2^20 bytes)")
    p.add_argument("--seed", type=int, default=0, help="the order of the paragraphs in each pass")
    args = p.parse_args(None if argv is None else list(argv))
    n = write_wiki_text(args.path, args.mb, args.seed)
    print(f"wrote {args.path}: {n / (1 << 20):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
