"""Permute (index + row gather) and combine on each dispatch backend this machine has.

Triton runs only on a GPU: its CPU interpreter is far too slow to time.
"""

from __future__ import annotations

import pytest
import torch

from smile.moe.kernels import get_backend

TOKENS, HIDDEN, EXPERTS, K = 4096, 512, 64, 2


def _backend(name: str, device: torch.device):
    if name != "torch" and device.type != "cuda":
        pytest.skip(f"the {name} backend is timed on a GPU only")
    try:
        return get_backend(name)
    except RuntimeError as err:
        pytest.skip(str(err))


def _routing(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(EXPERTS, (TOKENS, K), device=device)
    keep = torch.ones(TOKENS, K, dtype=torch.bool, device=device)
    gates = torch.rand(TOKENS, K, device=device)
    return ids, keep, gates


# Enough rounds that a median means something on a shared 2-core machine.
pytestmark = pytest.mark.benchmark(min_rounds=15, warmup=True, warmup_iterations=2)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_permute(benchmark, device, synced, backend: str) -> None:
    ops = _backend(backend, device)
    ids, keep, _ = _routing(device)
    x = torch.randn(TOKENS, HIDDEN, device=device)

    def permute() -> torch.Tensor:
        _, src, _ = ops.dispatch_index(ids, keep, EXPERTS, kept_total=TOKENS * K)
        return ops.gather_rows(x, src)

    rows = benchmark(synced(permute))
    assert rows.shape == (TOKENS * K, HIDDEN)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_combine(benchmark, device, synced, backend: str) -> None:
    ops = _backend(backend, device)
    ids, keep, gates = _routing(device)
    dest, _, _ = ops.dispatch_index(ids, keep, EXPERTS, kept_total=TOKENS * K)
    y = torch.randn(TOKENS * K, HIDDEN, device=device)
    out = benchmark(synced(lambda: ops.combine(y, dest, gates)))
    assert out.shape == (TOKENS, HIDDEN)
