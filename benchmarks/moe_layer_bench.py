"""MoE layers side by side: forward+backward tokens/s of Switch, SMILE and DeepSpeed-MoE.

Variants (same d_model, d_ff, experts, tokens, top-1, capacity factor, fp32, one run):
  switch+flat           smile.MoELayer(router="switch", dispatcher="flat")        (Switch baseline)
  switch+hierarchical   smile.MoELayer(router="switch", dispatcher="hierarchical")
  smile                 smile.MoELayer(router="bilevel", dispatcher="hierarchical") (the paper's pairing)
  deepspeed             deepspeed.moe.layer.MoE(ep_size=world, k=1), its own gate and All2All;
                        set_deepspeed_parallelism() is called directly (no deepspeed.initialize)
Every lever composes with either router: ``<router>+<lever>+<lever>...`` (``--variants``), router
``switch`` (top-1, flat by default) or ``smile`` (bilevel, two hops by default), each lever
changing one thing, so every comparison can hold the levers equal (``switch+pipelined`` vs
``smile+pipelined``):
  dropless              capacity_factor=None: nothing is dropped
  flat / hierarchical   the one-hop flat All2All / the two hops (inter-node, then intra-node)
  pipelined             tokens in ``--chunks`` chunks whose All2Alls overlap each other and the
                        expert compute (bit-identical results)
  bf16                  All2All payloads sent as bf16 (dispatch and combine; lossy)
  fp8                   dispatch payload fp8 e4m3 with a per-token scale, combine bf16 (lossy)
  p2p                   each hop as point-to-point pieces instead of one All2All call
                        (``transport="p2p"``; bit-identical results)
Every smile layer sends only kept rows (never capacity padding) and exchanges counts first.

Iterations are interleaved across variants so machine load hits all of them alike. A step ends
when its slowest rank ends: each iteration's time is the maximum over ranks, and tokens/s is
``world * tokens / median``. Prints every variant / DeepSpeed and each SMILE variant / the
Switch variant with the same levers.

On an emulated cluster (``smile cluster``) each node's uplink byte counter is read around every
step: the report gives the bytes each variant put on the busiest uplink per step and the
link-bound time those bytes need at the shaped rate, i.e. how close a step comes to the link.
Every report also gives the share of the whole machine's CPU time that was busy during the
median step (``/proc/stat``): near 100%, the host's cores, not the link, bound the step; and the
CPU time the ranks themselves spent in a step (summed over ranks, all their threads), which
other jobs on a shared machine inflate far less than the wall time.

Run like benchmarks/all2all_bench.py: simulated (``--nodes --gpus-per-node``), under
``smile cluster ... -- benchmarks/moe_layer_bench.py``, or under torchrun on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from smile.moe import MoELayer
from smile.moe.config import AUTO_CHUNKS, COUNT_EXCHANGES
from smile.sim.cluster import report_layout, run_ranks

VARIANTS = ("switch+flat", "switch+hierarchical", "smile", "deepspeed")
LEVERS: dict[str, dict] = {
    "dropless": {"capacity_factor": None},
    "flat": {"dispatcher": "flat"},
    "hierarchical": {"dispatcher": "hierarchical"},
    "pipelined": {},  # chunks: set from --chunks
    "bf16": {"dispatch_payload": "bf16", "combine_payload": "bf16"},
    "fp8": {"dispatch_payload": "fp8", "combine_payload": "bf16"},
    "p2p": {"transport": "p2p"},
}
ROUTERS: dict[str, dict] = {
    "switch": {"router": "switch", "dispatcher": "flat"},
    "smile": {"router": "bilevel", "dispatcher": "hierarchical"},
}
_EXCLUSIVE = ({"bf16", "fp8"}, {"flat", "hierarchical"})


def layer_options(name: str, cfg: dict) -> dict:
    """MoELayer options of a variant name: a router (``switch``, ``smile``) and ``+lever`` parts."""
    base, *levers = name.split("+")
    unknown = [lever for lever in levers if lever not in LEVERS]
    repeated = len(set(levers)) != len(levers)
    if base not in ROUTERS or unknown or repeated or any(pair <= set(levers) for pair in _EXCLUSIVE):
        raise ValueError(
            f"variant {name!r} unknown; allowed: deepspeed, or <router>+<lever>... with router "
            f"{' or '.join(ROUTERS)} and distinct levers from {', '.join(LEVERS)} "
            "(bf16 or fp8, flat or hierarchical, not both)"
        )
    options = {
        "capacity_factor": cfg["capacity_factor"],
        "chunks": 1,
        "count_exchange": cfg["count_exchange"],
    }
    options.update(ROUTERS[base])
    for lever in levers:
        options.update(LEVERS[lever])
    if "pipelined" in levers:
        options["chunks"] = cfg["chunks"]
    return options


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _DeepSpeedAdapter(nn.Module):
    """deepspeed.moe.layer.MoE behind smile's ``(out, aux) = layer(x)`` signature."""

    def __init__(self, topo, cfg: dict) -> None:
        super().__init__()
        import deepspeed
        from deepspeed.moe.layer import MoE

        deepspeed.init_distributed(dist_backend=dist.get_backend())
        d, dff = cfg["d_model"], cfg["d_ff"]
        expert = nn.Sequential(nn.Linear(d, dff, bias=False), nn.GELU(), nn.Linear(dff, d, bias=False))
        cf = cfg["capacity_factor"]
        self.moe = MoE(
            d,
            expert,
            num_experts=cfg["experts_per_rank"] * topo.ep_size,
            ep_size=topo.ep_size,
            k=1,
            capacity_factor=cf,
            eval_capacity_factor=cf,
        )
        self.moe.set_deepspeed_parallelism()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, aux, _ = self.moe(x)
        return out, aux


