"""smile.runtime.sharding: items split over ranks and gathered back in order."""

from __future__ import annotations

import pytest

from smile.runtime.sharding import gather_in_order, rank_and_world, shard
from smile.testing import run_distributed


def test_shard_is_strided_and_covers_every_item_once():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for x in p) == items
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        shard(items, 3, 3)


def test_one_process_gathers_its_own_results():
    assert rank_and_world() == (0, 1)
    assert gather_in_order([{"a": 1}, "b"]) == [{"a": 1}, "b"]


def _square_my_shard(topology, n):
    rank, world = rank_and_world()
    mine = [{"i": i, "sq": i * i, "rank": rank} for i in shard(range(n), rank, world)]
    return gather_in_order(mine)


def test_two_ranks_gather_in_the_original_order_on_every_rank():
    results = run_distributed(_square_my_shard, 1, 2, 5, timeout=60)
    assert results[0] == results[1]
    assert [r["i"] for r in results[0]] == list(range(5))
    assert [r["rank"] for r in results[0]] == [0, 1, 0, 1, 0]
