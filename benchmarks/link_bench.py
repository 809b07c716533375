"""How much of the shaped rate the emulated cluster's links deliver, and where the rest goes.

Why: the All2All figures of RESULTS.md are judged against the link bound (bytes leaving a node
at the tbf rate). If the emulated link itself cannot be filled, a gap to that bound says nothing
about the dispatchers. This script builds one emulated cluster (``smile.sim.cluster``) and
measures, each against the shaped rate:

* ``stream x k``: k parallel TCP streams (python sockets) from node 0 to node 1, ``--stream-mib``
  in all, timed at the receiver from the first byte to the last; ``duplex``: the same from node 1
  to node 0 at the same time, as an All2All loads a link;
* ``flat`` / ``hierarchical``: the dispatch of ``smile.moe.exchange`` (counts and regroups
  included, as ``all2all_bench.py`` times it) at each ``--sizes`` per rank, non-interleaved so that
  the tc and TCP counters belong to one variant; the hierarchical inter-node hop is also given
  alone. ``flat p2p`` / ``hierarchical p2p``: the same with ``transport="p2p"`` (each hop as
  point-to-point pieces instead of one All2All call). The bytes leaving a node per dispatch are
  ``G * m * (N - 1) / N``;
* ``inter x c``: the bare inter-node hop cut into c concurrent All2Alls on separate connections.

For each row: tbf drops and overlimits (uplinks, i.e. inside the nodes' namespaces; the whole
run's downlink drops are printed at the end), TCP retransmitted segments (all nodes), the
machine's CPU busy share (/proc/stat, all jobs on the machine), the CPU time of the measured
processes and the time their threads waited runnable for a CPU, both in cores, and the 1-minute
load. Waiting cores well above zero mean the row was held back by CPU contention, not the link.

Needs root (network namespaces): ``python benchmarks/link_bench.py --nodes 2 --procs-per-node 2``.
Writes JSON to ``--out`` (default benchmarks/results/link_utilisation.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from smile.sim.cluster import IFACE, ClusterConfig, EmulatedCluster, describe_environment

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "link_utilisation.json"
_PORT = 5301

_SERVER = """
import json, os, socket, sys, threading, time
k = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(k)
print("ready", flush=True)
conns = [s.accept()[0] for _ in range(k)]
first, got, lock = [], [0] * k, threading.Lock()
def read(i, c):
    buf = bytearray(1 << 20)
    while True:
        n = c.recv_into(buf)
        if not n:
            return
        if not first:
            with lock:
                first.append(time.perf_counter())
        got[i] += n
