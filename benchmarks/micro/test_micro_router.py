"""Router forward: Switch's top-1 gate over all experts vs SMILE's two small gates."""

from __future__ import annotations

import pytest
import torch

from smile.moe import MoEConfig, build_router

TOKENS, D_MODEL, EXPERTS, NODES = 4096, 256, 64, 8

# Enough rounds that a median means something on a shared 2-core machine.
pytestmark = pytest.mark.benchmark(min_rounds=15, warmup=True, warmup_iterations=2)


@pytest.mark.parametrize("router", ["switch", "bilevel"])
def test_router_forward(benchmark, device, synced, router: str) -> None:
    config = MoEConfig(num_experts=EXPERTS, router=router, capacity_factor=1.25)
    gate = build_router(config, D_MODEL, num_nodes=NODES if router == "bilevel" else 1).to(device)
    x = torch.randn(TOKENS, D_MODEL, device=device)
    with torch.no_grad():
        plan = benchmark(synced(lambda: gate(x)))
    assert plan.expert_ids.shape == (TOKENS, 1) and bool(plan.keep.any())
