"""End-to-end pretraining throughput, Switch vs SMILE, side by side on the same ranks.

Both variants train the same job (model, data, seed, capacity factor) through ``smile train``'s
code path; only the routing differs: Switch = ``switch`` router + flat All2All, SMILE =
``bilevel`` router + hierarchical All2All. Variants alternate ``--repeats`` times in the same
processes; tokens/s counts the steps after ``--warmup``. Prints a table and JSON; asserts nothing.

    python benchmarks/pretrain_bench.py --nodes 2 --gpus-per-node 2        # simulated, CPU/gloo
    torchrun --nnodes N --nproc-per-node G ... benchmarks/pretrain_bench.py --config configs/x.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from smile.moe.topology import under_torchrun
from smile.sim.cluster import describe_environment

VARIANTS = {"switch": ("switch", "flat"), "smile": ("bilevel", "hierarchical")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="job overrides")
    parser.add_argument("--config", help="job config (default: the tiny embedded job)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (ignored under torchrun)")
    parser.add_argument("--gpus-per-node", type=int, default=2, help="simulated GPUs per node")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per variant")
    parser.add_argument("--capacity-factor", default="1.0", help="both variants: a number, auto or null")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def _jobs(args: argparse.Namespace, run_root: str) -> list[tuple[str, dict]]:
    from smile.pretrain.config import load_job
    from smile.runtime import config_to_dict

    jobs = []
    for repeat in range(args.repeats):
        for name, (router, dispatcher) in VARIANTS.items():
            overrides = [
                *args.overrides,
                f"moe.router={router}",
                f"moe.dispatcher={dispatcher}",
                f"moe.capacity_factor={args.capacity_factor}",
                f"train.max_steps={args.warmup + args.steps}",
                f"train.log.every={args.warmup}" if args.warmup else f"train.log.every={args.steps}",
                f"train.run_dir={run_root}/{name}-{repeat}",
                "train.checkpoint.resume=never",
                "train.checkpoint.every=0",
                "train.checkpoint.save_final=false",
                "train.log.progress_bar=false",
                "train.log.plot=false",
            ]
            jobs.append((name, config_to_dict(load_job(args.config, overrides))))
    return jobs


def bench_worker(topology, jobs: list[tuple[str, dict]], warmup: int) -> list[dict[str, Any]]:
    """Train every job in turn; rank 0 reads each run's metrics after the warmup (it alone writes
    them; under torchrun every rank made its own run directory), the others return nothing."""
    from smile.pretrain.config import job_from_dict
    from smile.pretrain.job import run
    from smile.runtime.metrics import read_records

    out = []
    for name, job_dict in jobs:
        job = job_from_dict(job_dict)
        result = run(job, topology, quiet=True)
        if topology.rank != 0:
            continue
        records = read_records(Path(job.train.run_dir) / "metrics.jsonl")
        measured = [r for r in records if r["split"] == "train" and r["step"] > warmup]
        if not measured:
            raise ValueError(f"no training step logged after --warmup {warmup}: raise --steps")
        seconds = sum(r["step_time"] * job.train.log.every for r in measured)
        tokens = sum(r["tokens_per_s"] * r["step_time"] * job.train.log.every for r in measured)
        out.append(
            {
                "variant": name,
                "tokens_per_s": tokens / seconds if seconds else 0.0,
                "step_ms": 1e3 * seconds / max(len(measured) * job.train.log.every, 1),
                "ce": result.train_metrics.get("ce"),
                "dropped": result.train_metrics.get("dropped"),
                "forward_ms": 1e3 * statistics.mean(r.get("time/forward", 0.0) for r in measured),
                "backward_ms": 1e3 * statistics.mean(r.get("time/backward", 0.0) for r in measured),
            }
        )
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rows = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        rows[name] = {key: statistics.median(r[key] for r in mine) for key in mine[0] if key != "variant"}
        rows[name]["tokens_per_s_runs"] = [r["tokens_per_s"] for r in mine]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inside = under_torchrun()
    with tempfile.TemporaryDirectory(prefix="smile-pretrain-bench-") as root:
        jobs = _jobs(args, root)
        start = time.perf_counter()
        if inside:
            from smile.pretrain.config import job_from_dict
            from smile.runtime import init_distributed

            topology = init_distributed(job_from_dict(jobs[0][1]).train.dist)
            runs = bench_worker(topology, jobs, args.warmup)
            world = f"{topology.nodes} nodes x {topology.gpus_per_node} GPUs"
        else:
            from smile.testing import run_distributed

            nodes, gpus = args.nodes, args.gpus_per_node
            runs = run_distributed(bench_worker, nodes, gpus, jobs, args.warmup, timeout=3600)[0]
            world = f"{args.nodes} nodes x {args.gpus_per_node} GPUs simulated on CPU/gloo"
        wall = time.perf_counter() - start
    if inside and int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = summarise(runs)
    speedup = rows["smile"]["tokens_per_s"] / rows["switch"]["tokens_per_s"]
    print(
        f"pretraining throughput, {world}; {args.steps} steps after {args.warmup} warm-up, "
        f"median of {args.repeats}; capacity factor {args.capacity_factor}"
    )
    header = ("tokens/s", 10), ("step ms", 9), ("fwd ms", 8), ("bwd ms", 8), ("ce", 7), ("dropped", 8)
    print(f"{'variant':31} " + " ".join(f"{name:>{width}}" for name, width in header))
    labels = {"switch": "Switch (switch + flat)", "smile": "SMILE (bilevel + hierarchical)"}
    for name, row in rows.items():
        print(
            f"{labels[name]:31} {row['tokens_per_s']:10.0f} {row['step_ms']:9.1f} {row['forward_ms']:8.1f} "
            f"{row['backward_ms']:8.1f} {row['ce']:7.3f} {row['dropped']:8.1%}"
        )
    print(f"SMILE / Switch throughput: {speedup:.2f}x  (wall {wall:.0f} s)")
    report = {
        "benchmark": "pretrain_throughput",
        "topology": world,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "environment": describe_environment("nccl" if inside and torch.cuda.is_available() else "gloo"),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "results": rows,
        "smile_over_switch": speedup,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
