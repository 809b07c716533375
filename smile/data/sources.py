"""Document sources: each rank's deterministic, disjoint sequence of documents for an epoch.

A source answers one question, "the documents of ``epoch`` for rank ``dp_rank`` of ``dp_size``,
starting at the ``start``-th one", which is all the loader needs to resume mid-epoch.

- Finite corpora (embedded, files) sit in memory; each epoch is a seeded permutation shared by
  all ranks and dealt round-robin (rank r takes positions r, r + dp_size, ...), so ranks are
  disjoint and resuming at ``start`` is an index, free.
- Streamed corpora (c4, hf) use ``datasets``: a seeded shuffle buffer re-seeded per epoch
  (``set_epoch``), then ``split_dataset_by_node`` (whole shards per rank when the shard count
  divides by ``dp_size``, else every rank reads all and keeps one example in ``dp_size``).
  Resuming at ``start`` re-reads and discards ``start`` documents: exact, but it costs the
  download and JSON decoding (not the tokenization) of everything consumed so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import numpy as np

from smile.data.config import DataConfig
from smile.data.embedded import embedded_documents
from smile.data.files import expand_paths, iter_file_documents
from smile.data.hub import open_c4, open_hf

if TYPE_CHECKING:
    from datasets import IterableDataset


class DocumentSource(Protocol):
    def documents(self, epoch: int, dp_rank: int, dp_size: int, start: int) -> Iterator[str]:
        """This rank's documents of ``epoch``, from its ``start``-th on."""
        ...


class ListSource:
    """A finite corpus held in memory, permuted per epoch and dealt round-robin to ranks."""

    def __init__(self, docs: list[str], seed: int, shuffle: bool) -> None:
        if not docs:
            raise ValueError("the configured corpus holds no documents (check DataConfig.source and paths)")
        self.docs = docs
        self.seed = seed
        self.shuffle = shuffle

    def order(self, epoch: int) -> np.ndarray:
        """Document indices of ``epoch`` before dealing, identical on every rank."""
        if not self.shuffle:
            return np.arange(len(self.docs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))

    def documents(self, epoch: int, dp_rank: int, dp_size: int, start: int) -> Iterator[str]:
        mine = self.order(epoch)[dp_rank::dp_size]
        return (self.docs[i] for i in mine[start:])


class StreamSource:
    """A streamed ``datasets.IterableDataset``, opened once, re-iterated per epoch."""

    def __init__(
        self,
        open_dataset: Callable[[], IterableDataset],
        text_field: str,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        max_docs: int | None,
    ) -> None:
        self._open = open_dataset
        self._dataset: IterableDataset | None = None
        self.text_field = text_field
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.max_docs = max_docs

    def documents(self, epoch: int, dp_rank: int, dp_size: int, start: int) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node

        if self._dataset is None:
            self._dataset = self._open()
        dataset = self._dataset
        if self.max_docs is not None:
            dataset = dataset.take(self.max_docs)
        if self.shuffle:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        dataset = split_dataset_by_node(dataset, rank=dp_rank, world_size=dp_size)
        dataset.set_epoch(epoch)
        return islice(self._texts(dataset), start, None)

    def _texts(self, dataset: IterableDataset) -> Iterator[str]:
        for example in dataset:
            if self.text_field not in example:
                raise ValueError(
                    f"no field DataConfig.text_field={self.text_field!r} in streamed records "
                    f"(fields: {sorted(example)})"
                )
            text = example[self.text_field]
            if isinstance(text, str) and text.strip():
                yield text


def open_source(cfg: DataConfig) -> DocumentSource:
    """The document source ``cfg`` describes (streams open lazily, on first iteration)."""
    if cfg.source == "embedded":
        return ListSource(embedded_documents(cfg.max_docs, cfg.cache_dir), cfg.seed, cfg.shuffle)
    if cfg.source == "files":
        docs = iter_file_documents(expand_paths(cfg.paths), cfg.text_field, cfg.txt_doc)
        return ListSource(list(islice(docs, cfg.max_docs)), cfg.seed, cfg.shuffle)
    if cfg.source == "c4":
        root = cfg.paths[0] if cfg.paths else None

        def open_dataset() -> IterableDataset:
            return open_c4(cfg.split, root)
    else:

        def open_dataset() -> IterableDataset:
            return open_hf(cfg.hf_path, cfg.hf_name, cfg.split, cfg.paths)

    return StreamSource(open_dataset, cfg.text_field, cfg.seed, cfg.shuffle, cfg.shuffle_buffer, cfg.max_docs)
