"""The offline default corpus: docstrings of the Python standard library on this machine.

Every Python install carries a few MB of English prose about code in its docstrings, so a
pretraining run can start with no download at all. Sources are parsed with :mod:`ast` (never
imported, so no module side effects), files are visited in sorted path order and docstrings
in :func:`ast.walk` order, which makes the document order deterministic for a given Python.
Parsing the whole library takes seconds, so the full corpus is cached as JSON on first use.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from smile.data.cache import cache_root, content_key, publish_text

# Directories that hold tests, installed third-party packages or bytecode, not library prose.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Docstrings shorter than this many words ("Return self.") teach a language model little.
MIN_WORDS = 3
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_FORMAT = 1


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path) -> list[Path]:
    """The standard library's .py files in sorted relative-path order, tests excluded."""
    found: list[Path] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found.extend(Path(directory, f) for f in sorted(files) if f.endswith(".py"))
    return found


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, OSError):  # broken or unreadable: skip
        return []
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED))
    return [doc for doc in docs if doc and len(doc.split()) >= MIN_WORDS]


def iter_stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Unique docstrings of the standard library, in deterministic order, parsed lazily."""
    seen: set[str] = set()
    for path in stdlib_sources(root or stdlib_root()):
        for doc in _docstrings(path):
            if doc not in seen:
                seen.add(doc)
                yield doc


def _corpus_cache_path(cache_dir: str | None) -> Path:
    key = content_key(
        {"format": _FORMAT, "python": sys.version, "stdlib": str(stdlib_root()), "min_words": MIN_WORDS}
    )
    return cache_root(cache_dir) / "corpora" / f"stdlib-docstrings-{key}.json"


def embedded_documents(max_docs: int | None = None, cache_dir: str | None = None) -> list[str]:
    """The embedded corpus, capped at ``max_docs``.

    A cap parses only as many files as it needs (fast, not cached); the full corpus is read
    from, or written to, the cache under ``cache_dir``.
    """
    path = _corpus_cache_path(cache_dir)
    if path.exists():
        docs = json.loads(path.read_text(encoding="utf-8"))
        return docs[:max_docs] if max_docs is not None else docs
    docs = list(islice(iter_stdlib_docstrings(), max_docs))
    if max_docs is None or len(docs) < max_docs:
        publish_text(path, json.dumps(docs))
    return docs
