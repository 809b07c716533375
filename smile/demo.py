"""``smile demo``: Switch vs SMILE layers on a simulated cluster, forward+backward time and drops."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from smile.moe.layer import MoELayer
from smile.testing import run_distributed

VARIANTS = {
    "switch+flat": ("switch", "flat"),
    "switch+hierarchical": ("switch", "hierarchical"),
    "smile (bilevel+hierarchical)": ("bilevel", "hierarchical"),
}


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


def main(args: argparse.Namespace) -> int:
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
