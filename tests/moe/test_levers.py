"""Every lever composes with every router and dispatcher.

On 2 nodes x 2 ranks, for each router (switch, topk, bilevel) and capacity (1.0, dropless): the
exact levers (the flat or two-hop exchange, its counts per hop or in one call, 1 or 3 pipeline
chunks, one All2All call or point-to-point pieces per hop) give bit-identical outputs and
gradients; the lossy payload levers (bf16, fp8) run with every router and dispatcher and stay
close to the exact layer, bit-identical between the two transports.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from smile.moe import MoELayer, Topology
from smile.testing import run_distributed

ROUTERS = ("switch", "topk", "bilevel")
CAPACITIES = (1.0, None)
DISPATCHERS = ("flat", "hierarchical")
# (dispatcher, chunks, count_exchange, transport): the exact levers; counting in one call only
# changes two hops
EXACT = [(d, c, "per_hop", t) for d in DISPATCHERS for c in (1, 3) for t in ("collective", "p2p")]
EXACT += [("hierarchical", c, "per_call", "collective") for c in (1, 3)]
PAYLOADS = ({"dispatch_payload": "bf16", "combine_payload": "bf16"}, {"dispatch_payload": "fp8"})


def _forward_backward(topology: Topology, **options) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, topology=topology, **options)
    gen = torch.Generator().manual_seed(7 + topology.rank)
    x = torch.randn(40, 16, generator=gen, requires_grad=True)
    out, aux = layer(x)
    ((out * torch.randn(out.shape, generator=gen)).sum() + aux).backward()
    return [out.detach(), x.grad, *(p.grad for p in layer.parameters())]


def _levers(topology: Topology) -> dict[str, float]:
    """Max relative difference to the flat, unchunked layer, per (router, capacity, levers)."""
    from smile.moe import exchange

    torch.set_num_threads(1)
    exchange.P2P_PIECE_BYTES = 200  # "p2p": 3 rows of 16 floats a piece, so messages come in pieces
    report: dict[str, float] = {}
    for router, cf in itertools.product(ROUTERS, CAPACITIES):
        base = {"router": router, "capacity_factor": cf}
        reference = _forward_backward(topology, **base, dispatcher="flat", chunks=1)
        for dispatcher, chunks, counts, transport in EXACT:
            options = {"dispatcher": dispatcher, "chunks": chunks, "count_exchange": counts}
            got = _forward_backward(topology, **base, **options, transport=transport)
            exact = all(torch.equal(a, b) for a, b in zip(got, reference))
            name = f"{router}/{cf}/{dispatcher}/{counts}/chunks{chunks}/{transport}"
            report[name] = 0.0 if exact else float("inf")
        for dispatcher, payload in itertools.product(DISPATCHERS, PAYLOADS):
            options = {**base, "dispatcher": dispatcher, "chunks": 3, **payload}
            got = _forward_backward(topology, **options)
            out, ref = got[0], reference[0]
            name = f"{router}/{cf}/{dispatcher}/{payload['dispatch_payload']}"
            report[name] = float((out - ref).norm() / ref.norm())
            # the same wire format in point-to-point pieces: the same bits as one All2All call
            pieces = _forward_backward(topology, **options, transport="p2p")
            report[f"{name}/p2p is exact"] = 0.0 if all(map(torch.equal, pieces, got)) else float("inf")
    return report


@pytest.mark.slow
def test_every_lever_composes_with_every_router_and_dispatcher():
    reports = run_distributed(_levers, 2, 2, timeout=300)
    for report in reports:
        exact = {k: v for k, v in report.items() if "chunks" in k}
        assert len(exact) == len(ROUTERS) * len(CAPACITIES) * len(EXACT)
        assert all(v == 0.0 for v in exact.values()), [k for k, v in exact.items() if v]
        assert all(v == 0.0 for k, v in report.items() if k.endswith("p2p is exact")), report
        lossy = {k: v for k, v in report.items() if "chunks" not in k and "exact" not in k}
        assert len(lossy) == len(ROUTERS) * len(CAPACITIES) * 4
        # each lossy lever is applied (the output moves) and stays close to the exact layer
        assert all(0 < v < (0.01 if k.endswith("bf16") else 0.08) for k, v in lossy.items()), lossy
