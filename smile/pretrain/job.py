"""Run one pretraining job on this process's rank: tokenizer, data, model, Trainer, summary.

:func:`run` is what every torchrun worker executes; :func:`preflight` does the same checks
without a process group (the launcher calls it once, so a bad corpus path or a vocabulary
mismatch is one clear error, not one traceback per rank); :func:`train_worker` is the entry
point for ``smile.testing.run_distributed`` and benchmarks.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist

from smile.data import build_dataloader, build_tokenizer
from smile.moe.topology import Topology
from smile.pretrain.config import JobConfig, job_from_dict
from smile.pretrain.model import build_model, check_fits, hf_config, parameter_summary, pretrain_loss
from smile.runtime import FitResult, Trainer, init_distributed


def preflight(job: JobConfig, topology: Topology) -> dict[str, Any]:
    """Check tokenizer, corpus and model shape for ``topology``; returns a short description.

    Trains and caches the embedded tokenizer on first use, and opens the corpus of data-parallel
    rank 0 (a missing path or an empty corpus raises here).
    """
    tokenizer = build_tokenizer(job.data)
    config = hf_config(job, tokenizer)
    check_fits(job, tokenizer, config, topology)
    loader = build_dataloader(job.data, 0, topology.world_size, tokenizer)
    next(loader)
    return {"tokenizer": tokenizer.path, "vocab_size": tokenizer.vocab_size, "model_vocab": config.vocab_size}


def run(job: JobConfig, topology: Topology | None = None, quiet: bool = False) -> FitResult:
    """Train ``job`` on this rank (collective; resumes from the newest checkpoint by default).

    Rank 0 prints what runs and, at the end, where its outputs are (unless ``quiet``).
    """
    # DeepSpeed's ZeRO still calls the old name; one warning per rank and step says nothing new.
    warnings.filterwarnings("ignore", ".*all_gather_into_tensor` is deprecated", FutureWarning)
    topology = topology if topology is not None else init_distributed(job.train.dist)
    tokenizer = build_tokenizer(job.data)
    model = build_model(job, tokenizer, topology)
    trainer = Trainer(
        model,
        pretrain_loss,
        job.train,
        train_data=lambda rank, world: build_dataloader(job.data, rank, world, tokenizer),
        topology=topology,
    )
    rank = dist.get_rank()
    if rank == 0 and not quiet:
        _print_start(job, topology, parameter_summary(model, topology))
    result = trainer.fit()
    if rank == 0 and not quiet:
        _print_end(job, result)
    return result


def train_worker(topology: Topology, job_dict: dict[str, Any]) -> dict[str, Any]:
    """``run`` on a ``run_distributed`` rank; returns the picklable parts of the result."""
    result = run(job_from_dict(job_dict), topology)
    return {
        "step": result.step,
        "losses": result.losses,
        "train_metrics": result.train_metrics,
        "resumed_from": result.resumed_from,
        "checkpoint": result.checkpoint,
    }


def _print_start(job: JobConfig, topology: Topology, params: dict[str, int]) -> None:
    moe = job.moe
    capacity = moe.resolved_capacity_factor() or "dropless"
    data = job.data
    print(
        f"smile train: {topology.nodes} node(s) x {topology.gpus_per_node} GPU(s) "
        f"({topology.world_size} ranks, expert-parallel over {topology.ep_size})\n"
        f"  model: {job.model.family}, {moe.num_experts} experts every {moe.every} layers, router "
        f"{moe.router}, dispatcher {moe.resolved_dispatcher(topology)}, capacity factor {capacity}\n"
        f"  parameters: {params['total'] / 1e6:.2f}M, {params['active_per_token'] / 1e6:.2f}M per token\n"
        f"  data: {data.source}, {data.objective}, {data.batch_size} x {data.seq_len} tokens per rank\n"
        f"  run dir: {job.train.run_dir}",
        flush=True,
    )


def _print_end(job: JobConfig, result: FitResult) -> None:
    metrics = result.train_metrics
    run_dir = job.train.run_dir
    parts = [f"step {result.step}"]
    for key, fmt in (("loss", "{:.4f}"), ("ce", "{:.4f}"), ("tokens_per_s", "{:.0f}")):
        if key in metrics:
            parts.append(f"{key} " + fmt.format(metrics[key]))
    if result.resumed_from:
        parts.append(f"resumed from {result.resumed_from}")
    print("smile train: done: " + ", ".join(parts), flush=True)
    print(f"  checkpoint: {result.checkpoint or result.resumed_from}", flush=True)
    if job.train.log.jsonl:
        print(f"  metrics:    {run_dir}/metrics.jsonl", flush=True)
        if job.train.log.plot:
            print(f"  plot:       {run_dir}/metrics.png", flush=True)