cpu0 = time.process_time()
threads = [threading.Thread(target=read, args=(i, c)) for i, c in enumerate(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
end = time.perf_counter()
report = {"bytes": sum(got), "seconds": end - first[0], "cpu_s": time.process_time() - cpu0}
print(json.dumps(report), flush=True)
"""
_CLIENT = """
import json, socket, sys, threading, time
host, port, k, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conns = [socket.create_connection((host, port)) for _ in range(k)]
buf = memoryview(bytearray(1 << 20))
def send(c, n):
    while n > 0:
        c.sendall(buf[: min(n, len(buf))]); n -= len(buf)
    c.close()
cpu0 = time.process_time()
threads = [threading.Thread(target=send, args=(c, total // k)) for c in conns]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({"cpu_s": time.process_time() - cpu0}), flush=True)
"""


# ---- counters ------------------------------------------------------------------------------------
def _cmd(ns: str | None, *argv: str) -> str:
    argv_ = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(argv_, check=True, capture_output=True, text=True).stdout


def tbf_stats(ns: str | None, dev: str) -> dict[str, int]:
    """Sent bytes, drops, overlimits, requeues and backlog of the tbf on ``dev``."""
    text = _cmd(ns, "tc", "-s", "qdisc", "show", "dev", dev)
    sent = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+) requeues (\d+)\)", text)
    backlog = re.search(r"backlog (\d+)b", text)
    if sent is None:
        raise RuntimeError(f"no tc statistics for {dev}: {text!r}")
    keys = ("sent_bytes", "sent_pkts", "dropped", "overlimits", "requeues")
    return {
        **dict(zip(keys, map(int, sent.groups()))),
        "backlog_bytes": int(backlog.group(1)) if backlog else 0,
    }


def tcp_retrans(ns: str | None) -> int:
    """TCP segments retransmitted by the namespace's stack (TcpRetransSegs of /proc/net/snmp)."""
    lines = [
        line.split() for line in _cmd(ns, "cat", "/proc/net/snmp").splitlines() if line.startswith("Tcp:")
    ]
    return int(lines[1][lines[0].index("RetransSegs")])


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def _busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def uplink_snapshot() -> dict[str, int]:
    """This namespace's uplink tbf and TCP counters (run inside a node)."""
    return {**tbf_stats(None, IFACE), "retrans": tcp_retrans(None)}


def run_delay_s() -> float:
    """Seconds this process's threads waited for a CPU while runnable (/proc/self/task/*/schedstat)."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError):
            pass
    return total / 1e9


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("dropped", "overlimits", "retrans")}


# ---- parallel TCP streams (run from the root namespace) -----------------------------------------
def stream_row(cluster: EmulatedCluster, streams: int, total: int, duplex: bool = False) -> dict[str, Any]:
    """``streams`` TCP connections node 0 -> node 1 carrying ``total`` bytes together; with
    ``duplex`` the same from node 1 -> node 0 at the same time (as an All2All loads a link)."""
    nss = [cluster.namespace(n) for n in range(cluster.config.nodes)]
    pairs = [(0, 1), (1, 0)] if duplex else [(0, 1)]
    up0 = [tbf_stats(nss[src], IFACE) for src, _ in pairs]
    snmp0, load0, busy0 = [tcp_retrans(nss[src]) for src, _ in pairs], os.getloadavg()[0], cpu_busy()
    servers, clients = [], []
    for i, (_, dst) in enumerate(pairs):
        argv = [sys.executable, "-c", _SERVER, str(streams), str(_PORT + i)]
        srv = cluster.popen(dst, argv, stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        servers.append(srv)
    for i, (src, dst) in enumerate(pairs):
        argv = [sys.executable, "-c", _CLIENT, cluster.address(dst), str(_PORT + i), str(streams), str(total)]
        clients.append(cluster.popen(src, argv, stdout=subprocess.PIPE, text=True))
    sent = [json.loads(c.communicate(timeout=300)[0]) for c in clients]
    got = [json.loads(s.communicate(timeout=60)[0]) for s in servers]
    busy1 = cpu_busy()
    up1 = [tbf_stats(nss[src], IFACE) for src, _ in pairs]
    seconds = max(g["seconds"] for g in got)
    rate = min(g["bytes"] / g["seconds"] for g in got)
    return {
        "kind": f"stream x {streams}" + (" duplex" if duplex else ""),
        "bytes": got[0]["bytes"],
        "seconds": seconds,
        "pct_of_shaped": 100 * rate / cluster.config.rate_bytes_per_s,
        "dropped": sum(b["dropped"] - a["dropped"] for a, b in zip(up0, up1)),
        "overlimits": sum(b["overlimits"] - a["overlimits"] for a, b in zip(up0, up1)),
        "retrans": sum(tcp_retrans(nss[src]) - n for (src, _), n in zip(pairs, snmp0)),
        "machine_busy_pct": 100 * _busy_share(busy0, busy1),
        "process_cores": sum(x["cpu_s"] for x in [*sent, *got]) / seconds,
        "load_1min": [load0, os.getloadavg()[0]],
    }


# ---- All2All variants (run on every rank under torchrun) ----------------------------------------
CHUNKS = (1, 2, 4)  # concurrent pieces of the bare inter-node hop ("inter x c")


def _inter_node_groups(gpus_per_node: int, copies: int) -> list:
    """``copies`` process groups over this rank's inter-node peers (one rank per node, same local
    index): each its own set of gloo TCP connections."""
    import torch.distributed as dist

    world, me, mine = dist.get_world_size(), dist.get_rank(), []
    for _ in range(copies):
        for local in range(gpus_per_node):
            ranks = list(range(local, world, gpus_per_node))
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if me in ranks:
                mine.append(group)
    return mine


def _time_chunks(pieces: list, outs: list, groups: list) -> list[float]:
    """Seconds from a common start until ``len(pieces)`` concurrent All2Alls have all finished."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    works = [dist.all_to_all_single(o, i, group=g, async_op=True) for i, o, g in zip(pieces, outs, groups)]
    for work in works:
        work.wait()
    return [time.perf_counter() - start]


def a2a_worker(topo, cfg: dict) -> dict:
    """Time each variant at each size, one variant at a time, with this node's counters.

    ``flat``/``hierarchical`` are smile's dispatchers; ``inter x c`` is the bare inter-node hop
    (each rank's whole payload, one All2All among its peers on the other nodes) cut into ``c``
    pieces sent at once over separate connections: the same bytes on more TCP flows.
    """
    import torch
    import torch.distributed as dist
    from all2all_bench import _slowest, _time_dispatch

    from smile.moe.config import TRANSPORTS
    from smile.moe.exchange import FlatExchange, HierarchicalExchange

    w, g = topo.ep_size, topo.gpus_per_node
    n, cpu_dev = w // g, torch.device("cpu")
    leader = topo.rank % g == 0  # one rank per node reads its namespace's counters
    dispatchers = {}
    for transport in TRANSPORTS:  # rows "flat", "hierarchical", then "flat p2p", "hierarchical p2p"
        suffix = "" if transport == "collective" else f" {transport}"
        dispatchers[f"flat{suffix}"] = FlatExchange(topo, w, transport=transport)
        dispatchers[f"hierarchical{suffix}"] = HierarchicalExchange(topo, w, transport=transport)
    groups = {c: _inter_node_groups(g, c) for c in CHUNKS}
    gen = torch.Generator().manual_seed(cfg["seed"] + topo.rank)
    rows = []
    for size in cfg["sizes"]:
        per_peer = max(1, size // (4 * cfg["hidden"] * w))
        x = torch.randn(per_peer * w, cfg["hidden"], generator=gen)
        counts = torch.full((w,), per_peer, dtype=torch.int64)
        per_node = max(max(CHUNKS), size // (4 * cfg["hidden"] * n) // max(CHUNKS) * max(CHUNKS))
        blocks = x.new_empty(n, per_node, cfg["hidden"]).normal_(generator=gen)
        runs = {
            k: (lambda k=k, x=x, c=counts: _time_dispatch(dispatchers[k], x, c, cpu_dev)) for k in dispatchers
        }
        sizes = {k: per_peer * w * cfg["hidden"] * 4 for k in dispatchers}
        for c in CHUNKS:
            step = per_node // c
            pieces = [blocks[:, j * step : (j + 1) * step].contiguous() for j in range(c)]
            outs = [torch.empty_like(p) for p in pieces]
            runs[f"inter x {c}"] = lambda p=pieces, o=outs, gr=groups[c]: _time_chunks(p, o, gr)
            sizes[f"inter x {c}"] = blocks.numel() * 4
        for kind, run in runs.items():
            for _ in range(cfg["warmup"]):
                run()
            dist.barrier()
            snap0 = uplink_snapshot() if leader else None
            busy0, load0, wait0 = cpu_busy(), os.getloadavg()[0], run_delay_s()
            cpu0, t0 = time.process_time(), time.perf_counter()
            ends = [run() for _ in range(cfg["iters"])]
            wall, cpu, wait = time.perf_counter() - t0, time.process_time() - cpu0, run_delay_s() - wait0
            busy1 = cpu_busy()
            dist.barrier()
            counters = _delta(uplink_snapshot(), snap0) if leader else {}
            total = _slowest([e[-1] for e in ends], cpu_dev)
            two_hops = kind.startswith("hierarchical")
            inter = _slowest([e[1] - e[0] for e in ends], cpu_dev) if two_hops else None
            rows.append(
                {
                    "kind": kind,
                    "bytes_per_rank": sizes[kind],
                    "iters": cfg["iters"],
                    "median_s": statistics.median(total),
                    "inter_median_s": statistics.median(inter) if inter else None,
                    "counters": counters,
                    "cpu_s": cpu,
                    "run_delay_s": wait,
                    "wall_s": wall,
                    "machine_busy_pct": 100 * _busy_share(busy0, busy1),
                    "load_1min": [load0, os.getloadavg()[0]],
                }
            )
    return {"rank": topo.rank, "leader": leader, "rows": rows}


def _a2a_worker_main(args: argparse.Namespace) -> int:
    from smile.sim.cluster import run_ranks

    cfg = {"sizes": args.sizes, "hidden": 256, "iters": args.iters, "warmup": 1, "seed": args.seed}
    per_rank = run_ranks(a2a_worker, 1, 1, cfg, timeout=1800)
    if per_rank is not None:
        Path(args.worker_out).write_text(json.dumps(per_rank))
    return 0


def a2a_rows(per_rank: list[dict], config: ClusterConfig) -> list[dict[str, Any]]:
    """Merge the ranks' rows: times are the slowest rank's, counters summed over nodes, CPU over ranks."""
    n, g = config.nodes, config.procs_per_node
    out = []
    for i, row in enumerate(per_rank[0]["rows"]):
        leaving = g * row["bytes_per_rank"] * (n - 1) / n
        bound = leaving / config.rate_bytes_per_s
        counters = {
            k: sum(r["rows"][i]["counters"].get(k, 0) for r in per_rank if r["leader"])
            for k in ("dropped", "overlimits", "retrans")
        }
        merged = {
            "kind": row["kind"],
            "bytes_per_rank": row["bytes_per_rank"],
            "seconds": row["median_s"],
            "link_bound_s": bound,
            "pct_of_shaped": 100 * bound / row["median_s"],
            **counters,
            "machine_busy_pct": row["machine_busy_pct"],
            "process_cores": sum(r["rows"][i]["cpu_s"] for r in per_rank) / row["wall_s"],
            "runnable_waiting_cores": sum(r["rows"][i]["run_delay_s"] for r in per_rank) / row["wall_s"],
            "load_1min": row["load_1min"],
            "iters": row["iters"],
        }
        if row["inter_median_s"]:
            merged["inter_hop_seconds"] = row["inter_median_s"]
            merged["inter_hop_pct_of_shaped"] = 100 * bound / row["inter_median_s"]
        out.append(merged)
    return out


def _network(config: ClusterConfig) -> str:
    return (
        f"emulated: tc tbf {config.rate_mbit:g} Mbit/s per node uplink, MTU {config.mtu}, "
        "loopback inside a node"
    )


# ---- driver --------------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'what':<22} {'MiB':>6} {'ms':>9} {'% shaped':>9} {'drops':>6} {'overlim':>8} {'retrans':>8} "
        f"{'busy %':>7} {'cores':>6} {'waitc':>6} {'load':>5}"
    ]
    for r in rows:
        size = r.get("bytes_per_rank", r.get("bytes", 0)) / 2**20
        label = r["kind"] + (" /rank" if "bytes_per_rank" in r else "")
        lines.append(
            f"{label:<22} {size:6.1f} {1e3 * r['seconds']:9.1f} {r['pct_of_shaped']:8.1f}% {r['dropped']:>6} "
            f"{r['overlimits']:>8} {r['retrans']:>8} {r['machine_busy_pct']:6.0f}% {r['process_cores']:6.2f} "
            f"{r.get('runnable_waiting_cores', float('nan')):6.2f} "
            f"{r['load_1min'][0]:5.1f}"
        )
        if "inter_hop_pct_of_shaped" in r:
            lines.append(
                f"{'  inter-node hop':<22} {'':>6} {1e3 * r['inter_hop_seconds']:9.1f} "
                f"{r['inter_hop_pct_of_shaped']:8.1f}%"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--procs-per-node", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=200.0)
    parser.add_argument("--mtu", type=int, default=ClusterConfig.mtu)
    parser.add_argument("--streams", default="1,2,4,8", help="parallel TCP stream counts, comma separated")
    parser.add_argument(
        "--stream-mib", type=int, default=32, help="bytes of each stream test, all streams together"
    )
    parser.add_argument("--sizes", default="1M,4M,16M", help="All2All bytes per rank (empty: skip)")
    parser.add_argument("--iters", type=int, default=5, help="timed dispatches per size and variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sysctl",
        action="append",
        default=[],
        help="KEY=VALUE set in every node's namespace (a setting under test)",
    )
    parser.add_argument(
        "--tbf-latency-ms", type=float, default=ClusterConfig.tbf_latency_ms, help="tbf queue, in time"
    )
    parser.add_argument(
        "--gso-max-size", type=int, help="cap every uplink's GSO packets (a setting under test)"
    )
    parser.add_argument("--burst-bytes", type=int, help="replace every tbf's bucket (a setting under test)")
    parser.add_argument("--label", default="", help="stored with the run (e.g. the setting under test)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report; runs are appended to its list")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [_size(s) for s in args.sizes.split(",") if s]
    if args.worker_out:
        return _a2a_worker_main(args)

    config = ClusterConfig(
        nodes=args.nodes,
        procs_per_node=args.procs_per_node,
        rate_mbit=args.rate_mbit,
        mtu=args.mtu,
        tbf_latency_ms=args.tbf_latency_ms,
    )
    started, load_start = time.monotonic(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    with EmulatedCluster(config) as cluster, tempfile.TemporaryDirectory() as tmp:
        hosts = [f"smv{cluster.tag}h{n}" for n in range(config.nodes)]
        for n in range(config.nodes):
            for setting in args.sysctl:
                _cmd(cluster.namespace(n), "sysctl", "-q", "-w", setting)
            if args.gso_max_size:
                _cmd(
                    None,
                    "ip",
                    "-n",
                    cluster.namespace(n),
                    "link",
                    "set",
                    IFACE,
                    "gso_max_size",
                    str(args.gso_max_size),
                )
            if args.burst_bytes:
                for ns, dev in ((cluster.namespace(n), IFACE), (None, hosts[n])):
                    _cmd(
                        ns,
                        "tc",
                        "qdisc",
                        "change",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{config.rate_mbit}mbit",
                        "burst",
                        str(args.burst_bytes),
                        "latency",
                        f"{config.tbf_latency_ms}ms",
                    )
        down0 = [tbf_stats(None, h)["dropped"] for h in hosts]
        for duplex in (False, True):
            for k in [int(s) for s in args.streams.split(",") if s]:
                rows.append(stream_row(cluster, k, args.stream_mib * 2**20, duplex))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if args.sizes:
            worker_out = Path(tmp) / "a2a.json"
            argv_ = [
                __file__,
                "--worker-out",
                str(worker_out),
                "--sizes",
                ",".join(map(str, args.sizes)),
                "--iters",
                str(args.iters),
                "--seed",
                str(args.seed),
            ]
            if cluster.run(argv_, timeout=1800) != 0:
                raise SystemExit("the All2All workers failed")
            rows += a2a_rows(json.loads(worker_out.read_text()), config)
        downlink_drops = sum(tbf_stats(None, h)["dropped"] for h in hosts) - sum(down0)
        qdisc = _cmd(cluster.namespace(0), "tc", "qdisc", "show", "dev", IFACE).strip()
    env = describe_environment("gloo")
    env.update(loadavg_start=list(load_start), wall_s=time.monotonic() - started, qdisc=qdisc)
    env["network"] = _network(config)
    run = {
        "label": args.label,
        "config": {
            "nodes": config.nodes,
            "procs_per_node": config.procs_per_node,
            "rate_mbit": config.rate_mbit,
            "mtu": config.mtu,
            "tbf_burst_bytes": config.tbf_burst_bytes,
            "tbf_latency_ms": config.tbf_latency_ms,
            "stream_mib": args.stream_mib,
            "iters": args.iters,
            "seed": args.seed,
            "sysctl": args.sysctl,
            "gso_max_size": args.gso_max_size,
            "burst_bytes": args.burst_bytes,
        },
        "environment": env,
        "downlink_drops": downlink_drops,
        "rows": rows,
    }
    print(
        f"\n{config.nodes} nodes x {config.procs_per_node} ranks, tbf {config.rate_mbit:g} Mbit/s, "
        f"MTU {config.mtu}; uplink qdisc: {qdisc}"
    )
    print(format_table(rows))
    print(
        f"downlink tbf drops over the whole run: {downlink_drops}; "
        f"load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "link_utilisation", "runs": [*runs, run]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
