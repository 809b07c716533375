"""The node-count sweep's pure helpers in benchmarks/make_results.py: grouping, hold-out, CPU-bound."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from benchmarks import make_results as mr
from smile.sim import cost_model as cm

NODES = (2, 4, 8)
SIZES = (16384, 65536, 262144)
TRUTH = replace(
    cm.emulated_spec(2, 2, 200.0),
    collective_overhead=2e-3,
    inter_latency=0.5e-3,
    intra_latency=0.2e-3,
    intra_bandwidth=0.5e9,
    copy_bandwidth=1e9,
)


def _synthetic(spec: cm.ClusterSpec) -> list[cm.Measurement]:
    """Noise-free All2All times of ``spec`` at every sweep point."""
    return [
        cm.Measurement(kind, n, 2, size, cm.all2all_time(replace(spec, nodes=n), kind, size))
        for n in NODES
        for size in SIZES
        for kind in cm.DISPATCH_KINDS
    ]


def _report(nodes: int, flat: float, hier: float) -> dict:
    return {
        "config": {"nodes": nodes},
        "results": [{"size_bytes": 4096, "flat": {"median_s": flat}, "hierarchical": {"median_s": hier}}],
    }


def test_points_collect_passes_and_measurements_take_their_median():
    points = mr.sweep_all2all_points([_report(2, 1.0, 2.0), _report(2, 3.0, 4.0), _report(2, 2.0, 9.0)])
    assert points == {(2, 4096): {"flat": [1.0, 3.0, 2.0], "hierarchical": [2.0, 4.0, 9.0]}}
    flat, hier = mr.sweep_measurements(points, gpus=2)
    assert (flat.kind, flat.seconds, hier.kind, hier.seconds) == ("flat", 2.0, "hierarchical", 4.0)


def test_holdout_fit_never_sees_the_node_count_it_predicts():
    measured = _synthetic(TRUTH)
    base = cm.emulated_spec(2, 2, 200.0)
    specs = mr.holdout_specs(measured, base)
    assert sorted(specs) == list(NODES)
    skewed = [replace(m, seconds=10 * m.seconds) if m.nodes == 8 else m for m in measured]
    again = mr.holdout_specs(skewed, base)
    assert again[8] == specs[8]  # 8 nodes' own points do not enter its prediction
    assert again[2] != specs[2]  # but they enter the others'
    # noise-free points of the model's own form: every held-out node count is predicted within 1%
    for m in measured:
        predicted = cm.all2all_time(replace(specs[m.nodes], nodes=m.nodes), m.kind, m.size)
        assert predicted == pytest.approx(m.seconds, rel=0.01)


def test_layer_prediction_calibrates_only_on_other_node_counts():
    workload = cm.MoEWorkload(tokens_per_gpu=512, d_model=128, d_ff=256, bytes_per_element=4)
    truth = replace(TRUTH, flops=3e9)
    switch_flat = {n: cm.layer_step(replace(truth, nodes=n), workload, "switch")["total"] for n in NODES}
    pred = mr.predicted_layers(replace(TRUTH, flops=1e9), workload, 4, switch_flat)
    expected = cm.layer_step(replace(truth, nodes=4), workload, "smile")["total"]
    assert pred["smile"] == pytest.approx(expected, rel=1e-6)
    assert mr.predicted_layers(replace(TRUTH, flops=1e9), workload, 4, {**switch_flat, 4: 99.0}) == pred
    # the communication modelled 2x too slow: the fitted factor takes it back
    slow = replace(TRUTH, collective_overhead=4e-3, inter_latency=1e-3, intra_latency=0.4e-3)
    slow = replace(slow, inter_bandwidth=100e6 / 8, intra_bandwidth=0.25e9, copy_bandwidth=0.5e9)
    assert mr.predicted_layers(slow, workload, 4, switch_flat)["smile"] == pytest.approx(expected, rel=1e-6)
    nothing = mr.predicted_layers(TRUTH, workload, 4, {4: 1.0})  # no other node count to calibrate on
    assert all(math.isnan(v) for v in nothing.values())


def test_cpu_bound_threshold():
    assert mr.cpu_bound(0.95) and mr.cpu_bound(0.9)
    assert not mr.cpu_bound(0.6)
