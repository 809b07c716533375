"""Per-rank batch iterables for the Trainer: shuffled training batches and padded eval batches.

Every rank runs the same number of forward passes (MoE layers communicate inside forward), so
training drops the incomplete tail of each epoch and evaluation pads each rank's shard to the
same number of rows, marking padding with weight 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from smile.models.lemda.data import Table
from smile.models.lemda.featurize import Featurizer

WEIGHT = "weight"


class _BatchDataset(Dataset):
    """Item i is the featurized batch of row-index list i (decoded in loader workers if any)."""

    def __init__(self, table: Table, featurizer: Featurizer, batches: list[list[int]], weights=None) -> None:
        self.table, self.featurizer, self.batches, self.weights = table, featurizer, batches, weights

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.featurizer(self.table.take(self.batches[i]))
        if self.weights is not None:
            batch[WEIGHT] = torch.tensor(self.weights[i], dtype=torch.float32)
        return batch


def _iterate(dataset: _BatchDataset, num_workers: int) -> Iterator[dict[str, Any]]:
    if num_workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    return iter(DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers))


class TrainBatches:
    """This rank's training batches: a fresh seeded permutation per epoch, incomplete tail dropped."""

    def __init__(
        self,
        table: Table,
        featurizer: Featurizer,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        self.per_epoch = len(table) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"the train split has {len(table)} rows, fewer than one batch of {batch_size} rows "
                f"on each of {world_size} rank(s)"
            )
        self.table, self.featurizer = table, featurizer
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.table), generator=gen).tolist()
        step = self.batch_size * self.world_size
        batches = [
            order[b * step + self.rank * self.batch_size : b * step + (self.rank + 1) * self.batch_size]
            for b in range(self.per_epoch)
        ]
        return _iterate(_BatchDataset(self.table, self.featurizer, batches), self.num_workers)


class EvalBatches:
    """Rows ``rank, rank + W, ...`` in batches; every rank gets the same number of batches and
    rows, padded with row 0 at weight 0."""

    def __init__(
        self,
        table: Table,
        featurizer: Featurizer,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
    ) -> None:
        if len(table) == 0:
            raise ValueError("the eval split has no rows")
        real = list(range(rank, len(table), world_size))
        pad = -(-len(table) // world_size) - len(real)
        rows, weights = real + [0] * pad, [1.0] * len(real) + [0.0] * pad
        per_rank = len(rows)
        self.batches = [rows[i : i + batch_size] for i in range(0, per_rank, batch_size)]
        self.weights = [weights[i : i + batch_size] for i in range(0, per_rank, batch_size)]
        self.table, self.featurizer, self.num_workers = table, featurizer, num_workers

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _BatchDataset(self.table, self.featurizer, self.batches, self.weights)
        return _iterate(dataset, self.num_workers)
