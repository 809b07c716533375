"""Flat vs hierarchical All2All, as the MoE layer runs them (smile.moe.exchange dispatchers).

For each message size (bytes each rank sends, spread evenly over every rank's one expert) it
times ``dispatch`` of both dispatchers, count exchanges and regroup copies included,
interleaving the two so machine load hits both alike. A step ends when its slowest rank ends:
every iteration's time is the maximum over ranks; the figure is the median over iterations.
Each dispatch is also split into its stages (the count exchanges, then every hop with its
regroup) along the critical path: stage i lasts from the moment the slowest rank ended stage
i-1 to the moment the slowest rank ended stage i (medians), so the stages add up to the total and
a hop that waits for a slower peer's previous hop is charged that wait.
Before timing, the two dispatchers' outputs are checked to be identical.

* gloo/CPU: ``python benchmarks/all2all_bench.py --nodes 2 --gpus-per-node 2`` (simulated on one
  machine, unshaped), or under ``smile cluster ... -- benchmarks/all2all_bench.py`` (emulated
  nodes with shaped uplinks).
* NCCL/GPU: the same script under torchrun on GPU nodes (one process per GPU).

Writes JSON (``--out``) and a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from smile.moe.config import COUNT_EXCHANGES
from smile.moe.exchange import FlatExchange, HierarchicalExchange
from smile.sim.cluster import report_layout, run_ranks

KINDS = ("flat", "hierarchical")
STAGES = {"flat": ("counts", "all2all"), "hierarchical": ("counts", "inter", "intra")}
DEFAULT_SIZES = "16K,64K,256K,1M,4M,16M,64M"
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = _UNITS.get(text[-1:], 1)
    value = int(float(text[:-1] if text[-1:] in _UNITS else text) * scale)
    if value < 1:
        raise ValueError(f"message size {text!r} must be positive")
    return value


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(times: list[float], device: torch.device) -> list[float]:
    """Per-iteration maximum over ranks."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _to_experts(exchange, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The rows this rank's experts receive (what the token dispatcher's exchange delivers)."""
    (route,) = exchange.routes(counts.view(1, -1))
    for hop in route.hops:
        x = hop.to_experts(x)
    return x


def _time_dispatch(exchange, x: torch.Tensor, counts: torch.Tensor, device: torch.device) -> list[float]:
    """Seconds from the common start to the end of each stage of one dispatch: the count
    exchanges (``routes``), then each hop; the last is the whole dispatch."""
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    (route,) = exchange.routes(counts.view(1, -1))
    _sync(device)
    ends = [time.perf_counter() - start]
    for hop in route.hops:
        x = hop.to_experts(x)
        _sync(device)
        ends.append(time.perf_counter() - start)
    return ends


def all2all_worker(topo, cfg: dict) -> dict:
    """Time both dispatchers at every size on this rank; every rank returns the same table."""
    device = _device()
    dtype = getattr(torch, cfg["dtype"])
    w = topo.ep_size
    row_bytes = cfg["hidden"] * torch.finfo(dtype).bits // 8
    counting = {"count_exchange": cfg["count_exchange"]}
    dispatchers = {
        "flat": FlatExchange(topo, w, **counting),
        "hierarchical": HierarchicalExchange(topo, w, **counting),
    }
    gen = torch.Generator().manual_seed(1234 + topo.rank)
    table = []
    for size in cfg["sizes"]:
        per_peer = max(1, size // (row_bytes * w))
        x = torch.randn(per_peer * w, cfg["hidden"], generator=gen).to(device, dtype)
        counts = torch.full((w,), per_peer, dtype=torch.int64, device=device)
        outs = {k: _to_experts(d, x, counts) for k, d in dispatchers.items()}  # warm-up and check
        if not torch.equal(outs["flat"], outs["hierarchical"]):
            raise AssertionError(f"flat and hierarchical dispatch differ at {size} bytes per rank")
        del outs

        warm = [
            _time_dispatch(dispatchers[k], x, counts, device)[-1] for k in KINDS for _ in range(cfg["warmup"])
        ]
        first = _slowest(warm or [0.0], device)
        iters = max(cfg["min_iters"], min(cfg["iters"], int(cfg["budget_s"] / max(2 * max(first), 1e-9))))
        samples: dict[str, list[list[float]]] = {k: [] for k in KINDS}
        for _ in range(iters):
            for kind in KINDS:
                samples[kind].append(_time_dispatch(dispatchers[kind], x, counts, device))
        row = {"size_bytes": per_peer * w * row_bytes, "rows_per_peer": per_peer, "iters": iters}
        for kind in KINDS:
            ends = [statistics.median(_slowest(list(stage), device)) for stage in zip(*samples[kind])]
            slow = _slowest([stages[-1] for stages in samples[kind]], device)
            row[kind] = {"median_s": statistics.median(slow), "samples_s": slow}
            row[kind]["stages_median_s"] = dict(
                zip(STAGES[kind], [b - a for a, b in zip([0.0, *ends], ends)])
            )
        table.append(row)
    return {"rank": topo.rank, "table": table}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sizes = [r["size_bytes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("flat", "o-"), ("hierarchical", "s--")):
        ax.plot(sizes, [1e3 * r[kind]["median_s"] for r in rows], style, label=kind)
    env = report["environment"]
    ax.set(
        xscale="log", yscale="log", xlabel="bytes per rank", ylabel="ms per dispatch (slowest rank, median)"
    )
    ax.set_title(f"All2All, {env['layout']}, {env['backend']}\n{env['network']}", fontsize=8)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (ignored under torchrun)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=2, help="simulated ranks per node (ignored under torchrun)"
    )
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help="bytes per rank, comma separated (K/M suffixes)"
    )
    parser.add_argument("--hidden", type=int, default=256, help="elements per row")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--count-exchange",
        default="per_hop",
        choices=COUNT_EXCHANGES,
        help="how two hops exchange row counts",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per size and kind (at most)")
    parser.add_argument(
        "--min-iters", type=int, default=3, help="timed iterations per size and kind (at least)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time per size that caps the iterations")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--plot", help="write the plot (PNG) here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    keys = ("hidden", "dtype", "iters", "min_iters", "warmup", "budget_s", "count_exchange")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["sizes"] = [parse_size(s) for s in args.sizes.split(",")]
    load_start = os.getloadavg()
    per_rank = run_ranks(all2all_worker, args.nodes, args.gpus_per_node, cfg, timeout=3600)
    if per_rank is None:  # not rank 0 of a torchrun job
        return 0
    world = len(per_rank)
    layout, env = report_layout(world, args.gpus_per_node, load_start)
    backend = env["backend"]
    report = {
        "benchmark": "all2all",
        "config": {**cfg, **layout},
        "environment": env,
        "results": per_rank[0]["table"],
    }
    print(f"All2All per dispatch, {env['layout']}, {backend}; {env['network']}")
    print(
        f"{'bytes/rank':>12} {'flat ms':>10} {'hier ms':>10} {'hier/flat':>10} {'iters':>6}   "
        "stages ms (critical path): flat counts+all2all | hier counts+inter+intra"
    )
    for r in report["results"]:
        f, h = r["flat"]["median_s"], r["hierarchical"]["median_s"]
        stages = " | ".join(
            "+".join(f"{1e3 * s:.1f}" for s in r[kind]["stages_median_s"].values()) for kind in KINDS
        )
        print(
            f"{r['size_bytes']:>12} {1e3 * f:10.2f} {1e3 * h:10.2f} {h / f:10.2f} {r['iters']:>6}   {stages}"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
