"""Chunked pipelining: same results as the unchunked layer, bit for bit, in full precision."""

from __future__ import annotations

import pytest
import torch

from smile.moe.exchange import EXACT, Transfer
from smile.moe.layer import MoELayer
from smile.moe.pipeline import Stage, run_stages
from smile.testing import run_distributed
from tests.moe.reference import build_layer, dense_forward_backward, layer_forward_backward

D_MODEL, D_FF = 8, 16

# (router, dispatcher, capacity factor, router options, dispatch payload, combine payload)
CASES = [
    ("bilevel", "hierarchical", None, {}, "exact", "exact"),
    ("bilevel", "flat", None, {}, "exact", "exact"),
    ("topk", "hierarchical", None, {"k": 2}, "exact", "exact"),
    ("switch", "flat", 1.0, {}, "exact", "exact"),
    ("topk", "hierarchical", 0.5, {"k": 2}, "exact", "exact"),
    ("bilevel", "hierarchical", None, {}, "fp8", "bf16"),
]


def _layer(topo, router, dispatcher, capacity_factor, options, dispatch_payload, combine_payload, chunks):
    return build_layer(
        topo,
        77,
        D_MODEL,
        D_FF,
        router=router,
        dispatcher=dispatcher,
        capacity_factor=capacity_factor,
        dispatch_payload=dispatch_payload,
        combine_payload=combine_payload,
        chunks=chunks,
        **options,
    )


def chunked_worker(topo, tokens: int, chunk_counts: tuple[int, ...]) -> dict:
    gen = torch.Generator().manual_seed(500 + topo.rank)
    x, upstream = torch.randn(tokens, D_MODEL, generator=gen), torch.randn(tokens, D_MODEL, generator=gen)
    report: dict = {"identical": {}, "dense_error": {}, "dropped": {}}
    for case in CASES:
        router, dispatcher, cf, _, dispatch_payload, combine_payload = case
        name = f"{router}+{dispatcher} cf={cf} {dispatch_payload}/{combine_payload}"
        base = layer_forward_backward(_layer(topo, *case, 1), x, upstream)
        report["dropped"][name] = float(base["dropped"])
        for chunks in chunk_counts:
            layer = _layer(topo, *case, chunks)
            assert layer.chunks == chunks
            got = layer_forward_backward(layer, x, upstream)
            report["identical"][f"{name} chunks={chunks}"] = {k: torch.equal(got[k], base[k]) for k in base}
            if dispatch_payload == "exact":
                want = dense_forward_backward(layer, x, upstream)
                report["dense_error"][f"{name} chunks={chunks}"] = max(
                    float((got[k] - want[k]).abs().max()) for k in want if want[k].numel()
                )
    return report


@pytest.mark.slow
@pytest.mark.parametrize(("nodes", "gpus", "tokens", "chunk_counts"), [(2, 2, 40, (2, 3)), (2, 2, 5, (8,))])
def test_chunked_layer_is_bit_identical_to_unchunked(nodes, gpus, tokens, chunk_counts):
    """Outputs and every gradient (input, router, expert weights) equal the unchunked layer's.

    Five tokens in eight chunks leaves chunks empty on every rank; capacity factors below the
    load drop copies, and chunking keeps exactly the same ones.
    """
    reports = run_distributed(chunked_worker, nodes, gpus, tokens, chunk_counts)
    assert any(r["dropped"]["topk+hierarchical cf=0.5 exact/exact"] > 0 for r in reports)
    for rank, report in enumerate(reports):
        for case, identical in report["identical"].items():
            assert all(identical.values()), f"rank {rank} {case}: differs in {identical}"
        for case, error in report["dense_error"].items():
            assert error < 1e-5, f"rank {rank} {case}: {error} from the dense reference"


def test_chunked_single_process_matches_unchunked():
    topo_layers = [_layer_local(chunks) for chunks in (1, 4)]
    x = torch.randn(33, D_MODEL, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(33, D_MODEL, generator=torch.Generator().manual_seed(4))
    base, got = (layer_forward_backward(layer, x, upstream) for layer in topo_layers)
    assert all(torch.equal(got[k], base[k]) for k in base)


def _layer_local(chunks: int) -> MoELayer:
    torch.manual_seed(5)
    return MoELayer(D_MODEL, D_FF, 4, router="topk", k=2, capacity_factor=0.75, chunks=chunks)


def test_chunks_option_is_checked():
    for bad in (0, -1, "many", 1.5):
        with pytest.raises(ValueError, match="chunks must be 'auto' or an integer >= 1"):
            MoELayer(D_MODEL, D_FF, 4, chunks=bad)
    assert MoELayer(D_MODEL, D_FF, 4, router="bilevel").chunks == 1  # nothing to overlap on one rank


class _Channel:
    """Stands for a process group: records the order in which transfers start on it."""

    def __init__(self) -> None:
        self.started: list[tuple[int, str]] = []


def test_run_stages_runs_the_tail_without_transfers_after_compute():
    ran = []
    out = run_stages([Stage(lambda chunk, x: x + chunk)], [torch.zeros(1)] * 2, tail=lambda: ran.append(1))
    assert ran == [1] and [float(t) for t in out] == [0.0, 1.0]


def test_run_stages_orders_each_channel_and_applies_every_stage():
    inter, intra = _Channel(), _Channel()

    def hop(channel: _Channel, label: str, add: float) -> Stage:
        def start(chunk: int, x: torch.Tensor) -> Transfer:
            channel.started.append((chunk, label))
            return Transfer(x + add, None, EXACT, x.dtype)

        return Stage(start, channel)

    stages = [
        hop(inter, "dispatch", 1.0),
        hop(intra, "dispatch", 10.0),
        Stage(lambda chunk, x: x * 2),
        hop(intra, "combine", 100.0),
        hop(inter, "combine", 1000.0),
    ]
    tail_saw: list[list[int]] = []
    inputs = [torch.full((2,), float(c)) for c in range(3)]
    out = run_stages(stages, inputs, tail=lambda: tail_saw.append(list(inter.started)))
    # The tail ran after every compute stage, before the last chunk's final transfer.
    assert len(tail_saw) == 1 and (2, "combine") not in tail_saw[0]
    assert [t.tolist() for t in out] == [[(c + 11) * 2 + 1100] * 2 for c in range(3)]
    # Stage s of chunk c is issued at time c + s (stages 0 and 4 for inter, 1 and 3 for intra),
    # earlier chunks first on ties.
    d, c = "dispatch", "combine"
    assert inter.started == [(0, d), (1, d), (2, d), (0, c), (1, c), (2, c)]
    assert intra.started == [(0, d), (1, d), (0, c), (2, d), (1, c), (2, c)]
