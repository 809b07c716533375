"""``smile demo``: Switch vs SMILE layers on a simulated cluster, forward+backward time and drops."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from smile.moe.config import MoEConfig
from smile.moe.layer import MoELayer
from smile.moe.topology import Topology
from smile.testing import run_distributed

VARIANTS = {
    "switch+flat": ("switch", "flat"),
    "switch+hierarchical": ("switch", "hierarchical"),
    "smile (bilevel+hierarchical)": ("bilevel", "hierarchical"),
}


# Bounds of the integer options (inclusive): one machine simulates the cluster, so a world of
# thousands of processes or a layer of billions of weights is a typo, refused before any process starts.
LIMITS = {
    "nodes": (1, 64),
    "gpus_per_node": (1, 64),
    "tokens": (1, 1 << 20),
    "d_model": (1, 1 << 16),
    "d_ff": (1, 1 << 16),
    "experts_per_rank": (1, 1024),
    "iters": (1, 100_000),
}
MAX_WORLD = 256  # nodes x gpus_per_node processes
MAX_EXPERT_WEIGHTS = 1 << 31  # experts x d_model x d_ff x 2 over the whole simulated cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes")
    parser.add_argument("--gpus-per-node", type=int, default=2, help="simulated GPUs (processes) per node")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="0 means dropless")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up)")
    parser.add_argument("--json", help="also write the results to this JSON file")


def demo_worker(topo, args: dict) -> dict[str, dict[str, float]]:
    cf = args["capacity_factor"] or None
    results = {}
    for name, (router, dispatcher) in VARIANTS.items():
        torch.manual_seed(0)
        layer = MoELayer(
            args["d_model"],
            args["d_ff"],
            args["experts_per_rank"] * topo.ep_size,
            router=router,
            dispatcher=dispatcher,
            capacity_factor=cf,
            topology=topo,
        )
        x = torch.randn(args["tokens"], args["d_model"], requires_grad=True)
        times, drops = [], []
        for i in range(args["iters"] + 2):
            torch.distributed.barrier()
            start = time.perf_counter()
            out, aux = layer(x)
            (out.square().mean() + aux).backward()
            torch.distributed.barrier()
            if i >= 2:
                times.append(time.perf_counter() - start)
                drops.append(layer.last_stats.dropped_fraction)
        results[name] = {"ms": 1e3 * statistics.median(times), "dropped": statistics.mean(drops)}
    return results


def check_arguments(args: argparse.Namespace) -> None:
    """Every option in range before any process starts; a ValueError names the option."""
    for name, (low, high) in LIMITS.items():
        value = getattr(args, name)
        if not low <= value <= high:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} must be in [{low}, {high}], got {value}")
    world = args.nodes * args.gpus_per_node
    if world > MAX_WORLD:
        raise ValueError(
            f"--nodes x --gpus-per-node = {world} processes; at most {MAX_WORLD} are simulated on one machine"
        )
    weights = args.experts_per_rank * world * args.d_model * args.d_ff * 2
    if weights > MAX_EXPERT_WEIGHTS:
        raise ValueError(
            f"--experts-per-rank x processes x --d-model x --d-ff x 2 = {weights} expert weights; "
            f"at most {MAX_EXPERT_WEIGHTS}"
        )
    cf = args.capacity_factor
    if not math.isfinite(cf) or cf < 0:
        raise ValueError(f"--capacity-factor must be a finite number >= 0 (0: dropless), got {cf}")
    topology = Topology(args.nodes, args.gpus_per_node, 0)
    for router, dispatcher in VARIANTS.values():
        config = MoEConfig(
            num_experts=args.experts_per_rank * world,
            d_model=args.d_model,
            d_ff=args.d_ff,
            router=router,
            dispatcher=dispatcher,
            capacity_factor=cf or None,
        )
        config.validate("demo")
        config.check_topology(topology, "demo")
    if args.json:
        out = Path(args.json)
        if out.is_dir():
            raise ValueError(f"--json {args.json!r} is a directory; give a file path")
        if not out.parent.is_dir():
            raise ValueError(f"--json {args.json!r}: directory {str(out.parent)!r} does not exist")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    world = args.nodes * args.gpus_per_node
    print(
        f"smile demo: {args.nodes} nodes x {args.gpus_per_node} GPUs simulated by {world} gloo processes, "
        f"{args.tokens} tokens/rank, d_model {args.d_model}, d_ff {args.d_ff}, "
        f"{args.experts_per_rank * world} experts, capacity factor {args.capacity_factor or 'dropless'}"
    )
    per_rank = run_distributed(demo_worker, args.nodes, args.gpus_per_node, vars(args), timeout=600)
    rows = {}
    for name in VARIANTS:
        ms = max(r[name]["ms"] for r in per_rank)  # a step ends when the slowest rank does
        dropped = statistics.mean(r[name]["dropped"] for r in per_rank)
        rows[name] = {"fwd_bwd_ms": ms, "tokens_per_s": world * args.tokens / ms * 1e3, "dropped": dropped}
    print(f"{'layer':32} {'fwd+bwd ms':>11} {'tokens/s':>10} {'dropped':>8}")
    for name, row in rows.items():
        print(f"{name:32} {row['fwd_bwd_ms']:11.1f} {row['tokens_per_s']:10.0f} {row['dropped']:8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": rows}, f, indent=2)
    return 0
