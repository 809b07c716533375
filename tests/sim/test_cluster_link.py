"""The emulated link's tbf: a bucket that passes whole GSO packets, a queue that does not drop."""

from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks import link_bench
from smile.sim import cluster as cl
from tests.sim.test_sim import _netns_unavailable


def test_tbf_bucket_holds_a_gso_packet_and_queue_holds_a_second_of_line_rate():
    cfg = cl.ClusterConfig(rate_mbit=200, mtu=9000)
    # smaller than a GSO packet, tbf would cut every packet in software (a NIC's TSO work)
    assert cfg.tbf_burst_bytes >= cl.GSO_MAX_BYTES + cfg.mtu
    assert cl.ClusterConfig(rate_mbit=10_000).tbf_burst_bytes == int(10_000e6 / 8 * 2e-3)  # 2 ms
    assert cfg.tbf_latency_ms >= 1000  # 100 ms dropped frames in a 4 x 2 All2All
    assert cfg.tbf_limit_bytes == int(cfg.rate_bytes_per_s * cfg.tbf_latency_ms / 1e3) + cfg.tbf_burst_bytes
    assert cl.ClusterConfig(rate_mbit=1e6).tbf_limit_bytes == 2**32 - 1  # tc's u32
    with pytest.raises(ValueError, match="ClusterConfig.tbf_latency_ms"):
        cl.ClusterConfig(tbf_latency_ms=0)


def test_link_bench_merges_ranks_into_shares_of_the_shaped_rate():
    cfg = cl.ClusterConfig(nodes=2, procs_per_node=2, rate_mbit=200)
    bound = 2 * 2**20 * (2 - 1) / 2 / cfg.rate_bytes_per_s  # G m (N-1)/N bytes leave a node
    row = {
        "kind": "hierarchical",
        "bytes_per_rank": 2**20,
        "iters": 3,
        "median_s": 2 * bound,
        "inter_median_s": bound,
        "cpu_s": 0.5,
        "run_delay_s": 0.25,
        "wall_s": 1.0,
        "machine_busy_pct": 50.0,
        "load_1min": [1.0, 1.0],
    }
    ranks = [
        {
            "leader": rank % 2 == 0,
            "rows": [{**row, "counters": {"dropped": 1, "overlimits": 2, "retrans": 3}}],
        }
        for rank in range(4)
    ]
    (merged,) = link_bench.a2a_rows(ranks, cfg)
    assert merged["pct_of_shaped"] == pytest.approx(50.0)
    assert merged["inter_hop_pct_of_shaped"] == pytest.approx(100.0)
    assert (merged["dropped"], merged["overlimits"], merged["retrans"]) == (2, 4, 6)  # one reader per node
    assert merged["process_cores"] == pytest.approx(2.0) and merged[
        "runnable_waiting_cores"
    ] == pytest.approx(1.0)
    assert "inter-node hop" in link_bench.format_table([merged])


@pytest.mark.slow
def test_emulated_link_uses_the_bucket_and_queue_and_fills_the_shaped_rate():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    config = cl.ClusterConfig(nodes=2, procs_per_node=1, rate_mbit=200)
    with cl.EmulatedCluster(config) as cluster:
        for ns, dev in ((cluster.namespace(1), cl.IFACE), (None, f"smv{cluster.tag}h1")):
            cmd = ["tc", "-raw", "qdisc", "show", "dev", dev]
            shown = subprocess.run(
                ["ip", "netns", "exec", ns, *cmd] if ns else cmd, capture_output=True, text=True
            )
            burst = re.search(r"burst (\d+)b", shown.stdout)
            assert burst and abs(int(burst.group(1)) - config.tbf_burst_bytes) < 64, (
                shown.stdout
            )  # tc's tick rounding
            assert f"limit {config.tbf_limit_bytes}b" in shown.stdout
        row = link_bench.stream_row(cluster, 2, 8 * 2**20)
    assert row["dropped"] == 0
    assert 80 < row["pct_of_shaped"] < 115, row
