"""Bit-identical layer outputs and gradients against a recorded fixture.

``tests/fixtures/layer_golden.json`` holds a hash of every output, input gradient and parameter
gradient of fixed-seed layers (one rank, and 2 nodes x 2 GPUs over flat, two-hop, pipelined and
compressed-payload dispatch), recorded before the core was split into MoEConfig / TokenDispatcher.
Any change in what the layer computes, down to the last bit, fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from smile.moe import MoELayer, Topology
from smile.testing import run_distributed

FIXTURE = Path(__file__).parents[1] / "fixtures" / "layer_golden.json"

CASES = {
    "switch": dict(router="switch"),
    "topk_cf": dict(router="topk", k=2, capacity_factor=0.5),
    "bilevel": dict(router="bilevel", k_gpu=2, activation="swiglu"),
    "switch_chunks": dict(router="switch", chunks=2, capacity_factor=None),
}
DIST_CASES = {
    "switch_flat": dict(router="switch", chunks=1),
    "bilevel_auto": dict(router="bilevel", chunks=1),
    "bilevel_hier_pipe": dict(router="bilevel", dispatcher="hierarchical", chunks=3),
    "topk_flat_bf16": dict(router="topk", k=2, dispatcher="flat", dispatch_payload="bf16", chunks=2),
    "bilevel_fp8": dict(
        router="bilevel",
        dispatcher="hierarchical",
        dispatch_payload="fp8",
        combine_payload="bf16",
        jitter_eps=0.1,
        z_loss_weight=0.01,
    ),
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:32]


def _run(name: str, options: dict, topology: Topology) -> dict[str, str]:
    torch.manual_seed(1234)
    layer = MoELayer(32, 64, 8, topology=topology, **options)
    gen = torch.Generator().manual_seed(99 + topology.rank)
    x = torch.randn(4, 24, 32, generator=gen).requires_grad_()
    out, aux = layer(x)
    ((out * torch.randn(out.shape, generator=gen)).sum() + aux).backward()
    tensors = {f"{name}.out": out, f"{name}.aux": aux.reshape(1), f"{name}.dx": x.grad}
    tensors.update({f"{name}.grad.{p}": param.grad for p, param in layer.named_parameters()})
    return {key: _digest(t) for key, t in tensors.items()}


def _distributed_cases(topology: Topology) -> dict[str, str]:
    digests: dict[str, str] = {}
    for name, options in DIST_CASES.items():
        digests.update(_run(name, options, topology))
    return digests


@pytest.mark.slow
def test_layer_outputs_and_gradients_are_bit_identical_to_the_recorded_fixture():
    expected = json.loads(FIXTURE.read_text())
    torch.set_num_threads(1)
    got: dict[str, str] = {}
    for name, options in CASES.items():
        got.update(_run(name, options, Topology(1, 1)))
    for rank, digests in enumerate(run_distributed(_distributed_cases, 2, 2, timeout=300)):
        got.update({f"rank{rank}.{key}": value for key, value in digests.items()})
    assert sorted(got) == sorted(expected)
    differ = sorted(key for key in expected if got[key] != expected[key])
    assert not differ, f"{len(differ)} of {len(expected)} tensors changed: {differ[:10]}"
