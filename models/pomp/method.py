"""The zoo entry points: ``train`` (prompt pre-training through smile.runtime.Trainer) and
``evaluate`` (zero-shot scoring of a trained prompt on any class set).

Run directory (``cfg.train.run_dir``): the runtime's ``checkpoints/step_*`` (trainable_only: the
context and a sha256 record of the frozen CLIP, never CLIP itself), ``metrics.jsonl``, and at the
end ``prompt.safetensors`` (the context, a few KB) + ``pomp.json`` (the config), which ``eval``
reads; ``eval_<dataset>.json`` per evaluation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from smile.models.pomp.clip import FrozenCLIP, load_clip
from smile.models.pomp.config import DataCfg, POMPConfig
from smile.models.pomp.data import Batches, ImageSet, load_images
from smile.models.pomp.local_contrast import (
    check_sampling,
    local_contrast_logits,
    local_contrast_loss,
    sample_negatives,
    step_generator,
)
from smile.models.pomp.model import POMPModel
from smile.models.pomp.prompt import PromptLearner
from smile.runtime import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    Trainer,
    config_to_dict,
    init_distributed,
)

PROMPT_FILE, CONFIG_FILE = "prompt.safetensors", "pomp.json"


class POMPLoss:
    """``loss_fn(model, batch, ctx)``: local contrast (+ correction) or CoOp's full softmax.
    The negatives depend on (seed, step) only, so every rank scores the same classes."""

    def __init__(self, cfg: POMPConfig, n_classes: int, record: bool = False) -> None:
        self.cfg, self.n_classes = cfg, n_classes
        self.drawn: list[tuple[int, list[int]]] | None = [] if record else None

    def __call__(self, model: POMPModel, batch: dict, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["label"]
        if int(labels.max()) >= self.n_classes or int(labels.min()) < 0:
            raise ValueError(f"label {int(labels.max())} is out of range for N={self.n_classes} classes")
        img = model.encode_image(batch["pixel_values"])
        if self.cfg.objective == "full_softmax":
            ids = torch.arange(self.n_classes, device=labels.device)
            logits = model.logit_scale * img @ model.encode_text(ids).t()
            loss, hit = F.cross_entropy(logits, labels), logits.argmax(1) == labels
        else:
            neg = sample_negatives(
                self.n_classes, self.cfg.num_sampled_classes, step_generator(self.cfg.train.seed, ctx.step)
            )
            if self.drawn is not None:
                self.drawn.append((ctx.step, neg.tolist()))
            neg = neg.to(labels.device)
            ids, where = torch.unique(torch.cat([labels, neg]), return_inverse=True)  # each prompt once
            text = model.encode_text(ids)
            logits = local_contrast_logits(
                img,
                text[where[: len(labels)]],
                text[where[len(labels) :]],
                labels,
                neg,
                self.n_classes,
                self.cfg.local_correction,
                logit_scale=model.logit_scale,
                log_base=self.cfg.correction_log_base,
            )
            loss, hit = local_contrast_loss(logits), logits.argmax(1) == 0
        return loss, {"acc": hit.float().mean(), "prompts": float(len(ids))}


def build_model(cfg: POMPConfig, clip: FrozenCLIP, classnames: list[str]) -> POMPModel:
    text = clip.model.config.text_config
    learner = PromptLearner(
        classnames,
        clip.tokenizer,
        text.hidden_size,
        text.max_position_embeddings,
        cfg.n_ctx,
        cfg.ctx_init_std,
        cfg.class_token_position,
    )
    return POMPModel(clip.model, learner)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def runtime_config(cfg: POMPConfig, steps_per_epoch: int, per_rank: int) -> TrainConfig:
    """``cfg.train`` with the paper's schedule: SGD, 1 warmup epoch at constant 1e-5, cosine."""
    train = copy.deepcopy(cfg.train)
    train.max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    train.micro_batch_size, train.grad_accum_steps = per_rank, 1
    train.optimizers = [
        OptimizerConfig(
            name="prompt",
            type=cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum if cfg.optimizer == "sgd" else 0.0,
            params=["prompt_learner.ctx"],
            schedule=ScheduleConfig(
                kind="cosine",
                warmup_steps=cfg.warmup_epochs * steps_per_epoch,
                warmup_lr=cfg.warmup_lr if cfg.warmup_epochs else None,
            ),
        )
    ]
    train.checkpoint.trainable_only, train.checkpoint.frozen_source = True, cfg.clip_path
    train.validate()
    return train


