"""One MoE layer on one rank, forward + backward: router, permute, experts, combine and autograd."""

from __future__ import annotations

import pytest
import torch

from smile.moe import MoELayer

TOKENS, D_MODEL, D_FF, EXPERTS = 2048, 256, 512, 8

# Enough rounds that a median means something on a shared 2-core machine.
pytestmark = pytest.mark.benchmark(min_rounds=15, warmup=True, warmup_iterations=2)


@pytest.mark.parametrize("router", ["switch", "bilevel"])
def test_layer_forward_backward(benchmark, device, synced, router: str) -> None:
    layer = MoELayer(D_MODEL, D_FF, EXPERTS, router=router, capacity_factor=None, chunks=1).to(device)
    x = torch.randn(TOKENS, D_MODEL, device=device, requires_grad=True)

    def step() -> torch.Tensor:
        out, aux = layer(x)
        (out.square().mean() + aux).backward()
        return out

    out = benchmark(synced(step))
    assert out.shape == (TOKENS, D_MODEL) and x.grad is not None
