"""Run one pretraining job on this process's rank: tokenizer, data, model, Trainer, summary.

:func:`run` is what every torchrun worker executes; :func:`preflight` does the same checks
without a process group (the launcher calls it once, so a bad corpus path or a vocabulary
mismatch is one clear error, not one traceback per rank); :func:`train_worker` is the entry
point for ``smile.testing.run_distributed`` and benchmarks.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from smile.data import build_dataloader, build_tokenizer
from smile.moe.topology import Topology
from smile.pretrain.config import JobConfig, job_from_dict
from smile.pretrain.model import build_model, check_fits, hf_config, parameter_summary, pretrain_loss
from smile.runtime import ConfigError, FitResult, Trainer, init_distributed
from smile.runtime import checkpoint as ckpt
from smile.runtime import lock as run_lock


def preflight(job: JobConfig, topology: Topology) -> dict[str, Any]:
    """Check tokenizer, corpus and model shape for ``topology``; returns a short description.

    Trains and caches the embedded tokenizer on first use, and opens the corpus of data-parallel
    rank 0 (a missing path or an empty corpus raises here). A run dir locked by another live job
    raises :class:`~smile.runtime.lock.RunLockedError` (read-only: the workers take the lock).
    The run and checkpoint directories must be directories (or not exist yet); the checkpoint a
    run would resume from (a ``train.checkpoint.resume`` path, or with ``auto`` the newest one
    under the checkpoint dir) must exist and fit the configured model: the tensor shapes in its
    safetensors headers are compared with the model's, built on the meta device (no weights read).
    """
    _check_directories(job)
    run_lock.check(job.train.run_dir)
    resume_from = _resume_checkpoint(job)
    tokenizer = build_tokenizer(job.data)
    loader = build_dataloader(job.data, 0, topology.world_size, tokenizer)
    next(loader)  # the corpus first: it needs no model (transformers' import takes seconds)
    config = hf_config(job, tokenizer)
    check_fits(job, tokenizer, config, topology)
    if resume_from is not None:
        _check_checkpoint_fits(job, tokenizer, topology, resume_from)
    return {"tokenizer": tokenizer.path, "vocab_size": tokenizer.vocab_size, "model_vocab": config.vocab_size}


def _check_directories(job: JobConfig) -> None:
    """Output paths must be directories or not exist yet (no file in the way, nor above them)."""
    train = job.train
    paths = {
        "train.run_dir": train.run_dir,
        "train.checkpoint.dir": train.checkpoint.dir,
        "train.checkpoint.export_dir": train.checkpoint.export_dir,
    }
    for field, value in paths.items():
        if value is None:
            continue
        for path in (Path(value), *Path(value).parents):
            if path.exists() and not path.is_dir():
                what = "is an existing file" if path == Path(value) else f"lies under the file {str(path)!r}"
                raise ConfigError(f"{field}={value!r} {what}; it must be a directory (or not exist yet)")


def _resume_checkpoint(job: JobConfig) -> Path | None:
    """The checkpoint the run would resume from (None: a fresh start); a bad resume path raises."""
    resume = job.train.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(job.train.checkpoint_dir)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(
            f"train.checkpoint.resume={resume!r} does not exist; allowed values: 'auto', 'never' or the "
            "path of a checkpoint directory (step_XXXXXXXX)"
        )
    if not (path / ckpt.MANIFEST).is_file():
        raise ConfigError(
            f"train.checkpoint.resume={resume!r} is not a complete checkpoint directory "
            f"({ckpt.MANIFEST} is missing)"
        )
    return path


def _check_checkpoint_fits(job: JobConfig, tokenizer: Any, topology: Topology, path: Path) -> None:
    """The checkpoint's tensor names and shapes (read from headers) against the model's."""
    from smile.moe.experts import is_expert_parameter

    field = f"train.checkpoint.resume={job.train.checkpoint.resume!r}"
    try:
        manifest = ckpt.read_manifest(path)
    except ckpt.CheckpointError as err:
        raise ConfigError(f"{field}: {err}") from None
    here = {
        "world_size": topology.world_size,
        "zero_stage": job.train.zero_stage,
        "optimizers": [o.name for o in job.train.optimizers],
        "topology": {
            "nodes": topology.nodes,
            "gpus_per_node": topology.gpus_per_node,
            "ep_nodes": topology.ep_nodes,
        },
    }
    for key, value in here.items():
        if key in manifest and manifest[key] != value:
            raise ConfigError(
                f"{field}: checkpoint {str(path)!r} was written with {key}={manifest[key]!r}, this run has "
                f"{key}={value!r}; resume with the same layout or start a new run (another train.run_dir, "
                "or train.checkpoint.resume=never)"
            )
    with _weights_on_meta():
        model = build_model(job, tokenizer, topology)
    own = model.state_dict(keep_vars=True)
    files = ["model.safetensors"]
    if manifest.get("has_experts") or any(is_expert_parameter(t) for t in own.values()):
        files.append(f"experts-ep{topology.ep_rank}.safetensors")
    saved: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ConfigError(f"{field}: checkpoint file {str(file)!r} is missing")
        saved.update({k: (shape, str(file)) for k, shape in _safetensors_shapes(file, field).items()})
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{field}: checkpoint {str(path)!r} does not hold the configured model's tensors: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}; restore the model config or start a new "
            "run (another train.run_dir, or train.checkpoint.resume=never)"
        )
    for key, tensor in own.items():
        shape, file = saved[key]
        if shape != tuple(tensor.shape):
            raise ConfigError(
                f"{field}: {file}: tensor {key} has shape {shape}, the configured model has "
                f"{tuple(tensor.shape)}; restore the model config or start a new run (another "
                "train.run_dir, or train.checkpoint.resume=never)"
            )


def _safetensors_shapes(file: Path, field: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON), no data read."""
    try:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= file.stat().st_size - 8:
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(handle.read(size))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{field}: {str(file)!r} is not a readable safetensors file ({err})") from None


@contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Parameters created inside move to the meta device as they are registered (shapes only)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            module._parameters[name] = moved

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


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
