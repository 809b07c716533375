"""A rank's token stream (each document's tokens followed by eos, epoch after epoch) and a
cursor into it whose position is three plain ints: ``(epoch, doc, offset)``.

The position names the next unread token as "token ``offset`` of this rank's ``doc``-th
document of ``epoch``", so a resumed cursor re-tokenizes one document and continues exactly
where the saved one stopped. Documents are tokenized a batch at a time, ahead of the reader;
that read-ahead never shows in the position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice

import numpy as np

from smile.data.sources import DocumentSource
from smile.data.tokenizer import TextTokenizer

TOKENIZE_BATCH = 64  # documents tokenized per call (the Rust tokenizer parallelises a batch)


@dataclass(frozen=True)
class Position:
    epoch: int
    doc: int
    offset: int


@dataclass
class _Doc:
    epoch: int
    index: int
    tokens: np.ndarray


class TokenCursor:
    """Reads fixed-size windows of one rank's token stream, starting at ``start``."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: TextTokenizer,
        dp_rank: int,
        dp_size: int,
        epochs: int | None,
        start: Position,
    ) -> None:
        self._tokenizer = tokenizer
        self._texts = self._iter_texts(source, dp_rank, dp_size, epochs, start)
        self._loaded: deque[_Doc] = deque()
        self._offset = start.offset
        self._empty_position = start  # the position while nothing is loaded
        self._available = -start.offset  # loaded tokens from the position on
        self._exhausted = False

    @property
    def position(self) -> Position:
        if self._loaded:
            head = self._loaded[0]
            return Position(head.epoch, head.index, self._offset)
        return self._empty_position

    def window(self, n: int) -> np.ndarray | None:
        """The next ``n`` tokens without consuming them; None when the stream ends first."""
        while self._available < n and not self._exhausted:
            self._load()
        if self._available < n:
            return None
        pieces, needed, offset = [], n, self._offset
        for doc in self._loaded:
            piece = doc.tokens[offset : offset + needed]
            pieces.append(piece)
            needed -= piece.size
            offset = 0
            if needed == 0:
                break
        return np.concatenate(pieces)

    def advance(self, n: int) -> None:
        """Consume ``n`` tokens (at most what :meth:`window` just returned)."""
        self._offset += n
        self._available -= n
        while self._loaded and self._offset >= self._loaded[0].tokens.size:
            done = self._loaded.popleft()
            self._offset -= done.tokens.size
            self._empty_position = Position(done.epoch, done.index + 1, 0)

    def _load(self) -> None:
        batch = list(islice(self._texts, TOKENIZE_BATCH))
        if not batch:
            self._exhausted = True
            return
        encoded = self._tokenizer.encode_batch([text for _, _, text in batch])
        for (epoch, index, _), ids in zip(batch, encoded):
            tokens = np.asarray([*ids, self._tokenizer.eos_id], dtype=np.int64)
            self._loaded.append(_Doc(epoch, index, tokens))
            self._available += tokens.size

    @staticmethod
    def _iter_texts(
        source: DocumentSource, dp_rank: int, dp_size: int, epochs: int | None, start: Position
    ) -> Iterator[tuple[int, int, str]]:
        for epoch in count(start.epoch):
            if epochs is not None and epoch >= epochs:
                return
            first = start.doc if epoch == start.epoch else 0
            produced = 0
            for index, text in enumerate(source.documents(epoch, dp_rank, dp_size, first), start=first):
                produced += 1
                yield epoch, index, text
            if produced == 0 and first == 0:
                raise ValueError(
                    f"data-parallel rank {dp_rank} of {dp_size} gets no documents in epoch {epoch}: "
                    "the corpus has fewer documents than ranks (raise DataConfig.max_docs or add data)"
                )
