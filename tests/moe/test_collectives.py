"""Collective calls per dispatch: the counts once per layer call (per hop, or in one call), none
for a hop that is free.

Every ``torch.distributed`` collective is wrapped while a layer runs forward and backward, on
2 nodes x 2 ranks and on the expert-parallel layouts 1 x 2 (one node: the inter-node hop is free)
and 2 x 1 (one rank per node: the intra-node hop is free), flat and two-hop (both count
exchanges on 2 x 2), 1 and 3 chunks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from smile.moe import MoELayer, Topology
from smile.testing import run_distributed

COLLECTIVES = (
    "all_to_all_single",
    "all_to_all",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "barrier",
)


@contextlib.contextmanager
def recorded_collectives() -> Iterator[list[tuple[str, int, bool]]]:
    """Every collective call made inside: (name, ranks in its group, whether it moved floats)."""
    calls: list[tuple[str, int, bool]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str):
        @functools.wraps(originals[name])
        def recorded(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            size = dist.get_world_size(kwargs.get("group")) if dist.is_initialized() else 1
            calls.append((name, size, tensor is not None and tensor.is_floating_point()))
            return originals[name](*args, **kwargs)

        return recorded

    try:
        for name in COLLECTIVES:
            setattr(dist, name, wrap(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _layer_calls(topology: Topology, dispatcher: str, chunks: int, count_exchange: str = "per_hop") -> dict:
    """Collective calls of one forward and one backward, the route's hops (label, ranks, whether
    the rows are regrouped on arrival), and the output and gradients."""
    torch.manual_seed(0)
    layer = MoELayer(
        16, 32, 2 * topology.ep_size, topology=topology, dispatcher=dispatcher, chunks=chunks,
        count_exchange=count_exchange,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7 + topology.rank)
    x = torch.randn(30, 16, generator=gen, requires_grad=True)
    with recorded_collectives() as forward:
        out, aux = layer(x)
    with recorded_collectives() as backward:
        ((out * torch.randn(out.shape, generator=gen)).sum() + aux).backward()
    plan = layer.router(x.detach())
    (route,) = layer.dispatcher.permute(x.detach(), plan).routes
    return {
        "forward": forward,
        "backward": backward,
        "hops": [(hop.label, dist.get_world_size(hop.group), hop.index is not None) for hop in route.hops],
        "results": [out.detach(), x.grad, *(p.grad for p in layer.parameters())],
    }


def _collectives(topo: Topology) -> dict:
    layouts = {
        "2x2": topo,
        "1x2": Topology(2, 2, topo.rank, ep_nodes=1),  # expert parallelism within one node
        "2x1": Topology(4, 1, topo.rank, ep_nodes=2),  # one rank per node
    }
    report = {}
    for name, layout in layouts.items():
        layout.group("ep")  # create the process groups before anything is counted
        for chunks in (1, 3):
            flat = _layer_calls(layout, "flat", chunks)
            hier = _layer_calls(layout, "hierarchical", chunks)
            # Plain values only: tensors would travel back through shared memory of a finished rank.
            same = all(torch.equal(a, b) for a, b in zip(flat.pop("results"), hier.pop("results")))
            report[name, "flat", chunks] = flat
            report[name, "hierarchical", chunks] = {**hier, "same_as_flat": same}
            if name == "2x2":
                one_call = _layer_calls(layout, "hierarchical", chunks, "per_call")
                same = all(torch.equal(a, b) for a, b in zip(_layer_calls(layout, "flat", chunks)["results"],
                                                             one_call.pop("results")))  # fmt: skip
                report[name, "hierarchical/per_call", chunks] = {**one_call, "same_as_flat": same}
    return report


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    """One simulated 2 x 2 cluster runs every layout, dispatcher and chunk count."""
    return run_distributed(_collectives, 2, 2, timeout=300)


@pytest.mark.slow
def test_collective_calls_per_dispatch(reports):
    for rank, report in enumerate(reports):
        for (layout, dispatcher, chunks), got in report.items():
            where = f"rank {rank} {layout} {dispatcher} chunks={chunks}"
            hops = 2 if dispatcher.startswith("hierarchical") and layout == "2x2" else 1
            assert len(got["hops"]) == hops, where
            # Forward: the count exchange (integers, every chunk at once): one call over the EP
            # group, or with two hops per_hop one per hop in its own group; then each chunk's
            # payload through every hop, toward the experts and back.
            counts = [call for call in got["forward"] if not call[2]]
            expected = [("all_to_all_single", 2 if layout != "2x2" else 4, False)]
            if dispatcher == "hierarchical" and layout == "2x2":
                expected = [("all_to_all_single", 2, False)] * 2
            assert counts == expected, where
            payload = [call for call in got["forward"] if call[2]]
            assert len(payload) == 2 * hops * chunks, where
            assert all(name == "all_to_all_single" for name, _, _ in payload), where
            # Backward: the same hops in reverse, no count call.
            assert len(got["backward"]) == 2 * hops * chunks, where
            assert all(moved for _, _, moved in got["backward"]), where
            # No collective is ever made over a group of one rank.
            assert all(size > 1 for _, size, _ in got["forward"] + got["backward"]), where


@pytest.mark.slow
def test_both_count_exchanges_deliver_what_flat_delivers(reports):
    for rank, report in enumerate(reports):
        for name in ("hierarchical", "hierarchical/per_call"):
            for chunks in (1, 3):
                assert report["2x2", name, chunks]["same_as_flat"], f"rank {rank} {name} chunks={chunks}"


@pytest.mark.slow
def test_a_free_hop_makes_no_collective_call_and_costs_what_flat_costs(reports):
    for rank, report in enumerate(reports):
        for layout, kept in (("1x2", "intra"), ("2x1", "inter")):
            for chunks in (1, 3):
                flat, hier = report[layout, "flat", chunks], report[layout, "hierarchical", chunks]
                where = f"rank {rank} {layout} chunks={chunks}"
                # One hop over the other group, regrouping exactly when flat does.
                assert hier["hops"] == [(kept, 2, flat["hops"][0][2])], where
                flat_calls = [(name, size) for name, size, _ in flat["forward"] + flat["backward"]]
                assert [(n, s) for n, s, _ in hier["forward"] + hier["backward"]] == flat_calls, where
                assert hier["same_as_flat"], where


def test_one_rank_makes_no_collective_call():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4)
    with recorded_collectives() as calls:
        out, aux = layer(torch.randn(10, 16, requires_grad=True))
        (out.sum() + aux).backward()
    assert calls == []
