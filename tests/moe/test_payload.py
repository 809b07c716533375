"""Low-precision All2All payloads: codec accuracy, and the layer's error bounds with gradients."""

from __future__ import annotations

import pytest
import torch

from smile.moe.layer import MoELayer
from smile.moe.payload import get_codec
from smile.testing import run_distributed


@pytest.mark.parametrize("name,bound", [("exact", 0.0), ("bf16", 2**-8), ("fp8", 2**-4)])
def test_codec_round_trip_error_per_element(name, bound):
    torch.manual_seed(0)
    x = torch.randn(64, 48) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different scale
    x[5] = 0.0
    codec = get_codec(name)
    wire = codec.encode(x)
    y = codec.decode(wire, x.dtype)
    if name != "exact":
        assert wire.dtype == torch.uint8
    if name == "fp8":
        assert wire.shape == (64, 48 + 4)  # one byte per value plus an fp32 scale per row
    # error relative to each row's largest magnitude (fp8 is scaled per row)
    row_max = x.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert ((y - x).abs() / row_max).max() <= bound
    assert torch.equal(y[5], x[5])


def test_unknown_payloads_are_rejected():
    with pytest.raises(ValueError, match="allowed: exact, bf16, fp8"):
        MoELayer(8, 16, 4, dispatch_payload="int4")
    with pytest.raises(ValueError, match="combine_payload 'fp8' unknown; allowed: exact, bf16"):
        MoELayer(8, 16, 4, combine_payload="fp8")


def _run(topo, payload: str, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 2 * topo.ep_size, router="bilevel", dispatcher="hierarchical",
                     topology=topo, dispatch_payload=payload, combine_payload=combine)
    gen = torch.Generator().manual_seed(topo.rank)
    x = torch.randn(64, 32, generator=gen, requires_grad=True)
    out, aux = layer(x)
    (out.square().sum() + aux).backward()
    return out.detach(), x.grad


def payload_worker(topo) -> dict[str, tuple[float, float]]:
    exact_out, exact_grad = _run(topo, "exact", "exact")
    errors = {}
    for payload, combine in (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "exact")):
        out, grad = _run(topo, payload, combine)
        errors[f"{payload}/{combine}"] = (
            float((out - exact_out).norm() / exact_out.norm()),
            float((grad - exact_grad).norm() / exact_grad.norm()),
        )
    return errors


@pytest.mark.slow
def test_low_precision_payloads_stay_within_bounds():
    for rank, errors in enumerate(run_distributed(payload_worker, 2, 2, timeout=180)):
        out_err, grad_err = errors["bf16/bf16"]
        assert 0 < out_err < 1e-2 and grad_err < 2e-2, (rank, errors)
        for key in ("fp8/bf16", "fp8/exact"):
            out_err, grad_err = errors[key]
            assert 0 < out_err < 8e-2 and grad_err < 1e-1, (rank, key, errors)
