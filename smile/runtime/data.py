"""Endless, resumable iteration over a training data source.

A source is an iterable of batches for this rank, or a factory ``source(rank, world_size)``
returning one. When it is exhausted a new epoch starts (``set_epoch`` is called on the source,
or on its ``sampler``, if it has one). The position is ``(epoch, batches into the epoch)``;
a source with ``state_dict``/``load_state_dict`` (torchdata's StatefulDataLoader, smile's
loaders) saves and restores its own position, any other source is fast-forwarded on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

Source = Iterable | Callable[[int, int], Iterable]


def resolve(source: Source, rank: int, world_size: int) -> Iterable:
    if not hasattr(source, "__iter__") and callable(source):
        return source(rank, world_size)
    return source


class DataStream:
    def __init__(self, source: Iterable) -> None:
        self.source = source
        self.epoch = 0
        self.index = 0
        self._it: Iterator | None = None

    def _stateful(self) -> bool:
        return hasattr(self.source, "state_dict") and hasattr(self.source, "load_state_dict")

    def _start_epoch(self) -> None:
        for owner in (self.source, getattr(self.source, "sampler", None)):
            if owner is not None and hasattr(owner, "set_epoch"):
                owner.set_epoch(self.epoch)
                break
        self._it = iter(self.source)

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            if self.index == 0:
                raise ValueError("the training data yielded no batch in a whole epoch") from None
            self.epoch += 1
            self.index = 0
            self._start_epoch()
            batch = next(self._it)
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index}
        if self._stateful():
            state["source"] = self.source.state_dict()
        return state

    def seek(self, batches: int) -> None:
        """Start over at epoch 0 and skip ``batches`` batches, crossing epochs: the position a
        resume on another world size re-derives from the samples seen (the skipped batches are
        iterated)."""
        self.epoch, self.index, self._it = 0, 0, None
        for _ in range(batches):
            next(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if "source" in state and self._stateful():
            self.source.load_state_dict(state["source"])
            self._it = iter(self.source)
            return
        self._start_epoch()
        for skipped in range(self.index):
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(
                    f"cannot resume the data at epoch {self.epoch}, batch {self.index}: the source now "
                    f"ends after {skipped} batches"
                ) from None
