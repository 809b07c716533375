"""Tokenizers for the data pipeline: a local one, or a small BPE trained on the embedded corpus.

:class:`TextTokenizer` is the little the pipeline needs (batch encode, ids of eos/pad/unk and of
the T5 sentinels, a fingerprint) whichever library provides the vocabulary:

- a local path: a directory ``transformers.AutoTokenizer`` can load (never the hub), or a
  ``tokenizer.json`` file for ``tokenizers.Tokenizer.from_file``;
- ``"embedded"``: a byte-level BPE (so no text is ever unknown) trained at first use on the
  embedded corpus with specials ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (T5's ids) and
  ``<extra_id_0>`` ... ``<extra_id_{n-1}>``. It is cached at
  ``<cache_dir>/tokenizers/<hash>/tokenizer.json``, the hash covering the Python install (the
  corpus) and every training parameter, and published atomically (see :mod:`smile.data.cache`).
  Training is deterministic, so ranks that train their own copy agree; the fingerprint lets
  a trainer check that.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smile.data.cache import cache_root, content_key, publish_text
from smile.data.config import DataConfig
from smile.data.embedded import MIN_WORDS, embedded_documents, stdlib_root

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_FORMAT = 1


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


@dataclass(frozen=True)
class TextTokenizer:
    """Batch encoding plus the special ids the objectives need.

    ``encode_batch`` adds no special tokens; the pipeline appends ``eos_id`` after each document.
    ``sentinel_ids[i]`` is the id of ``<extra_id_i>`` (those present, up to the configured count).
    """

    encode_batch: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    sentinel_ids: tuple[int, ...]
    fingerprint: str
    path: str

    @classmethod
    def from_tokenizers(cls, tok: Tokenizer, n_sentinels: int, path: str) -> TextTokenizer:
        def ids_of(token: str) -> int | None:
            return tok.token_to_id(token)

        return cls._build(
            encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            ids_of=ids_of,
            names=(EOS, PAD, UNK),
            n_sentinels=n_sentinels,
            serialized=tok.to_str(),
            path=path,
        )

    @classmethod
    def from_transformers(cls, tok: Any, n_sentinels: int, path: str) -> TextTokenizer:
        vocab = tok.get_vocab()

        def ids_of(token: str | None) -> int | None:
            return vocab.get(token) if token is not None else None

        backend = getattr(tok, "backend_tokenizer", None)
        serialized = backend.to_str() if backend is not None else json.dumps(sorted(vocab.items()))
        return cls._build(
            encode_batch=lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
            vocab_size=len(tok),
            ids_of=ids_of,
            names=(tok.eos_token, tok.pad_token, tok.unk_token),
            n_sentinels=n_sentinels,
            serialized=serialized,
            path=path,
        )

    @classmethod
    def _build(
        cls,
        encode_batch: Callable[[list[str]], list[list[int]]],
        decode: Callable[[list[int]], str],
        vocab_size: int,
        ids_of: Callable[[str], int | None],
        names: tuple[str | None, str | None, str | None],
        n_sentinels: int,
        serialized: str,
        path: str,
    ) -> TextTokenizer:
        eos, pad, unk = (ids_of(name) if name is not None else None for name in names)
        if eos is None:
            raise ValueError(
                f"DataConfig.tokenizer={path!r} has no end-of-sequence token (looked for {names[0]!r})"
            )
        sentinels = []
        for i in range(n_sentinels):
            sid = ids_of(sentinel(i))
            if sid is None or sid == unk:
                break
            sentinels.append(sid)
        return cls(
            encode_batch=encode_batch,
            decode=decode,
            vocab_size=vocab_size,
            eos_id=eos,
            pad_id=pad,
            unk_id=unk,
            sentinel_ids=tuple(sentinels),
            fingerprint=hashlib.sha256(serialized.encode()).hexdigest()[:16],
            path=path,
        )


def train_bpe(docs: list[str], vocab_size: int, n_sentinels: int) -> Tokenizer:
    """A byte-level BPE with the pipeline's special tokens, trained on ``docs``."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK] + [sentinel(i) for i in range(n_sentinels)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def embedded_tokenizer_path(cfg: DataConfig) -> Path:
    """Where the embedded tokenizer for ``cfg`` is cached (whether or not it exists yet)."""
    key = content_key(
        {
            "format": _FORMAT,
            "python": sys.version,
            "stdlib": str(stdlib_root()),
            "min_words": MIN_WORDS,
            "tokenizers": tokenizers.__version__,
            "vocab_size": cfg.vocab_size,
            "n_sentinels": cfg.n_sentinels,
            "train_docs": cfg.tokenizer_train_docs,
        }
    )
    return cache_root(cfg.cache_dir) / "tokenizers" / key / "tokenizer.json"


def _load_tokenizer_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(
            f"cannot load tokenizer file {str(path)!r} (delete it to rebuild a cached one): {err}"
        ) from err


def build_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The tokenizer ``cfg.tokenizer`` names; trains and caches the embedded one on first use."""
    if cfg.tokenizer == "embedded":
        path = embedded_tokenizer_path(cfg)
        if not path.exists():
            docs = embedded_documents(cfg.tokenizer_train_docs, cfg.cache_dir)
            publish_text(path, train_bpe(docs, cfg.vocab_size, cfg.n_sentinels).to_str())
        return TextTokenizer.from_tokenizers(_load_tokenizer_file(path), cfg.n_sentinels, str(path))
    local = Path(cfg.tokenizer).expanduser()
    if local.is_file():
        return TextTokenizer.from_tokenizers(_load_tokenizer_file(local), cfg.n_sentinels, str(local))
    if local.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        return TextTokenizer.from_transformers(tok, cfg.n_sentinels, str(local))
    raise FileNotFoundError(
        f"DataConfig.tokenizer={cfg.tokenizer!r} is neither 'embedded' nor an existing tokenizer.json file "
        "or tokenizer directory"
    )
