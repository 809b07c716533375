"""A LeMDA run on the shared runtime: data, model, the two optimizers, Trainer fit / evaluate.

The task network (encoders, adapters, fusion MLP, head) gets AdamW with a cosine schedule,
warmup and layer-wise lr decay over pretrained backbone layers; the augmenter gets Adam. Both
are ``smile.runtime`` optimizers stepped jointly after one backward of the summed loss, with
one global gradient clip over all parameters, as in the official code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smile.hf import moefy
from smile.models.lemda.batches import EvalBatches, TrainBatches
from smile.models.lemda.config import JobConfig
from smile.models.lemda.data import Table, image_root, load_split
from smile.models.lemda.encoders import HFEncoder, build_encoder
from smile.models.lemda.featurize import Featurizer
from smile.models.lemda.fusion import LateFusionClassifier
from smile.models.lemda.metrics import make_eval_fn
from smile.models.lemda.model import LeMDA
from smile.moe.topology import Topology
from smile.runtime import (
    ConfigError,
    FitResult,
    OptimizerConfig,
    ParamGroupConfig,
    ScheduleConfig,
    StepContext,
    TrainConfig,
    Trainer,
    init_distributed,
    latest_checkpoint,
    load_weights,
)

_BLOCK = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
_EMBEDDING = ("embed", "wte.", "wpe.")


def build_model(cfg: JobConfig, featurizer: Featurizer, topology: Topology) -> LeMDA:
    """The classifier from the encoder configs (MoE FFNs where asked) and the augmenter."""
    encoders: dict[str, nn.Module] = {}
    for enc in cfg.model.encoders:
        encoder = build_encoder(enc, featurizer.cardinalities(enc.name))
        if enc.moe:
            if cfg.model.moe is None:
                raise ConfigError(f"model.moe must be set: encoder {enc.name!r} has moe=true")
            moefy(encoder.model, cfg.model.moe, topology)
        encoders[enc.name] = encoder
    fusion = cfg.model.fusion
    adapter: str | int = fusion.adapter if fusion.adapter in ("max", "min") else int(fusion.adapter)
    classifier = LateFusionClassifier(
        encoders, featurizer.num_classes, fusion.hidden, adapter, fusion.activation, fusion.dropout
    )
    if cfg.lemda.freeze_encoders:
        for part in (classifier.encoders, classifier.adapters):
            part.requires_grad_(False)
    return LeMDA(classifier, cfg.lemda)


def layerwise_groups(model: LeMDA, decay: float) -> list[ParamGroupConfig]:
    """Layer-wise lr decay over each transformers backbone (AutoGluon's ``layerwise_decay``):
    the top block gets ``decay``, the one below ``decay**2`` ... the embeddings the smallest;
    the backbones' other parameters, adapters, fusion MLP, head and tabular MLPs keep the lr.
    Blocks are numbered in parameter order, so nested stages (ConvNeXt) count globally."""
    if decay == 1.0:
        return []
    by_depth: dict[int, list[str]] = {}
    for name, encoder in model.classifier.encoders.items():
        if not isinstance(encoder, HFEncoder):
            continue
        prefix = f"classifier.encoders.{name}.model."
        named = [(n, f"{prefix}{n}") for n, p in encoder.model.named_parameters() if p.requires_grad]
        blocks: dict[str, int] = {}
        for local, _ in named:
            match = _BLOCK.search("." + local)
            if match:
                blocks.setdefault(local[: match.end() - 1], len(blocks))
        for local, full in named:
            match = _BLOCK.search("." + local)
            if match:
                layer_id = len(blocks) - blocks[local[: match.end() - 1]]
            elif any(key in local for key in _EMBEDDING):
                layer_id = len(blocks) + 1
            else:
                continue
            by_depth.setdefault(layer_id, []).append(full)
    return [
        ParamGroupConfig(params=names, lr_scale=decay**depth) for depth, names in sorted(by_depth.items())
    ]


def derive_train_config(cfg: JobConfig, model: LeMDA, world_size: int, train_rows: int) -> TrainConfig:
    """``cfg.train`` with the batch size, steps and the two optimizers the method prescribes."""
    lemda, train = cfg.lemda, cfg.train
    per_step = world_size * train.grad_accum_steps
    if lemda.batch_size % per_step:
        raise ConfigError(
            f"lemda.batch_size={lemda.batch_size} must be a multiple of world size {world_size} x "
            f"train.grad_accum_steps={train.grad_accum_steps}"
        )
    steps_per_epoch = max(1, train_rows // lemda.batch_size)
    optimizers = [
        OptimizerConfig(
            name="task",
            type="adamw",
            lr=lemda.task_lr,
            weight_decay=lemda.task_wd,
            params=["*"],
            groups=layerwise_groups(model, lemda.layerwise_lr_decay),
            schedule=ScheduleConfig(kind="cosine", warmup_ratio=lemda.warmup_ratio),
        )
    ]
    if model.augmenter is not None:
        optimizers.append(
            OptimizerConfig(
                name="augmenter",
                type="adam",
                lr=lemda.aug_lr,
                weight_decay=lemda.aug_wd,
                params=["augmenter.*"],
            )
        )
    return dataclasses.replace(
        train,
        micro_batch_size=lemda.batch_size // per_step,
        max_steps=lemda.max_steps or lemda.epochs * steps_per_epoch,
        optimizers=optimizers,
    )


def make_loss_fn():
    """The Trainer's loss: LeMDA's summed losses in training, cross-entropy of h(f) otherwise
    (the Trainer adds the MoE routers' auxiliary loss when the backbones have MoE layers)."""

    def loss_fn(model: LeMDA, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = model.labels(batch)
        if not ctx.training:
            return F.cross_entropy(model(batch).float(), labels), {"samples": labels.numel()}
        losses = model.training_step(batch)
        loss = losses.pop("loss")
        metrics: dict[str, Any] = {k: v.detach() for k, v in losses.items()}
        metrics["samples"] = labels.numel()
        return loss, metrics

    return loss_fn


@dataclass
class Job:
    """Everything a run needs, built identically on every rank."""

    config: JobConfig
    topology: Topology
    train_table: Table
    eval_table: Table
    featurizer: Featurizer
    model: LeMDA
    train_config: TrainConfig

    def trainer(self, train_config: TrainConfig | None = None) -> Trainer:
        cfg, data = self.config, self.config.data
        train_config = train_config or self.train_config

        def train_data(rank: int, world: int) -> TrainBatches:
            return TrainBatches(
                self.train_table,
                self.featurizer,
                train_config.micro_batch_size,
                rank,
                world,
                seed=train_config.seed,
                num_workers=data.num_workers,
            )

        def eval_data(rank: int, world: int) -> EvalBatches:
            return EvalBatches(
                self.eval_table, self.featurizer, data.eval_batch_size, rank, world, data.num_workers
            )

        return Trainer(
            self.model,
            make_loss_fn(),
            train_config,
            train_data,
            eval_data,
            topology=self.topology,
            eval_fn=make_eval_fn(cfg.metric),
        )


def build_job(cfg: JobConfig) -> Job:
    """Data, featurizer and model (seeded alike on every rank), and the derived TrainConfig."""
    topology = init_distributed(cfg.train.dist)
    train_table = load_split(cfg.data, cfg.data.train_split)
    eval_table = load_split(cfg.data, cfg.data.eval_split)
    featurizer = Featurizer(cfg.model.encoders, train_table, cfg.data.label, image_root(cfg.data))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, featurizer, topology)
    train_config = derive_train_config(cfg, model, topology.world_size, len(train_table))
    return Job(cfg, topology, train_table, eval_table, featurizer, model, train_config)


def train(cfg: JobConfig) -> tuple[Job, FitResult]:
    """Fit through the Trainer (resuming per ``train.checkpoint.resume``), evaluate, write
    ``<run_dir>/lemda_result.json`` on rank 0."""
    job = build_job(cfg)
    result = job.trainer().fit()
    summary = {
        "eval": result.eval_metrics,
        "train": {k: v for k, v in result.train_metrics.items() if isinstance(v, (int, float))},
        "steps": result.step,
        "classes": [str(c) for c in job.featurizer.classes],
        "augment": cfg.lemda.augment,
        "checkpoint": result.checkpoint,
    }
    if job.topology.rank == 0:
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.run_dir) / "lemda_result.json").write_text(json.dumps(summary, indent=2))
    return job, result


def evaluate(cfg: JobConfig, weights: str | None = None) -> dict[str, float]:
    """Metrics of h(f) on the eval split, from ``weights`` (a checkpoint or export directory;
    default: the newest checkpoint of the run)."""
    job = build_job(cfg)
    path = Path(weights) if weights else latest_checkpoint(cfg.train.checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {cfg.train.checkpoint_dir}; pass --weights")
    load_weights(job.model, path, job.topology)
    never = dataclasses.replace(job.train_config.checkpoint, resume="never")
    return job.trainer(dataclasses.replace(job.train_config, checkpoint=never)).evaluate()
