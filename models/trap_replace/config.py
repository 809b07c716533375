"""Typed configuration of Trap and Replace: the method, the threat model, the data and both stages.

Defaults are the paper's CIFAR-10 setting (WRN-16-1, stem_end_block 5, stage 1 Adam 1e-3 for 200
epochs at batch 256 with CE + 10 MSE + 1 TV, stage 2 Adam 0.03 for 100 epochs at batch 64 on a
5% clean holdout with CutMix and label smoothing 0.1). ``train`` holds the shared runtime knobs
(ZeRO stage, precision, logging, process group); each stage sets its own run_dir, max_steps,
micro_batch_size and optimizer from the sections here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smile.models.trap_replace.attacks import check_attack
from smile.models.trap_replace.networks import valid_stem_ends
from smile.runtime import CheckpointConfig, ConfigError, LogConfig, TrainConfig


@dataclass
class PoisonCfg:
    """Threat model: which attack, how much of the training set, which target class.

    ratio: poisoned fraction of the training set (after the holdout is set aside); the count is
        round(ratio * |train|). Clean-label attacks (sig, cl) poison target-class images only, at
        most all of them (as the official code does).
    holdout_ratio: fraction of the training data set aside, clean, for stage 2.
    seed: draws the holdout, the poisoned images and generated trigger patterns.
    trigger_file / mask_file: the official trigger image (and l0 mask) for exact parity.
    patch_size: badnet_sq side in pixels (None: 4 per 32).
    cl_hard_images: for attack 'cl', a .npy (N, H, W, C) uint8 of the adversarially perturbed
        training set in dataset order (Turner et al.'s release, e.g. inf_16.npy).
    """

    attack: str = "badnet_grid"
    ratio: float = 0.1
    target: int = 0
    holdout_ratio: float = 0.05
    seed: int = 0
    trigger_file: str | None = None
    mask_file: str | None = None
    patch_size: int | None = None
    cl_hard_images: str | None = None

    def validate(self, where: str = "poison") -> None:
        try:
            check_attack(self.attack)
        except ValueError as err:
            raise ConfigError(f"{where}.attack: {err}") from None
        for name in ("ratio", "holdout_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{where}.{name}={value} must be in (0, 1)")
        if self.ratio + self.holdout_ratio >= 1.0:
            raise ConfigError(
                f"{where}: ratio + holdout_ratio = {self.ratio + self.holdout_ratio} must be < 1"
            )
        if self.target < 0:
            raise ConfigError(f"{where}.target={self.target} must be a class index >= 0")
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"{where}.patch_size={self.patch_size} must be >= 1")


@dataclass
class OptimCfg:
    """One stage's optimisation: optimizer, peak lr, weight decay (on every parameter, as torch's
    Adam/SGD apply it in the official code), epochs, global batch size and lr schedule."""

    type: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 200
    batch_size: int = 256
    schedule: Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self, where: str = "stage") -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay={self.weight_decay} must be >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")


DATA_SOURCES = ("cifar10", "hf", "gtsrb", "imagenet_folder", "digits")


@dataclass
class DataCfg:
    """Where the images come from (nothing is downloaded unless ``source: hf`` names a hub id).

    source: cifar10 (the python-pickle batches under ``root``), hf (a HF ``datasets`` id or local
        directory, ``hf_path``; CIFAR-10 is "cifar10" with columns img/label), gtsrb (the
        torchvision or official-zip layout under ``root``, resized to 32x32), imagenet_folder
        (``root``/train and ``root``/val class folders, classes from ``class_list``, loaded at
        ``load_size`` and cropped to ``crop``), digits (scikit-learn's bundled 8x8 digits,
        upsampled to 16x16; the offline test set-up).
    augment: crop_flip (pad-4 random crop + flip, CIFAR/GTSRB), resized_crop (RandomResizedCrop
        scale 0.2-1 + flip, ImageNet), none.
    mean / std: per-channel normalisation applied inside the model (None: identity, as the
        official CIFAR/GTSRB runs); the reconstruction target is always the [0, 1] image.
    test_fraction: digits only, the share held out as the test set.
    """

    source: Literal["cifar10", "hf", "gtsrb", "imagenet_folder", "digits"] = "cifar10"
    root: str | None = None
    hf_path: str = "cifar10"
    hf_name: str | None = None
    image_column: str = "img"
    label_column: str = "label"
    cache_dir: str | None = None
    class_list: str | None = None
    load_size: int = 256
    crop: int = 224
    augment: Literal["crop_flip", "resized_crop", "none"] = "crop_flip"
    mean: list[float] | None = None
    std: list[float] | None = None
    num_workers: int = 0
    eval_batch_size: int = 1000
    test_fraction: float = 0.3

    def validate(self, where: str = "data") -> None:
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{where}: set both mean and std, or neither")
        if self.num_workers < 0 or self.eval_batch_size < 1:
            raise ConfigError(f"{where}: num_workers >= 0 and eval_batch_size >= 1 required")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{where}.test_fraction={self.test_fraction} must be in (0, 1)")


def _stage2_optim() -> OptimCfg:
    return OptimCfg(type="adam", lr=0.03, weight_decay=5e-4, epochs=100, batch_size=64)


def _runtime_defaults() -> TrainConfig:
    # Small conv nets: DDP-style ZeRO 0, fp32 and no clipping as in the official code.
    return TrainConfig(
        zero_stage=0,
        precision="fp32",
        grad_clip=0.0,
        checkpoint=CheckpointConfig(keep_last=2),
        log=LogConfig(every=50),
    )


@dataclass
class TrapReplaceConfig:
    """Trap and Replace, end to end.

    run_dir: stage 1 runs in ``<run_dir>/stage1``, stage 2 in ``<run_dir>/stage2``.
    arch: wrn16_1 (paper, CIFAR-10/GTSRB), resnet34 (paper, ImageNet-12), or any wrn<6n+4>_<k>.
    base_width: WRN channels before widening (16 in the paper; smaller for CPU tests).
    stem_end_block: where the stem ends (wrn16: 4, 5, 6; resnet34: 27, 29, 31, 33).
    rec_weight / tv_weight: stage-1 weights of MSE reconstruction and TV; both 0 trains the same
        network without a decoder, the paper's "no defense" baseline.
    head_dropout / cutmix_beta / cutmix_prob / label_smoothing: stage 2's head and loss.
    selection: which stage-2 checkpoint is kept: "last", or "holdout_val" (best accuracy on a
        ``val_fraction`` split of the holdout, evaluated every ``val_every_epochs``). The test
        set never takes part (the official code selects on test accuracy).
    init_from: stage 2's stage-1 weights: a checkpoint directory or a stage-1 run directory
        (default ``<run_dir>/stage1``).
    checkpoint_every_epochs: checkpoint cadence of both stages (resume granularity).
    """

    run_dir: str = "runs/trap_replace"
    arch: str = "wrn16_1"
    base_width: int = 16
    stem_end_block: int = 5
    decoder_channels: int = 32
    rec_weight: float = 10.0
    tv_weight: float = 1.0
    head_dropout: float = 0.5
    cutmix_beta: float = 1.0
    cutmix_prob: float = 1.0
    label_smoothing: float = 0.1
    selection: Literal["last", "holdout_val"] = "last"
    val_fraction: float = 0.1
    val_every_epochs: int = 5
    init_from: str | None = None
    checkpoint_every_epochs: int = 5
    poison: PoisonCfg = field(default_factory=PoisonCfg)
    data: DataCfg = field(default_factory=DataCfg)
    stage1: OptimCfg = field(default_factory=OptimCfg)
    stage2: OptimCfg = field(default_factory=_stage2_optim)
    train: TrainConfig = field(default_factory=_runtime_defaults)

    def validate(self, where: str = "trap_replace") -> None:
        try:
            valid = valid_stem_ends(self.arch)
        except ValueError as err:
            raise ConfigError(f"{where}.arch: {err}") from None
        if self.stem_end_block not in valid:
            raise ConfigError(
                f"{where}.stem_end_block={self.stem_end_block} is not supported by arch={self.arch!r}; "
                f"valid values: {list(valid)}"
            )
        if self.rec_weight < 0 or self.tv_weight < 0:
            raise ConfigError(f"{where}: rec_weight and tv_weight must be >= 0")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"{where}.head_dropout={self.head_dropout} must be in [0, 1)")
        if not 0.0 <= self.cutmix_prob <= 1.0 or self.cutmix_beta < 0:
            raise ConfigError(f"{where}: cutmix_prob must be in [0, 1] and cutmix_beta >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0 or self.val_every_epochs < 1:
            raise ConfigError(f"{where}: val_fraction in (0, 1) and val_every_epochs >= 1 required")
        if self.checkpoint_every_epochs < 1:
            raise ConfigError(f"{where}.checkpoint_every_epochs must be >= 1")

    @property
    def with_decoder(self) -> bool:
        return self.rec_weight > 0 or self.tv_weight > 0
