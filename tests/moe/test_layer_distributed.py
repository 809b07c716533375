"""Expert-parallel exactness on simulated clusters: the layer equals a dense reference."""

from __future__ import annotations

import pytest
import torch

from smile.testing import run_distributed
from tests.moe.reference import build_layer, dense_forward_backward, layer_forward_backward

D_MODEL, D_FF, TOKENS = 8, 16, 24

# (router, dispatcher, router options): the pairings the issue names plus cross pairings.
PAIRINGS = [
    ("switch", "flat", {}),
    ("switch", "hierarchical", {}),
    ("topk", "flat", {"k": 2}),
    ("topk", "hierarchical", {"k": 2}),
    ("bilevel", "hierarchical", {}),
    ("bilevel", "flat", {}),
]


def _build(topo, router, dispatcher, capacity_factor, options):
    return build_layer(
        topo,
        1234,
        D_MODEL,
        D_FF,
        router=router,
        dispatcher=dispatcher,
        capacity_factor=capacity_factor,
        **options,
    )


def _inputs(topo, tokens=TOKENS):
    gen = torch.Generator().manual_seed(100 + topo.rank)
    return torch.randn(tokens, D_MODEL, generator=gen), torch.randn(tokens, D_MODEL, generator=gen)


def _max_errors(got: dict, want: dict) -> dict[str, float]:
    errors = {}
    for name, ref in want.items():
        value = got[name]
        if ref is None or value is None:
            errors[name] = 0.0 if ref is None and value is None else float("inf")
            continue
        errors[name] = float((value - ref).abs().max()) if ref.numel() else 0.0
    return errors


def exactness_worker(topo) -> dict:
    """Runs every pairing, padded and dropless, plus the flat-vs-hierarchical identity."""
    report: dict = {"errors": {}, "bitwise": {}, "dropped": {}}
    x, upstream = _inputs(topo)
    for router, dispatcher, options in PAIRINGS:
        for cf in (1.0, None):
            layer = _build(topo, router, dispatcher, cf, options)
            got = layer_forward_backward(layer, x, upstream)
            want = dense_forward_backward(layer, x, upstream)
            # "dropped" is compared too: the layer counts drops as the reference does.
            report["errors"][f"{router}+{dispatcher} cf={cf}"] = _max_errors(got, want)
            report["dropped"][f"{router}+{dispatcher} cf={cf}"] = float(got["dropped"])
    for router, options in (("switch", {}), ("bilevel", {}), ("topk", {"k": 2})):
        for cf in (1.0, None):
            results = []
            for dispatcher in ("flat", "hierarchical"):
                layer = _build(topo, router, dispatcher, cf, options)
                results.append(layer_forward_backward(layer, x, upstream))
            report["bitwise"][f"{router} cf={cf}"] = all(
                torch.equal(results[0][k], results[1][k]) for k in results[0]
            )
    return report


def zero_tokens_worker(topo) -> dict:
    """Rank 0 sends nothing; all tokens of the others go to expert 0, so most ranks receive nothing."""
    errors = {}
    for dispatcher in ("flat", "hierarchical"):
        for cf in (1.0, None):
            layer = _build(topo, "switch", dispatcher, cf, {})
            with torch.no_grad():
                layer.router.proj.weight.zero_()
                layer.router.proj.weight[0] = 1.0
            tokens = 0 if topo.rank == 0 else TOKENS
            x, upstream = _inputs(topo, tokens)
            x = x.abs()  # positive inputs: expert 0 has the top logit for every token
            got = layer_forward_backward(layer, x, upstream)
            want = dense_forward_backward(layer, x, upstream)
            errors[f"{dispatcher} cf={cf}"] = max(_max_errors(got, want).values())
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 4), (2, 2), (4, 2)])
def test_layer_matches_dense_reference(nodes, gpus):
    reports = run_distributed(exactness_worker, nodes, gpus, timeout=300)
    for rank, report in enumerate(reports):
        for key, errors in report["errors"].items():
            bad = {name: err for name, err in errors.items() if not err <= 1e-5}
            assert not bad, f"rank {rank} {key}: {bad}"
        for key, identical in report["bitwise"].items():
            assert identical, f"rank {rank}: flat and hierarchical differ for {key}"
    for key in reports[0]["dropped"]:
        dropped = [r["dropped"][key] for r in reports]
        if "cf=None" in key:
            assert max(dropped) == 0.0, key
        elif nodes * gpus > 1:
            assert max(dropped) > 0.0, f"{key}: the padded case should exercise drops"


@pytest.mark.slow
def test_ranks_receiving_zero_tokens_work():
    reports = run_distributed(zero_tokens_worker, 2, 2, timeout=180)
    for rank, errors in enumerate(reports):
        assert all(err <= 1e-5 for err in errors.values()), f"rank {rank}: {errors}"