def train(
    cfg: POMPConfig, *, images: ImageSet | None = None, record_negatives: bool = False
) -> dict[str, Any]:
    """Pre-train the prompt on ``cfg.data`` (or ``images``) and save it to the run directory."""
    topology = init_distributed(cfg.train.dist)
    world = dist.get_world_size()
    clip = load_clip(cfg.clip_path)
    data_cfg = copy.deepcopy(cfg.data)
    if cfg.classnames_file:
        data_cfg.classnames_file = cfg.classnames_file
    images = images if images is not None else load_images(data_cfg, cfg.shots_per_class)
    n = len(images.classnames)
    if cfg.objective == "local_contrast":
        check_sampling(n, cfg.num_sampled_classes)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    per_rank = cfg.batch_size // world

    def batches(rank: int, world_size: int) -> Batches:
        return Batches(
            images,
            per_rank,
            clip.image_size,
            clip.mean,
            clip.std,
            train=True,
            augment=data_cfg.augment,
            randaug_n=cfg.randaug_n,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
            num_workers=data_cfg.num_workers,
        )

    steps_per_epoch = len(batches(0, world))
    if steps_per_epoch == 0:
        raise ValueError(f"{len(images)} training images make no batch of {cfg.batch_size}")
    train_cfg = runtime_config(cfg, steps_per_epoch, per_rank)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, clip, images.classnames)
    loss = POMPLoss(cfg, n, record=record_negatives)
    trainer = Trainer(model, loss, train_cfg, batches, topology=topology)
    fit = trainer.fit()
    run = Path(train_cfg.run_dir)
    if _is_rank0():
        save_file(
            {"ctx": model.prompt_learner.ctx.detach().float().cpu().contiguous()}, str(run / PROMPT_FILE)
        )
        (run / CONFIG_FILE).write_text(json.dumps({"config": config_to_dict(cfg), "n_classes": n}, indent=1))
    trainer.close()
    return {
        **fit.summary(run),
        "negatives": loss.drawn,
    }


def load_prompt(source: str | Path) -> torch.Tensor:
    """The context from a run directory (prompt.safetensors) or a runtime checkpoint directory."""
    path = Path(source)
    if (path / PROMPT_FILE).is_file():
        return load_file(str(path / PROMPT_FILE))["ctx"]
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))["prompt_learner.ctx"].float()
    raise FileNotFoundError(
        f"{str(path)!r} holds no {PROMPT_FILE} or checkpoint model.safetensors; train first"
    )


def _eval_data(cfg: POMPConfig, dataset: str | None) -> DataCfg:
    if dataset is None:
        return cfg.data
    names = [d.name for d in cfg.evaluation]
    if dataset not in names:
        raise ValueError(
            f"--dataset {dataset!r} is not in the config's evaluation sets; "
            f"allowed: {', '.join(names) or 'none'}"
        )
    return cfg.evaluation[names.index(dataset)]


@torch.no_grad()
def evaluate(
    cfg: POMPConfig,
    dataset: str | None = None,
    *,
    prompt: str | Path | None = None,
    images: ImageSet | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 of the trained prompt on a class set (seen or not): every class prompt encoded once,
    then argmax of cosine logits; no sampling, no correction. ``prompt=None`` reads the run dir."""
    data_cfg = _eval_data(cfg, dataset)
    ctx = load_prompt(prompt or cfg.train.run_dir)
    clip = load_clip(cfg.clip_path)
    images = images if images is not None else load_images(data_cfg, None)
    model = build_model(cfg, clip, images.classnames)
    if tuple(ctx.shape) != tuple(model.prompt_learner.ctx.shape):
        raise ValueError(
            f"prompt has shape {tuple(ctx.shape)}; n_ctx={cfg.n_ctx} needs "
            f"{tuple(model.prompt_learner.ctx.shape)}"
        )
    model.prompt_learner.ctx.copy_(ctx)
    text = model.class_features()
    stream = Batches(images, batch_size, clip.image_size, clip.mean, clip.std, train=False)
    correct = total = 0
    for batch in stream:
        correct += int((model(batch["pixel_values"], text).argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    result = {
        "dataset": data_cfg.name,
        "top1": correct / max(total, 1),
        "n_classes": len(images.classnames),
        "n_images": total,
    }
    run = Path(cfg.train.run_dir)
    if run.is_dir():
        (run / f"eval_{data_cfg.name}.json").write_text(json.dumps(result))
    return result
