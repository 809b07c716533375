"""``smile simulate`` (cost-model projection table) and ``smile cluster`` (emulated multi-node runs).

Both subcommands live here; argparse names the sub-parser ``smile <command>``, which is how
:func:`add_arguments` tells them apart, and ``args.command`` does the same for :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys

from smile.sim import cost_model as cm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.split()[-1] == "cluster":
        _cluster_arguments(parser)
    else:
        _simulate_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return _cluster(args) if args.command == "cluster" else _simulate(args)


# ---- smile simulate -----------------------------------------------------------------------------
def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        action="append",
        choices=sorted(cm.PRESETS),
        help="cluster preset (repeatable; default: all presets)",
    )
    parser.add_argument(
        "--fit", help="also project a fitted cluster from this JSON (benchmarks/make_results.py)"
    )
    parser.add_argument("--nodes", default="1,2,4,8,16,32,64,128,256", help="node counts, comma separated")
    parser.add_argument("--tokens", type=int, default=cm.MoEWorkload.tokens_per_gpu, help="tokens per GPU")
    parser.add_argument("--d-model", type=int, default=cm.MoEWorkload.d_model)
    parser.add_argument("--d-ff", type=int, default=cm.MoEWorkload.d_ff)
    parser.add_argument("--experts-per-gpu", type=int, default=cm.MoEWorkload.experts_per_gpu)
    parser.add_argument("--k", type=int, default=cm.MoEWorkload.k)
    parser.add_argument("--capacity-factor", type=float, default=cm.MoEWorkload.capacity_factor)
    parser.add_argument("--bytes-per-element", type=int, default=cm.MoEWorkload.bytes_per_element)
    parser.add_argument("--plot", help="write the speedup plot (PNG) here")
    parser.add_argument("--json", help="write the tables (JSON) here")


def load_fitted(path: str) -> cm.ClusterSpec:
    """The fitted cluster stored by benchmarks/make_results.py."""
    with open(path) as fh:
        data = json.load(fh)
    if "spec" not in data:
        raise ValueError(
            f"{path} has no 'spec' entry (expected the JSON written by benchmarks/make_results.py)"
        )
    return cm.ClusterSpec.from_dict(data["spec"])


def format_projection(spec: cm.ClusterSpec, rows: list[dict]) -> str:
    lines = [
        f"{spec.name}: {spec.gpus_per_node} GPUs/node",
        f"{'nodes':>6} {'GPUs':>6} {'MB/rank':>8} {'flat ms':>9} {'hier ms':>9} "
        f"{'Switch ms':>10} {'SMILE ms':>9} {'speedup':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['nodes']:>6} {r['gpus']:>6} {r['bytes_per_rank'] / 2**20:8.2f} {r['flat_ms']:9.3f} "
            f"{r['hierarchical_ms']:9.3f} {r['switch_step_ms']:10.3f} {r['smile_step_ms']:9.3f} "
            f"{r['speedup']:7.2f}x"
        )
    return "\n".join(lines)


def _simulate(args: argparse.Namespace) -> int:
    workload = cm.MoEWorkload(
        tokens_per_gpu=args.tokens,
        d_model=args.d_model,
        d_ff=args.d_ff,
        experts_per_gpu=args.experts_per_gpu,
        k=args.k,
        capacity_factor=args.capacity_factor,
        bytes_per_element=args.bytes_per_element,
    )
    nodes = [int(n) for n in args.nodes.split(",")]
    specs = [cm.preset(name) for name in (args.preset or cm.PRESETS)]
    if args.fit:
        specs.append(load_fitted(args.fit))
    print(
        f"One MoE layer, forward+backward per GPU: {workload.tokens_per_gpu} tokens, d_model "
        f"{workload.d_model}, d_ff {workload.d_ff}, {workload.experts_per_gpu} expert(s)/GPU, "
        f"top-{workload.k}, capacity factor {workload.capacity_factor}, "
        f"{workload.bytes_per_element}-byte payload. "
        "Switch = top-1 router + flat All2All; SMILE = bi-level router + hierarchical All2All."
    )
    curves = {}
    for spec in specs:
        rows = cm.projection(spec, workload, nodes)
        curves[spec.name] = rows
        print()
        print(format_projection(spec, rows))
    if args.plot:
        cm.plot_projection(curves, args.plot)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"workload": vars(workload), "projections": curves}, fh, indent=1)
    return 0


# ---- smile cluster ------------------------------------------------------------------------------
def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from smile.sim.cluster import ClusterConfig

    defaults = ClusterConfig()
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help="network namespaces (nodes)")
    parser.add_argument(
        "--procs-per-node", type=int, default=defaults.procs_per_node, help="torchrun processes per node"
    )
    parser.add_argument(
        "--rate-mbit", type=float, default=defaults.rate_mbit, help="per-node uplink rate (tc tbf)"
    )
    parser.add_argument(
        "--mtu",
        type=int,
        default=defaults.mtu,
        help="MTU of every emulated link (default: jumbo frames, as training clusters use; 1500: a LAN)",
    )
    parser.add_argument("--subnet", default=defaults.subnet, help="first three octets of the nodes' /24")
    parser.add_argument("--master-port", type=int, default=defaults.master_port)
    parser.add_argument(
        "--raw", action="store_true", help="run the command as is on every node, not under torchrun"
    )
    parser.add_argument("--timeout", type=float, help="stop everything after this many seconds")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="remove namespaces left by killed runs (their creator is gone) and exit",
    )
    parser.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        help="after --: a script and its arguments for torchrun (e.g. benchmarks/all2all_bench.py "
        "--out a.json), or `-m module ...`; with --raw any command",
    )


def _cluster(args: argparse.Namespace) -> int:
    from smile.sim.cluster import (
        ClusterConfig,
        ClusterError,
        EmulatedCluster,
        cleanup_stale,
        raise_on_sigterm,
    )

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        if args.cleanup:
            removed = cleanup_stale()
            print(f"removed {', '.join(removed)}" if removed else "nothing to remove")
            return 0
        if not cmd:
            print("smile cluster: give the command to run after --", file=sys.stderr)
            return 2
        config = ClusterConfig(
            nodes=args.nodes,
            procs_per_node=args.procs_per_node,
            rate_mbit=args.rate_mbit,
            mtu=args.mtu,
            subnet=args.subnet,
            master_port=args.master_port,
        )
        raise_on_sigterm()
        with EmulatedCluster(config) as cluster:
            print(
                f"smile cluster: {config.nodes} namespaces x {config.procs_per_node} processes, "
                f"{config.rate_mbit:g} Mbit/s tbf per node uplink, MTU {config.mtu}, nodes at "
                f"{cluster.address(0)}..{cluster.address(config.nodes - 1)}",
                flush=True,
            )
            code = cluster.run(cmd, torchrun=not args.raw, timeout=args.timeout)
        print(f"smile cluster: exit code {code}; namespaces removed", flush=True)
        return code
    except ClusterError as err:
        print(f"smile cluster: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smile cluster: interrupted; processes stopped and namespaces removed", file=sys.stderr)
        return 130