def build_layer(name: str, topo, cfg: dict) -> nn.Module:
    if name == "deepspeed":
        return _DeepSpeedAdapter(topo, cfg)
    options = layer_options(name, cfg)  # top-1 everywhere: switch's k and bilevel's k_node x k_gpu are 1
    experts = cfg["experts_per_rank"] * topo.ep_size
    return MoELayer(cfg["d_model"], cfg["d_ff"], experts, topology=topo, **options)


def _uplink_counter() -> Path | None:
    """This node's uplink transmit counter on an emulated cluster (the namespace's one non-loopback link)."""
    if not os.environ.get("SMILE_CLUSTER_RATE_MBIT"):
        return None
    links = sorted(p for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    return links[0] / "statistics" / "tx_bytes" if links else None


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat ((0, 0) elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _step(
    layer: nn.Module, x: torch.Tensor, device: torch.device, uplink: Path | None
) -> tuple[float, int, float, float]:
    """(seconds of one fwd+bwd step, bytes this node's uplink sent during it (0 without one),
    fraction of the machine's CPU time busy during it, CPU seconds this process spent in it)."""
    layer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    sent = int(uplink.read_text()) if uplink else 0
    busy, total = _cpu_ticks()
    start, own_cpu = time.perf_counter(), time.process_time()
    out, aux = layer(x)
    (out.float().square().mean() + aux).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, own_cpu = time.perf_counter() - start, time.process_time() - own_cpu
    busy_after, total_after = _cpu_ticks()
    cpu_busy = (busy_after - busy) / (total_after - total) if total_after > total else float("nan")
    if uplink:
        dist.barrier()  # every rank of the node has sent its part of the step
        sent = int(uplink.read_text()) - sent
    return seconds, sent, cpu_busy, own_cpu


def moe_layer_worker(topo, cfg: dict) -> dict:
    """Build every variant on this rank, then time interleaved fwd+bwd steps."""
    device = _device()
    layers = {}
    for name in cfg["variants"]:
        torch.manual_seed(0)
        layers[name] = build_layer(name, topo, cfg).to(device)
    gen = torch.Generator().manual_seed(1000 + topo.rank)
    x = torch.randn(cfg["tokens"], cfg["d_model"], generator=gen).to(device).requires_grad_()
    samples: dict[str, list[float]] = {name: [] for name in layers}
    uplink_bytes: dict[str, list[float]] = {name: [] for name in layers}
    cpu_busy: dict[str, list[float]] = {name: [] for name in layers}
    dropped: dict[str, list[float]] = {name: [] for name in layers}
    rank_cpu: dict[str, list[float]] = {name: [] for name in layers}
    uplink = _uplink_counter()
    for i in range(cfg["warmup"] + cfg["iters"]):
        for name, layer in layers.items():
            x.grad = None
            t, sent, busy, own_cpu = _step(layer, x, device, uplink)
            if i >= cfg["warmup"]:
                samples[name].append(t)
                rank_cpu[name].append(own_cpu)
                uplink_bytes[name].append(sent)
                cpu_busy[name].append(busy)
                stats = getattr(layer, "last_stats", None)
                if stats is not None:
                    dropped[name].append(stats.dropped_fraction)
    result = {}
    for name, times in samples.items():
        slow = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(slow, op=dist.ReduceOp.MAX)
        ranks_cpu = torch.tensor(rank_cpu[name], dtype=torch.float64, device=device)
        dist.all_reduce(ranks_cpu)
        busiest = torch.tensor([statistics.median(uplink_bytes[name])], dtype=torch.float64, device=device)
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        result[name] = {
            "samples_s": slow.tolist(),
            "rank_cpu_s": ranks_cpu.tolist(),
            "uplink_bytes": float(busiest) if uplink else None,
            "cpu_busy": statistics.median(cpu_busy[name]),
            "dropped": statistics.mean(dropped[name]) if dropped[name] else None,
        }
    return result


def summarize(per_rank: list[dict], cfg: dict, world: int, rate_mbit: float | None) -> dict[str, dict]:
    rows = {}
    for name in cfg["variants"]:
        slow = per_rank[0][name]["samples_s"]  # already the max over ranks
        drops = [r[name]["dropped"] for r in per_rank if r[name]["dropped"] is not None]
        median = statistics.median(slow)
        sent = per_rank[0][name]["uplink_bytes"]  # busiest node's uplink, median step
        bound = 8 * sent / (rate_mbit * 1e6) if sent is not None and rate_mbit else None
        rows[name] = {
            "uplink_mb": None if sent is None else sent / 1e6,
            "link_bound_ms": None if bound is None else 1e3 * bound,
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(slow),
            "max_ms": 1e3 * max(slow),
            "tokens_per_s": world * cfg["tokens"] / median,
            "dropped": statistics.mean(drops) if drops else None,
            "cpu_busy": per_rank[0][name]["cpu_busy"],
            "rank_cpu_ms": 1e3 * statistics.median(per_rank[0][name]["rank_cpu_s"]),
            "samples_s": slow,
        }
    return rows


def switch_twin(name: str, rows: dict[str, dict]) -> str | None:
    """The Switch variant with the same levers as SMILE variant ``name`` (like for like), if run."""
    base, *levers = name.split("+")
    if base != "smile":
        return None
    rest = [lever for lever in levers if lever != "flat"]  # Switch is flat unless told otherwise
    candidates = ["+".join(["switch", *spelling]) for spelling in (levers, ["flat", *rest], rest)]
    return next((c for c in candidates if c in rows), None)


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """Every variant against DeepSpeed-MoE, and each SMILE variant against Switch with the same levers."""
    pairs = [(name, "deepspeed") for name in rows if name != "deepspeed"]
    pairs += [(name, twin) for name in rows if (twin := switch_twin(name, rows))]
    return {
        f"{a} / {b}": rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
        for a, b in pairs
        if a in rows and b in rows
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (ignored under torchrun)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=2, help="simulated ranks per node (ignored under torchrun)"
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts-per-rank", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument(
        "--chunks", type=int, default=AUTO_CHUNKS, help="pipeline depth of the smile+pipelined variants"
    )
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma separated: {', '.join(VARIANTS)}, or smile+<lever>... with levers {', '.join(LEVERS)}",
    )
    parser.add_argument(
        "--count-exchange",
        default="per_hop",
        choices=COUNT_EXCHANGES,
        help="how two hops exchange row counts",
    )
    parser.add_argument("--out", help="write the JSON report here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = {
        k: getattr(args, k)
        for k in (
            "tokens",
            "d_model",
            "d_ff",
            "experts_per_rank",
            "capacity_factor",
            "chunks",
            "count_exchange",
            "iters",
            "warmup",
        )
    }
    cfg["variants"] = [v.strip() for v in args.variants.split(",")]
    for name in cfg["variants"]:
        if name != "deepspeed":
            try:
                layer_options(name, cfg)
            except ValueError as err:
                parser.error(f"--variants: {err}")
    load_start = os.getloadavg()
    per_rank = run_ranks(moe_layer_worker, args.nodes, args.gpus_per_node, cfg, timeout=3600)
    if per_rank is None:  # not rank 0 of a torchrun job
        return 0
    world = len(per_rank)
    layout, env = report_layout(world, args.gpus_per_node, load_start)
    backend = env["backend"]
    rate = os.environ.get("SMILE_CLUSTER_RATE_MBIT")
    rows = summarize(per_rank, cfg, world, float(rate) if rate else None)
    report = {
        "benchmark": "moe_layer",
        "config": {**cfg, **layout},
        "environment": env,
        "results": rows,
        "ratios": ratios(rows),
    }
    print(
        f"MoE layer fwd+bwd, {env['layout']} ({backend}), {cfg['tokens']} tokens/rank, "
        f"d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, {cfg['experts_per_rank'] * world} experts, "
        f"top-1, cf {cfg['capacity_factor']}, {cfg['chunks']} chunks when pipelined; "
        f"{env['network']}"
    )
    print(
        f"{'variant':22} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'tokens/s':>10} {'dropped':>8} "
        f"{'uplink MB':>10} {'link ms':>8} {'link/step':>9} {'CPU busy':>8} {'rank CPU ms':>11}"
    )
    for name, r in rows.items():
        drop = "-" if r["dropped"] is None else f"{r['dropped']:.1%}"
        link = (
            f"{r['uplink_mb']:10.2f} {r['link_bound_ms']:8.1f} {r['link_bound_ms'] / r['median_ms']:9.0%}"
            if r["link_bound_ms"] is not None
            else f"{'-':>10} {'-':>8} {'-':>9}"
        )
        print(
            f"{name:22} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['max_ms']:9.1f} "
            f"{r['tokens_per_s']:10.0f} {drop:>8} {link} {r['cpu_busy']:8.0%} {r['rank_cpu_ms']:11.1f}"
        )
    for label, value in report["ratios"].items():
        print(f"tokens/s ratio {label}: {value:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
