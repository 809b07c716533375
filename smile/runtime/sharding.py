"""Split a list of work items over ranks and gather the results back in the original order.

Inference jobs (the zoo's evaluation harnesses) run each item once somewhere: rank ``r`` of ``W``
takes items ``r, r + W, r + 2W, ...`` (strided, so ranks get lengths within one of each other),
and :func:`gather_in_order` returns every item's result, in item order, on every rank. Results
travel as JSON (no pickling), through :func:`smile.runtime.distributed.gather_json`. Without a
process group (one process) both are the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from smile.runtime.distributed import gather_json

T = TypeVar("T")


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items rank ``rank`` of ``world`` handles: every ``world``-th, starting at ``rank``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} is not in a world of size {world}")
    return list(items[rank::world])


def gather_in_order(local: Sequence[Any], group: Any = None) -> list[Any]:
    """Undo :func:`shard`: every rank's JSON-serialisable results, in the original item order
    (collective: every rank of ``group`` calls it with the results of its own shard)."""
    rank, world = rank_and_world(group)
    if world == 1:
        return list(local)
    parts = gather_json(list(local), group)
    merged: list[Any] = []
    for j in range(max(len(p) for p in parts)):
        merged.extend(part[j] for part in parts if j < len(part))
    return merged
