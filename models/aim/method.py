"""The zoo entry points: ``train`` (adapters through smile.runtime.Trainer) and ``evaluate``
(multi-clip x multi-crop top-1/top-5 of a trained run).

Run directory (``cfg.train.run_dir``): the runtime's ``checkpoints/step_*`` with
``checkpoint.trainable_only`` (adapters, temporal embedding, ln_post, head and a sha256 record of
the frozen CLIP, never CLIP itself), ``metrics.jsonl``, ``aim.json`` (the config) and
``eval.json`` after ``eval``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smile.models.aim.config import AIMConfig
from smile.models.aim.data import ClipBatches, build_source
from smile.models.aim.model import AIMVideoViT, load_clip_vision
from smile.moe import Topology
from smile.runtime import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    Trainer,
    config_to_dict,
    init_distributed,
    latest_checkpoint,
    load_weights,
)

CONFIG_FILE, EVAL_FILE = "aim.json", "eval.json"


def aim_loss(model: AIMVideoViT, batch: dict, ctx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the clip logits (the Trainer adds the MoE aux loss when there is one)."""
    logits = model(batch["video"])
    labels = batch["label"]
    return F.cross_entropy(logits.float(), labels), {"acc": (logits.argmax(1) == labels).float().mean()}


def build_model(cfg: AIMConfig, topology: Topology | None = None) -> AIMVideoViT:
    """AIM around the frozen CLIP vision tower of ``cfg.vit_path``."""
    return AIMVideoViT.from_clip_vision(load_clip_vision(cfg.vit_path), cfg, topology)


def runtime_config(cfg: AIMConfig, steps_per_epoch: int, per_rank: int) -> TrainConfig:
    """``cfg.train`` with the paper's optimiser: AdamW over the trainable parameters only (the
    runtime selects ``requires_grad`` ones), no decay on the temporal embedding and LNs, cosine
    to 0 after linear warmup."""
    train = copy.deepcopy(cfg.train)
    train.max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    train.micro_batch_size, train.grad_accum_steps = per_rank, 1
    train.optimizers = [
        OptimizerConfig(
            name="adapters",
            type="adamw",
            lr=cfg.lr,
            weight_decay=cfg.wd,
            betas=cfg.betas,
            no_decay=["temporal_embedding", "*ln_post*"],
            schedule=ScheduleConfig(
                kind="cosine",
                warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                total_steps=cfg.schedule_steps,
            ),
        )
    ]
    train.checkpoint.trainable_only = True
    train.checkpoint.frozen_source = train.checkpoint.frozen_source or cfg.vit_path
    train.validate()
    return train


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train(cfg: AIMConfig) -> dict[str, Any]:
    """Train AIM's adapters on ``cfg.data`` and return the run summary."""
    cfg.validate()
    topology = init_distributed(cfg.train.dist)
    world = dist.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, topology)
    source = build_source(cfg.data, cfg.num_frames, model.image_size, cfg.num_classes, cfg.augment)

    def batches(rank: int, world_size: int) -> ClipBatches:
        return ClipBatches(source, per_rank, cfg.train.seed, rank, world_size)

    steps_per_epoch = len(batches(0, world))
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training clips make no batch of {cfg.batch_size}")
    train_cfg = runtime_config(cfg, steps_per_epoch, per_rank)
    trainer = Trainer(model, aim_loss, train_cfg, batches, topology=topology)
    fit = trainer.fit()
    run = Path(train_cfg.run_dir)
    if _is_rank0():
        (run / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1))
    trainer.close()
    return {
        **fit.summary(run),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


@torch.no_grad()
def evaluate(cfg: AIMConfig, checkpoint: str | Path | None = None, batch_views: int = 16) -> dict[str, Any]:
    """Top-1/top-5 on ``cfg.eval_data`` (or ``cfg.data``): class probabilities averaged over
    ``test_clips`` x ``test_crops`` views per video. ``checkpoint``: default the run's newest."""
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(Path(cfg.train.run_dir) / "checkpoints")
    if ckpt is None or not Path(ckpt).is_dir():
        raise FileNotFoundError(f"no checkpoint under {cfg.train.run_dir}/checkpoints; train first")
    model = build_model(cfg)
    load_weights(model, ckpt)
    model.eval()
    data = cfg.eval_data or cfg.data
    source = build_source(data, cfg.num_frames, model.image_size, cfg.num_classes)
    top1 = top5 = 0
    for i in range(len(source)):
        views = source.test_views(i, cfg.test_clips, cfg.test_crops)
        probs = torch.cat([model(v).softmax(-1) for v in views.split(batch_views)]).mean(0)
        ranked = probs.topk(min(5, probs.numel())).indices.tolist()
        top1 += int(ranked[0] == source.label(i))
        top5 += int(source.label(i) in ranked)
    result = {
        "top1": top1 / len(source),
        "top5": top5 / len(source),
        "videos": len(source),
        "views": cfg.test_clips * cfg.test_crops,
        "checkpoint": str(ckpt),
    }
    run = Path(cfg.train.run_dir)
    if run.is_dir():
        (run / EVAL_FILE).write_text(json.dumps(result))
    return result
