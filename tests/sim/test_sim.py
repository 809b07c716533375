"""smile.sim: the alpha-beta cost model, the emulated cluster, and the benchmarks at tiny sizes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import all2all_bench, make_results, moe_layer_bench, moe_layer_gpu_bench
from smile.sim import cluster as cl
from smile.sim import cost_model as cm
from smile.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]


# ---- cost model ---------------------------------------------------------------------------------
def _spec(**overrides) -> cm.ClusterSpec:
    base = replace(
        cm.emulated_spec(4, 2, 200),
        inter_bandwidth=20e6,
        inter_latency=5e-4,
        intra_bandwidth=60e6,
        intra_latency=2e-3,
        collective_overhead=4e-3,
        copy_bandwidth=400e6,
    )
    return replace(base, **overrides)


def test_hops_follow_the_dispatchers():
    n, g, m = 4, 8, 1e6
    flat, flat_copy = cm.plan_hops("flat", n, g, m)
    hier, hier_copy = cm.plan_hops("hierarchical", n, g, m)
    # count exchange + data, over (N-1)*G remote and G-1 local peers
    assert [(h.inter_peers, h.intra_peers) for h in flat] == [(24, 7), (24, 7)]
    # hop 1's count exchange, the inter hop among N ranks (hop 2's counts travel meanwhile, off the
    # critical path), then the intra hop among G ranks
    assert [(h.inter_peers, h.intra_peers) for h in hier] == [(3, 0), (3, 0), (0, 7)]
    # the same bytes leave each node; hierarchical moves m*(G-1)/G more inside it and copies twice
    assert sum(h.inter_bytes for h in flat) == pytest.approx(sum(h.inter_bytes for h in hier))
    assert sum(h.inter_bytes for h in flat) == pytest.approx(g * m * (n - 1) / n)
    assert sum(h.intra_bytes for h in hier) == pytest.approx(m * (g - 1) / g)
    assert (flat_copy, hier_copy) == (m, 2 * m)
    # a hop over a group of one is left out: one node is the flat exchange
    one_node, copies = cm.plan_hops("hierarchical", 1, 8, m)
    assert one_node == cm.plan_hops("flat", 1, 8, m)[0] and copies == m
    # per_call: one count call over all W ranks, then the two data hops
    one_call, _ = cm.plan_hops("hierarchical", n, g, m, "per_call")
    assert [(h.inter_peers, h.intra_peers) for h in one_call] == [(24, 7), (3, 0), (0, 7)]
    # a combine or a backward reuses the dispatch's counts
    assert [
        (h.inter_peers, h.intra_peers) for h in cm.plan_hops("hierarchical", n, g, m, counts=False)[0]
    ] == [
        (3, 0),
        (0, 7),
    ]
    with pytest.raises(ValueError, match="count_exchange 'both' unknown; allowed: per_hop, per_call"):
        cm.plan_hops("flat", n, g, m, "both")
    from smile.moe.config import COUNT_EXCHANGES

    assert cm.COUNT_EXCHANGES == COUNT_EXCHANGES


def test_bandwidth_bound_flat_and_hierarchical_cost_the_same():
    """With no latency, overhead, copy or intra-node cost, only uplink bytes count: equal times."""
    spec = _spec(inter_latency=0, intra_latency=0, collective_overhead=0)
    spec = replace(spec, intra_bandwidth=math.inf, copy_bandwidth=math.inf)
    for size in (1e4, 1e8):
        flat, hier = cm.all2all_time(spec, "flat", size), cm.all2all_time(spec, "hierarchical", size)
        assert flat == pytest.approx(hier) == pytest.approx(2 * size * 3 / 4 / 20e6)


def test_hierarchical_is_flat_on_one_node_and_wins_at_scale():
    spec = cm.preset("a100-efa")
    size = 16 * 2**20
    assert cm.all2all_time(spec.with_nodes(1), "hierarchical", size) == cm.all2all_time(
        spec.with_nodes(1), "flat", size
    )
    big = spec.with_nodes(128)
    assert cm.all2all_time(big, "hierarchical", size) < 0.5 * cm.all2all_time(big, "flat", size)
    # the alpha term is what hierarchical saves: without latency the advantage disappears
    no_alpha = replace(big, inter_latency=0.0, intra_latency=0.0)
    assert cm.all2all_time(no_alpha, "hierarchical", size) >= cm.all2all_time(no_alpha, "flat", size)
    one_node = spec.with_nodes(1)  # one node: the extra hop never pays, at any size
    assert all(
        cm.all2all_time(one_node, "hierarchical", 2**k) >= cm.all2all_time(one_node, "flat", 2**k)
        for k in range(10, 28)
    )
    assert 2 <= cm.crossover_nodes(spec, size) <= 8
    assert cm.crossover_nodes(no_alpha, size, max_nodes=64) is None


def test_layer_step_terms_and_projection():
    w = cm.MoEWorkload(tokens_per_gpu=4096, d_model=512, d_ff=2048)
    spec = cm.preset("h100-ib").with_nodes(32)
    switch, smile = cm.layer_step(spec, w, "switch"), cm.layer_step(spec, w, "smile")
    assert switch["experts"] == smile["experts"]  # same FLOPs in the experts
    # router outputs: E = 256 for Switch, N + G*e = 40 for SMILE
    assert switch["router"] / smile["router"] == pytest.approx(256 / 40)
    assert switch["total"] == pytest.approx(sum(v for k, v in switch.items() if k != "total"))
    rows = cm.projection(cm.preset("h100-ib"), w, (1, 4, 64))
    assert [r["gpus"] for r in rows] == [8, 32, 512]
    assert rows[0]["speedup"] < 1 < rows[1]["speedup"] < rows[2]["speedup"]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["switch_step_ms"] / r["smile_step_ms"])
    assert smile["total"] < switch["total"]


def test_calibrated_flops_reproduce_the_step_and_only_the_matmul_rate_moves():
    w = cm.MoEWorkload(tokens_per_gpu=2048, d_model=512, d_ff=512, bytes_per_element=4)
    true = _spec(flops=3e9)
    measured = cm.layer_step(true, w, "switch")["total"]
    calibrated = cm.calibrate_flops(_spec(flops=50e9), w, "switch", measured)
    assert calibrated.flops == pytest.approx(3e9)
    assert cm.layer_step(calibrated, w, "smile")["total"] == pytest.approx(
        cm.layer_step(true, w, "smile")["total"]
    )
    hier = cm.layer_step(calibrated, w, "switch", dispatch="hierarchical")
    size = 2048 * 512 * 4  # counts exchanged once; combine and backward reuse them
    dispatch = cm.all2all_time(true, "hierarchical", size)
    reuse = cm.all2all_time(true, "hierarchical", size, counts=False)
    assert reuse < dispatch and hier["all2all"] == pytest.approx(dispatch + 3 * reuse)
    with pytest.raises(ValueError, match="not above the model's communication"):
        cm.calibrate_flops(true, w, "switch", 1e-3)


def _synthetic(spec: cm.ClusterSpec, layouts=((4, 2), (2, 4)), noise: float = 0.0) -> list[cm.Measurement]:
    rng = np.random.default_rng(0)
    out = []
    for n, g in layouts:
        s = replace(spec, nodes=n, gpus_per_node=g)
        for size in (2**k for k in range(14, 27, 2)):
            for kind in cm.DISPATCH_KINDS:
                t = cm.all2all_time(s, kind, size) * (1 + noise * rng.uniform(-1, 1))
                out.append(cm.Measurement(kind, n, g, size, t))
    return out


def test_fit_recovers_a_known_cluster_and_predicts_new_layouts():
    true = _spec()
    fit = cm.fit_all2all(_synthetic(true), cm.emulated_spec(4, 2, 200))
    names = "inter_bandwidth inter_latency intra_bandwidth intra_latency collective_overhead copy_bandwidth"
    for name in names.split():
        assert getattr(fit.spec, name) == pytest.approx(getattr(true, name), rel=1e-6), name
    assert fit.worst() < 1e-9 and fit.worst(holdout=True) < 1e-9
    assert len(fit.sizes_within("flat")) == 7
    big = replace(fit.spec, nodes=16, gpus_per_node=8)
    assert cm.all2all_time(big, "flat", 1e7) == pytest.approx(
        cm.all2all_time(replace(true, nodes=16, gpus_per_node=8), "flat", 1e7)
    )


def test_fit_reports_noise_and_respects_the_uplink_cap():
    fit = cm.fit_all2all(_synthetic(_spec(), noise=0.2), cm.emulated_spec(4, 2, 200))
    assert 0.02 < fit.worst() < 0.4
    assert all(math.isfinite(e) for e in fit.holdout_errors)
    # a link faster than its 25 MB/s shaper: the capped fit may not follow it, the free fit does
    fast = _synthetic(_spec(inter_bandwidth=50e6))
    assert cm.fit_all2all(fast, cm.emulated_spec(4, 2, 200)).spec.inter_bandwidth <= 25e6 * (1 + 1e-9)
    free = cm.fit_all2all(fast, cm.emulated_spec(4, 2, 200), cap_inter_bandwidth=False)
    assert free.spec.inter_bandwidth == pytest.approx(50e6, rel=1e-6)


def test_nnls_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for _ in range(30):
        a, b = rng.normal(size=(14, 6)), rng.normal(size=14)
        np.testing.assert_allclose(cm.nnls(a, b), optimize.nnls(a, b)[0], atol=1e-9)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="ClusterSpec.nodes"):
        replace(cm.preset("a100-efa"), nodes=0)
    with pytest.raises(ValueError, match="ClusterSpec.inter_bandwidth"):
        replace(cm.preset("a100-efa"), inter_bandwidth=0)
    with pytest.raises(ValueError, match="ClusterSpec.inter_latency"):
        replace(cm.preset("a100-efa"), inter_latency=-1)
    with pytest.raises(ValueError, match="a100-efa, h100-ib"):
        cm.preset("tpu")
    with pytest.raises(ValueError, match="allowed: flat, hierarchical"):
        cm.all2all_time(cm.preset("a100-efa"), "ring", 1e6)
    with pytest.raises(ValueError, match="allowed: switch, smile"):
        cm.layer_step(cm.preset("a100-efa"), cm.MoEWorkload(), "gshard")
    with pytest.raises(ValueError, match="MoEWorkload.tokens_per_gpu"):
        cm.MoEWorkload(tokens_per_gpu=0)
    with pytest.raises(ValueError, match="at least 2 measurements"):
        cm.fit_all2all([cm.Measurement("flat", 2, 2, 1e6, 1.0)], cm.preset("a100-efa"))
    with pytest.raises(ValueError, match="unknown ClusterSpec fields"):
        cm.ClusterSpec.from_dict({**cm.preset("a100-efa").to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="ClusterConfig.rate_mbit"):
        cl.ClusterConfig(rate_mbit=0)
    with pytest.raises(ValueError, match="ClusterConfig.subnet"):
        cl.ClusterConfig(subnet="10.0.0.0/24")


def test_spec_round_trips_through_json_with_infinite_bandwidth():
    spec = replace(cm.preset("h100-ib"), copy_bandwidth=math.inf)
    assert cm.ClusterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_simulate_command_prints_and_writes_the_table(tmp_path, capsys):
    from smile.cli import main

    out = tmp_path / "sim.json"
    plot = tmp_path / "sim.png"
    assert (
        main(
            [
                "simulate",
                "--preset",
                "a100-efa",
                "--nodes",
                "1,16,256",
                "--json",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "8xA100 NVLink + 4x100Gb/s EFA" in text and "speedup" in text
    data = json.loads(out.read_text())
    rows = data["projections"]["8xA100 NVLink + 4x100Gb/s EFA"]
    assert [r["nodes"] for r in rows] == [1, 16, 256] and plot.stat().st_size > 0
    assert rows[2]["speedup"] > rows[1]["speedup"] > rows[0]["speedup"]


def test_cluster_without_root_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(cl.ClusterError, match="needs root"):
        cl.check_privileges()
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(cl.ClusterError, match="iproute2"):
        cl.check_privileges()


# ---- the emulated cluster -----------------------------------------------------------------------
def _netns_unavailable() -> str | None:
    """Why namespaces cannot be built here, or None."""
    try:
        cl.check_privileges()
        probe = f"smile-probe-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "delete", probe], check=True, capture_output=True)
    except cl.ClusterError as err:
        return str(err)
    except subprocess.CalledProcessError as err:
        return f"`ip netns add` failed: {err.stderr.decode().strip()}"
    return None


_SERVER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5201))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b: break
    t0 = t0 or time.perf_counter(); n += len(b)
print(n / (time.perf_counter() - t0), flush=True)
"""
_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5201)); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])): c.sendall(buf)
c.close()
"""


def _throughput(cluster: cl.EmulatedCluster, server: int, client: int, mib: int) -> float:
    srv = cluster.popen(server, [sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    cli = cluster.popen(client, [sys.executable, "-c", _CLIENT, cluster.address(server), str(mib)])
    assert cli.wait(timeout=60) == 0
    rate = float(srv.stdout.readline())
    srv.wait(timeout=10)
    return rate


@pytest.mark.slow
def test_emulated_cluster_shapes_links_runs_torchrun_and_cleans_up(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    config = cl.ClusterConfig(nodes=2, procs_per_node=1, rate_mbit=200, mtu=1500)  # default: 9000
    with cl.EmulatedCluster(config) as cluster:
        names = [cluster.namespace(i) for i in range(2)]
        assert set(names) <= set(cl.namespaces())
        link = ["ip", "-n", names[1], "link", "show", cl.IFACE]
        assert " mtu 1500 " in subprocess.run(link, capture_output=True, text=True).stdout
        # across nodes: the tbf rate (25 MB/s); inside a node (loopback): unshaped
        across = _throughput(cluster, 1, 0, 12)
        assert 0.6 * config.rate_bytes_per_s < across < 1.15 * config.rate_bytes_per_s
        within = _throughput(cluster, 0, 0, 48)
        assert within > 4 * config.rate_bytes_per_s
        out = tmp_path / "a2a.json"
        script = str(ROOT / "benchmarks" / "all2all_bench.py")
        argv = [script, "--sizes", "256K", "--iters", "2", "--min-iters", "1", "--out", str(out)]
        assert cluster.run(argv, timeout=240) == 0
    assert not set(names) & set(cl.namespaces())
    report = json.loads(out.read_text())
    assert report["config"]["nodes"] == 2 and report["config"]["gpus_per_node"] == 1
    assert report["environment"]["network"].startswith("emulated: tc tbf 200")
    row = report["results"][0]
    # 2 nodes x 1 rank: 128 KiB leave each node per dispatch; beyond the tbf bucket (which
    # leaves at once) they go at 25 MB/s, so a dispatch takes at least ~3 ms
    assert row["flat"]["median_s"] > (128 * 1024 - config.tbf_burst_bytes) / config.rate_bytes_per_s

    # an exception (as Ctrl-C raises KeyboardInterrupt) stops our processes and removes everything
    with pytest.raises(KeyboardInterrupt), cl.EmulatedCluster(config) as cluster:
        sleeper = cluster.popen(0, ["sleep", "60"])
        names = [cluster.namespace(i) for i in range(2)]
        raise KeyboardInterrupt
    assert sleeper.poll() is not None
    assert not set(names) & set(cl.namespaces())
    assert f"smb{os.getpid()}" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


# ---- benchmarks at tiny sizes -------------------------------------------------------------------
def _bench_worker(topo, a2a_cfg: dict, moe_cfg: dict) -> tuple[dict, dict]:
    return all2all_bench.all2all_worker(topo, a2a_cfg), moe_layer_bench.moe_layer_worker(topo, moe_cfg)


@pytest.mark.slow
def test_benchmarks_run_at_tiny_sizes(tmp_path):
    a2a_cfg = dict(sizes=[16 * 1024, 64 * 1024], hidden=16, dtype="float32", iters=2, min_iters=1, warmup=1)
    a2a_cfg.update(budget_s=5.0, count_exchange="per_call")  # the layers below count per hop
    moe_cfg = dict(tokens=32, d_model=16, d_ff=16, experts_per_rank=1, capacity_factor=1.0, iters=1, warmup=1)
    levers = ["smile+dropless", "smile+pipelined+bf16", "switch+pipelined+bf16", "smile+flat+pipelined+fp8"]
    moe_cfg.update(chunks=2, count_exchange="per_hop", variants=[*moe_layer_bench.VARIANTS, *levers])
    start = time.monotonic()
    per_rank = run_distributed(_bench_worker, 2, 2, a2a_cfg, moe_cfg, timeout=300)
    a2a, moe = [r[0] for r in per_rank], [r[1] for r in per_rank]
    # all2all: every rank reports the same slowest-rank table, at the sizes asked for
    assert all(r["table"] == a2a[0]["table"] for r in a2a)
    assert [row["size_bytes"] for row in a2a[0]["table"]] == [16 * 1024, 64 * 1024]
    for row in a2a[0]["table"]:
        for kind in all2all_bench.KINDS:
            assert len(row[kind]["samples_s"]) == row["iters"] and row[kind]["median_s"] > 0
            stages = row[kind]["stages_median_s"]
            assert tuple(stages) == all2all_bench.STAGES[kind] and all(s >= 0 for s in stages.values())
            assert sum(stages.values()) == pytest.approx(row[kind]["median_s"])
    env = {"layout": "2 nodes x 2 ranks", "backend": "gloo", "network": "test"}
    report = {"results": a2a[0]["table"], "environment": env}
    all2all_bench.plot(report, str(tmp_path / "a2a.png"))
    assert (tmp_path / "a2a.png").stat().st_size > 0
    # moe layers: every variant ran, DeepSpeed-MoE and the SMILE levers included; ratios computed
    rows = moe_layer_bench.summarize(moe, moe_cfg, world=4, rate_mbit=None)
    assert set(rows) == set(moe_cfg["variants"])
    assert rows["smile+dropless"]["dropped"] == 0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["deepspeed"]["dropped"] is None and 0 <= rows["smile"]["dropped"] < 1
    expected = {f"{v} / deepspeed" for v in moe_cfg["variants"] if v != "deepspeed"}
    expected |= {"smile / switch+flat", "smile+pipelined+bf16 / switch+pipelined+bf16"}  # like for like
    assert set(moe_layer_bench.ratios(rows)) == expected
    assert time.monotonic() - start < 300


def test_layer_variant_names_compose_levers():
    cfg = {"capacity_factor": 1.0, "chunks": 3, "count_exchange": "per_call"}
    options = moe_layer_bench.layer_options("smile+flat+pipelined+fp8", cfg)
    assert options == {
        "router": "bilevel",
        "dispatcher": "flat",
        "capacity_factor": 1.0,
        "chunks": 3,
        "count_exchange": "per_call",
        "dispatch_payload": "fp8",
        "combine_payload": "bf16",
    }
    assert moe_layer_bench.layer_options("switch+flat", cfg)["chunks"] == 1
    # every lever with either router: Switch takes SMILE's levers (like-for-like comparisons)
    assert moe_layer_bench.layer_options("switch+pipelined+fp8", cfg) == {**options, "router": "switch"}
    assert moe_layer_bench.layer_options("switch+hierarchical", cfg)["dispatcher"] == "hierarchical"
    for bad in ("smile+warp", "smile+bf16+fp8", "smile+flat+flat", "switch+flat+hierarchical", "smile+"):
        with pytest.raises(ValueError, match="unknown; allowed"):
            moe_layer_bench.layer_options(bad, cfg)
    # the twin of a SMILE variant is the Switch variant with the same levers, however it is spelled
    run = dict.fromkeys(["switch+flat", "switch+pipelined+fp8", "switch+p2p"])
    twins = {name: moe_layer_bench.switch_twin(name, run) for name in ("smile", "smile+flat", "smile+p2p")}
    assert twins == {"smile": "switch+flat", "smile+flat": "switch+flat", "smile+p2p": "switch+p2p"}
    assert moe_layer_bench.switch_twin("smile+flat+pipelined+fp8", run) == "switch+pipelined+fp8"
    assert moe_layer_bench.switch_twin("smile+dropless", run) is None


def test_results_compare_like_with_like_and_judge_the_links_against_the_target():
    tps = {"deepspeed": 100.0, "switch+flat": 120.0, "smile": 90.0, "switch+p2p": 100.0, "smile+p2p": 125.0}
    rows = {name: {"tokens_per_s": value} for name, value in tps.items()}
    ratios = {"smile / switch+flat": 0.75, "smile+p2p / switch+p2p": 1.25, "smile / deepspeed": 0.9}
    text = "\n".join(make_results.like_for_like(rows, ratios))
    assert "| (none) | smile | switch+flat | **0.75x** | 0.90x | 1.20x |" in text
    assert "| p2p | smile+p2p | switch+p2p | **1.25x** | 1.25x | 1.00x |" in text
    assert "ahead by more than 10% in 1 of 2 pairs, behind by more than 10% in 1" in text
    link_rows = [
        {"kind": "flat", "bytes_per_rank": 2**20, "pct_of_shaped": 93.0},
        {"kind": "flat", "bytes_per_rank": 2**22, "pct_of_shaped": 91.0},
        {"kind": "hierarchical", "bytes_per_rank": 2**20, "pct_of_shaped": 85.0},
        {"kind": "hierarchical", "bytes_per_rank": 2**14, "pct_of_shaped": 10.0},  # below 1 MiB: not judged
        {"kind": "inter x 2", "bytes_per_rank": 2**20, "pct_of_shaped": 50.0},  # a diagnostic, not a variant
    ]
    verdict = make_results._link_verdict(link_rows)
    assert verdict.endswith("flat 91-93%; hierarchical 85-85% (below 90%).")


def test_results_report_the_default_smile_layer_and_the_pretraining_run():
    rows = {name: {"tokens_per_s": tps} for name, tps in [("deepspeed", 100.0), ("smile", 95.0)]}
    rows["smile+pipelined"] = {"tokens_per_s": 110.0}
    verdicts = make_results._verdicts(rows)
    assert "chunks='auto') beats DeepSpeed-MoE: **1.10x**" in verdicts[0]
    assert "does NOT beat DeepSpeed-MoE (0.95x)" in verdicts[1]
    network = "emulated: tc tbf 200 Mbit/s per node uplink, MTU 9000"
    env = {"network": network, "date_utc": "d", "loadavg": [1.0]}
    assert make_results._mtu(env) == "9000" and make_results._mtu({"network": "old"}) == "1500"
    row = {
        "tokens_per_s": 0.0,
        "tokens_per_s_runs": [],
        "step_ms": 1.0,
        "forward_ms": 1.0,
        "backward_ms": 1.0,
        "ce": 7.0,
        "dropped": 0.01,
    }
    report = {
        "topology": "4 nodes x 2 GPUs",
        "environment": env,
        "args": {"capacity_factor": "1.0", "steps": 10, "warmup": 3, "repeats": 2},
        "results": {
            "switch": {**row, "tokens_per_s": 500.0, "tokens_per_s_runs": [490.0, 510.0]},
            "smile": {**row, "tokens_per_s": 600.0, "tokens_per_s_runs": [590.0, 610.0]},
        },
        "smile_over_switch": 1.2,
    }
    text = "\n".join(make_results.pretrain_section(report))
    assert "MTU 9000" in text and "| SMILE (bilevel + hierarchical) | 600 | 590, 610 |" in text
    assert "SMILE / Switch: **1.20x**" in text


def test_gpu_layer_profile_splits_the_step_by_kernel_category():
    from smile.moe.layer import MoELayer

    layer = MoELayer(16, 32, 4, router="topk", k=2, capacity_factor=None)
    x = torch.randn(64, 16, requires_grad=True)
    flops = 12 * 64 * 2 * 16 * 32
    prof = moe_layer_gpu_bench.profile_breakdown(lambda: layer(x)[0].sum().backward(), "cpu", flops, steps=2)
    assert set(prof["ms"]) == {"gemm", "dispatch+combine", "elementwise", "other"}
    assert prof["total_ms"] == pytest.approx(sum(prof["ms"].values()))
    assert prof["ms"]["gemm"] > 0 and prof["ms"]["dispatch+combine"] > 0
    assert prof["gemm_tflops"] == pytest.approx(flops / prof["ms"]["gemm"] / 1e9)
    assert len(prof["top"]) == 5 and all(ms >= 0 for _, ms in prof["top"])


def test_gpu_layer_times_each_expert_stage_alone():
    from smile.moe.layer import MoELayer

    layer = MoELayer(16, 32, 4, router="topk", k=2, capacity_factor=None)
    stages = moe_layer_gpu_bench.expert_stages(layer, torch.randn(64, 16), "cpu")
    assert list(stages) == ["forward", "input_grads", "weight_grads"]
    for stage in stages.values():
        assert stage["ms"] > 0
        assert stage["tflops"] == pytest.approx(4 * 64 * 2 * 16 * 32 / stage["ms"] / 1e9)


def test_gpu_layer_report_renders_every_column_and_the_limiter_lines():
    timing = {
        f"{v}_{unit}": value
        for v, ms in (
            ("torch_loop", 20.0),
            ("deepspeed_cf1.0", 16.0),
            ("smile_bmm", 12.0),
            ("smile_triton", 11.0),
            ("smile", 10.0),
        )
        for unit, value in (("ms", ms), ("tflops", 100.0 / ms))
    }
    row = {"T": 16, "d_model": 8, "d_ff": 32, "E": 4, "k": 2, "gemm": "grouped_mm", **timing}
    stages = {
        "forward": {"ms": 2.0, "tflops": 700.0},
        "input_grads": {"ms": 2.5, "tflops": 560.0},
        "weight_grads": {"ms": 4.0, "tflops": 350.0},
    }
    profiled = row | {
        "dispatch_backend": "cuda",
        "profile_smile": {
            "total_ms": 10.0,
            "ms": {"gemm": 8.0, "dispatch+combine": 1.0, "elementwise": 1.0, "other": 0.0},
            "gemm_tflops": 412.0,
            "top": [],
        },
        "expert_stages": {"smile (grouped_mm)": stages},
    }
    rep = {
        "device": "GPU X",
        "date": "2026-01-01",
        "dtype": "torch.bfloat16",
        "torch": "2.x",
        "ceiling_tflops": 790.0,
        "rows": [profiled],
    }
    text = "\n".join(make_results.gpu_layer_section(rep))
    assert "| torch loop | DeepSpeed-MoE | smile (bmm) | smile (triton) | smile (grouped_mm, auto) |" in text
    cells = "20.00 ms, 5 | 16.00 ms, 6 | 12.00 ms, 8 | 11.00 ms, 9 | 10.00 ms, 10"
    assert f"| 16, 8, 32, 4, 2 | {cells} | 2.00x | 1.60x |" in text
    assert "ran on its cuda backend" in text
    assert "gemm 8.00 ms (80%)" in text and "412 TFLOP/s inside the GEMM kernels" in text
    assert "forward 2.00 ms (700), input grads 2.50 ms (560), weight grads 4.00 ms (350)" in text
    older = "\n".join(make_results.gpu_layer_section(rep | {"rows": [row]}))
    assert "Triton backend (the CUDA extension was not built" in older and "by kernel" not in older


def test_size_parsing():
    assert [all2all_bench.parse_size(s) for s in ("16K", "64M", "1000", "1.5KB")] == [
        16384,
        64 * 2**20,
        1000,
        1536,
    ]
    with pytest.raises(ValueError, match="must be positive"):
        all2all_bench.parse_size("0")
