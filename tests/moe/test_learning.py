"""A tiny expert-parallel MoE learns a clustered regression task with each router."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from smile.moe.experts import is_expert_parameter
from smile.moe.layer import MoELayer
from smile.testing import run_distributed

D_MODEL, CLUSTERS, STEPS = 16, 4, 150


def _task(rank: int, tokens: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens from 4 clusters; each cluster has its own nonlinear target map (fixed per task)."""
    task = torch.Generator().manual_seed(0)
    centers = torch.randn(CLUSTERS, D_MODEL, generator=task) * 3
    maps = torch.randn(CLUSTERS, D_MODEL, D_MODEL, generator=task) / D_MODEL**0.5
    data = torch.Generator().manual_seed(1000 + rank)
    cluster = torch.randint(0, CLUSTERS, (tokens,), generator=data)
    x = centers[cluster] + torch.randn(tokens, D_MODEL, generator=data)
    y = torch.tanh(torch.einsum("td,tde->te", x, maps[cluster]))
    return x, y


PAIRINGS = [("switch", "flat"), ("topk", "flat"), ("bilevel", "hierarchical")]


def learning_worker(topo) -> dict[str, tuple[float, float]]:
    return {router: _train(topo, router, dispatcher) for router, dispatcher in PAIRINGS}


def _train(topo, router: str, dispatcher: str) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = MoELayer(
        D_MODEL,
        32,
        2 * topo.ep_size,
        router=router,
        dispatcher=dispatcher,
        capacity_factor=None,
        topology=topo,
        k=2 if router == "topk" else None,
    )
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        x, y = _task(topo.rank * STEPS + step)
        out, aux = layer(x)
        loss = torch.nn.functional.mse_loss(out, y)
        optimizer.zero_grad()
        (loss + aux).backward()
        for p in layer.parameters():  # data-parallel average of the replicated router
            if not is_expert_parameter(p):
                dist.all_reduce(p.grad)
                p.grad /= topo.world_size
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.slow
def test_tiny_moe_learns_with_each_router():
    results = run_distributed(learning_worker, 2, 2, timeout=400)[0]
    for router, (first, last) in results.items():
        # A learned model ends below a quarter of its starting loss.
        assert last < 0.25 * first, f"{router}: loss {first:.3f} -> {last:.3f}"
