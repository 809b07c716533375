"""Typed configuration of POMP. Defaults are the paper's ImageNet-21K setting (ViT-B/16, M=4,
K=1000, 16 shots, SGD 0.002 cosine, 1 warmup epoch at 1e-5, 20 epochs, batch 32 x 8 GPUs,
RandAugment(2)); ``train`` holds the shared runtime's knobs (run_dir, ZeRO, precision, logging)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smile.models.pomp.local_contrast import LOG_BASES
from smile.models.pomp.prompt import POSITIONS
from smile.runtime import CheckpointConfig, ConfigError, LogConfig, TrainConfig

SOURCES = ("imagefolder", "hf", "digit_pairs", "digit_triples")
OBJECTIVES = ("local_contrast", "full_softmax")


@dataclass
class DataCfg:
    """One image-classification set.

    source: imagefolder (``root/<class folder>/*`` images, ImageNet-21K style; class names from
        ``classnames_file``), hf (HF ``datasets``: ``hf_path`` with the user's ``data_dir`` /
        ``cache_dir``; class names from the label column's ClassLabel or ``classnames_file``),
        digit_pairs / digit_triples (the offline set-up, 100 / 1000 classes, see digits.py).
    classnames_file: one class per line, ``<folder> <name>`` (or the name alone, in sorted folder
        / label order); its length must equal the number of classes.
    classes: digit_pairs / digit_triples only, which of the classes (empty: all).
    augment: train only; randaugment = random resized crop + flip + RandAugment(randaug_n).
    """

    name: str = "train"
    source: Literal["imagefolder", "hf", "digit_pairs", "digit_triples"] = "imagefolder"
    root: str | None = None
    classnames_file: str | None = None
    hf_path: str = "imagefolder"
    hf_name: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    per_class: int = 16
    classes: list[int] = field(default_factory=list)
    augment: Literal["randaugment", "flip", "none"] = "randaugment"
    num_workers: int = 0
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.source == "imagefolder" and not self.root:
            raise ConfigError(f"{where}.root must name the image folder for source 'imagefolder'")
        if self.per_class < 1 or self.num_workers < 0:
            raise ConfigError(f"{where}: per_class >= 1 and num_workers >= 0 required")


def _runtime_defaults() -> TrainConfig:
    # Only the prompt is saved (CLIP is rebuilt from clip_path and checked by sha256).
    return TrainConfig(
        run_dir="runs/pomp",
        grad_clip=0.0,
        checkpoint=CheckpointConfig(trainable_only=True, keep_last=2),
        log=LogConfig(every=50),
    )


def _imagenet21k() -> DataCfg:
    return DataCfg(root="data/imagenet21k/train", classnames_file="data/imagenet21k/classnames.txt")


@dataclass
class POMPConfig:
    """POMP end to end (field names as in the spec / paper).

    num_sampled_classes: K, the true class plus K-1 negatives per step (local contrast).
    local_correction: shift negatives by log((N-1)/k_i); false is the uncorrected ablation.
    correction_log_base: "e" (paper) or "10" (the official code's log10, for parity runs).
    objective: local_contrast (POMP) or full_softmax (CoOp: every class every step).
    shots_per_class: images per class drawn once with ``data.seed`` (the paper's 16 shots).
    batch_size: global batch (the paper: 32 per GPU x 8 GPUs = 256).
    max_steps: None trains ``epochs`` epochs; a number overrides it (tiny runs).
    evaluation: downstream sets for ``eval --dataset <name>`` (classes never seen in training).
    """

    clip_path: str = "pretrained/clip-vit-base-patch16"
    classnames_file: str | None = None
    n_ctx: int = 4
    ctx_init_std: float = 0.02
    num_sampled_classes: int = 1000
    local_correction: bool = True
    correction_log_base: str = "e"
    class_token_position: str = "end"
    objective: Literal["local_contrast", "full_softmax"] = "local_contrast"
    shots_per_class: int = 16
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 20
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 256
    randaug_n: int = 2
    max_steps: int | None = None
    data: DataCfg = field(default_factory=_imagenet21k)
    evaluation: list[DataCfg] = field(default_factory=list)
    train: TrainConfig = field(default_factory=_runtime_defaults)

    def validate(self, where: str = "pomp") -> None:
        if self.correction_log_base not in LOG_BASES:
            raise ConfigError(
                f"{where}.correction_log_base={self.correction_log_base!r} is not allowed; "
                "allowed values: e, 10"
            )
        if self.class_token_position not in POSITIONS:
            raise ConfigError(
                f"{where}.class_token_position={self.class_token_position!r} is not allowed; "
                f"allowed values: {', '.join(POSITIONS)}"
            )
        if self.n_ctx < 1 or self.ctx_init_std <= 0:
            raise ConfigError(f"{where}: n_ctx >= 1 and ctx_init_std > 0 required")
        if self.num_sampled_classes < 2:
            raise ConfigError(
                f"{where}.num_sampled_classes={self.num_sampled_classes} must be >= 2 "
                "(the true class + K-1 negatives)"
            )
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.warmup_epochs < 0:
            raise ConfigError(f"{where}: lr > 0, batch_size >= 1, epochs >= 1, warmup_epochs >= 0 required")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps={self.max_steps} must be >= 1 or null")
        self.data.validate(f"{where}.data")
        for i, data in enumerate(self.evaluation):
            data.validate(f"{where}.evaluation[{i}]")
