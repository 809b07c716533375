"""Typed configuration of the pretraining data pipeline, validated up front.

Every bad value raises :class:`DataConfigError` naming the field and what it allows, so a
mistyped YAML key or objective fails at start-up instead of hours into a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SOURCES = ("embedded", "files", "c4", "hf")
OBJECTIVES = ("causal_lm", "span_corruption")
TXT_DOCS = ("file", "paragraph")
C4_SPLITS = ("train", "validation")


class DataConfigError(ValueError):
    """A DataConfig field holds a value the pipeline cannot use."""


@dataclass
class DataConfig:
    """What to read, how to tokenize it and how to cut it into batches.

    source: "embedded" (docstrings of the Python standard library, offline), "files" (local
        .txt/.jsonl/.parquet), "c4" (allenai/c4 "en" via HF streaming, or a local mirror of that
        repository given in ``paths``) or "hf" (any HF ``datasets`` builder, streamed).
    paths: files, directories or globs for "files"; the root of a local allenai/c4 mirror for
        "c4" (optional); ``data_files`` for "hf" (optional).
    text_field: the record field (jsonl, parquet, HF datasets) holding the document text.
    txt_doc: a .txt file is one document ("file") or one per blank-line-separated paragraph.
    hf_path, hf_name: the ``datasets.load_dataset`` path and config name for source "hf".
    split: dataset split for "c4"/"hf" ("train" or "validation" for c4).
    max_docs: read at most this many documents of the source (before shuffling and sharding).
    tokenizer: "embedded" (a byte-level BPE trained at first use on the embedded corpus and
        cached) or a local path: a directory loadable by ``transformers.AutoTokenizer`` or a
        ``tokenizer.json`` file.
    cache_dir: root of the on-disk caches (default ~/.cache/smile); the trained tokenizer goes
        to <cache_dir>/tokenizers/<hash>/tokenizer.json.
    vocab_size: vocabulary size of the trained tokenizer (special tokens included).
    tokenizer_train_docs: train the embedded tokenizer on at most this many embedded docs.
    n_sentinels: T5 sentinel tokens <extra_id_0> ... <extra_id_{n-1}>.
    objective: "causal_lm" (packed next-token prediction) or "span_corruption" (T5).
    seq_len: tokens per example (the encoder input length for span corruption).
    noise_density, mean_span_length: T5 span corruption parameters.
    batch_size: examples per batch on each data-parallel rank.
    seed: seeds document shuffling and span masks; equal seeds give equal batches.
    shuffle: shuffle document order every epoch (finite sources) or through a buffer (streams).
    shuffle_buffer: examples in the shuffle buffer of streamed sources.
    epochs: stop after this many passes over the data; None repeats forever.
    """

    source: str = "embedded"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    txt_doc: str = "file"
    hf_path: str | None = None
    hf_name: str | None = None
    split: str = "train"
    max_docs: int | None = None
    tokenizer: str = "embedded"
    cache_dir: str | None = None
    vocab_size: int = 8192
    tokenizer_train_docs: int | None = None
    n_sentinels: int = 100
    objective: str = "causal_lm"
    seq_len: int = 512
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    epochs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, tuple)):
            self.paths = [self.paths] if isinstance(self.paths, str) else list(self.paths)
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (parsed YAML/TOML), rejecting unknown keys by name."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise DataConfigError(f"DataConfig has no field(s) {unknown}; fields are: {', '.join(names)}")
        return cls(**values)

    def validate(self) -> None:
        _choice("source", self.source, SOURCES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("txt_doc", self.txt_doc, TXT_DOCS)
        if not isinstance(self.paths, list) or not all(isinstance(p, str) and p for p in self.paths):
            raise DataConfigError(f"DataConfig.paths must be a list of non-empty strings, got {self.paths!r}")
        for name in ("text_field", "tokenizer", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataConfigError(
                    f"DataConfig.{name} must be a non-empty string, got {getattr(self, name)!r}"
                )
        for name in ("hf_path", "hf_name", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise DataConfigError(f"DataConfig.{name} must be None or a non-empty string, got {value!r}")
        _int("seq_len", self.seq_len, minimum=2)
        _int("batch_size", self.batch_size, minimum=1)
        _int("seed", self.seed, minimum=0)
        _int("n_sentinels", self.n_sentinels, minimum=0)
        _int("shuffle_buffer", self.shuffle_buffer, minimum=1)
        trained = self.tokenizer == "embedded"
        _int("vocab_size", self.vocab_size, minimum=min_trained_vocab(self.n_sentinels) if trained else 1)
        for name in ("max_docs", "tokenizer_train_docs", "epochs"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), minimum=1)
        if not isinstance(self.shuffle, bool):
            raise DataConfigError(f"DataConfig.shuffle must be true or false, got {self.shuffle!r}")
        _float_in("noise_density", self.noise_density, low=0.0, high=1.0)
        if not _is_number(self.mean_span_length) or self.mean_span_length < 1:
            raise DataConfigError(
                f"DataConfig.mean_span_length must be a number >= 1, got {self.mean_span_length!r}"
            )
        if self.source == "files" and not self.paths:
            raise DataConfigError(
                "DataConfig.paths must name files, directories or globs when source='files'"
            )
        if self.source == "c4":
            _choice("split", self.split, C4_SPLITS)
            if len(self.paths) > 1:
                raise DataConfigError(
                    "DataConfig.paths for source='c4' is one local allenai/c4 mirror root "
                    "(or empty for the hub)"
                )
        if self.source == "hf" and self.hf_path is None:
            raise DataConfigError(
                "DataConfig.hf_path is required when source='hf' (a datasets.load_dataset path)"
            )
        if self.objective == "span_corruption":
            if self.n_sentinels < 1:
                raise DataConfigError("DataConfig.n_sentinels must be >= 1 when objective='span_corruption'")
            if self.seq_len < 4:
                raise DataConfigError("DataConfig.seq_len must be >= 4 when objective='span_corruption'")


def min_trained_vocab(n_sentinels: int) -> int:
    """Smallest vocab a byte-level BPE can have: 256 bytes, pad/eos/unk and the sentinels."""
    return 256 + 3 + max(n_sentinels, 0)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DataConfigError(
            f"DataConfig.{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
        )


def _int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataConfigError(f"DataConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float_in(name: str, value: object, low: float, high: float) -> None:
    if not _is_number(value) or not low < value < high:
        raise DataConfigError(f"DataConfig.{name} must be a number in ({low}, {high}), got {value!r}")
