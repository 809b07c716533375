"""Typed configuration of AIM. Defaults are the paper's K400 ViT-B/16 setting (s=0.5, drop path
0.2, AdamW 3e-4 / wd 0.05, cosine with 2.5 warmup epochs, 30 epochs, 8 clips per GPU, 3x1 views);
``train`` holds the shared runtime's knobs (run_dir, ZeRO, precision, logging)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smile.moe import MoEConfig
from smile.runtime import CheckpointConfig, ConfigError, LogConfig, TrainConfig

SOURCES = ("video_list", "motion")
SAMPLINGS = ("interval", "uniform")


@dataclass
class VideoData:
    """One split of a video classification set.

    source: video_list (``list_file`` of ``<path> <label>`` lines, paths relative to ``root``;
        Kinetics-400/700, SSv2 and Diving-48 are all distributed or converted this way) or
        motion (offline synthetic moving-square clips, see synthetic.py).
    sampling: interval (dense: ``num_frames`` frames ``frame_interval`` apart, K400) or uniform
        (TSN segments: one frame from each of ``num_frames`` equal segments, SSv2).
    """

    source: Literal["video_list", "motion"] = "video_list"
    root: str = ""
    list_file: str | None = None
    sampling: Literal["interval", "uniform"] = "interval"
    frame_interval: int = 4
    size: int = 0
    motion_classes: int = 4
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.source == "video_list" and not self.list_file:
            raise ConfigError(f"{where}.list_file must name a '<path> <label>' list for source video_list")
        if self.frame_interval < 1:
            raise ConfigError(f"{where}.frame_interval={self.frame_interval} must be >= 1")
        if self.source == "motion" and self.size < 1:
            raise ConfigError(f"{where}.size={self.size} must be >= 1 clips for source motion")


def _runtime_defaults() -> TrainConfig:
    # Only the adapters, temporal embedding, ln_post and head are saved (a few MB for ViT-B/16);
    # the frozen CLIP is rebuilt from vit_path and checked by sha256 on resume.
    return TrainConfig(
        run_dir="runs/aim",
        grad_clip=0.0,
        checkpoint=CheckpointConfig(trainable_only=True, keep_last=2),
        log=LogConfig(every=50),
    )


@dataclass
class AIMConfig:
    """AIM end to end (names as in the spec / official code).

    vit_path: a local ``CLIPVisionModel`` / ``CLIPModel`` ``save_pretrained`` directory.
    adapter_ratio: bottleneck width as a fraction of D (0.25).
    joint_scale: s, the scale of the joint (MLP-parallel) adapter (K400 0.5, SSv2 1.0).
    num_tadapter: 1 (K400) or 2 (SSv2: an extra skip adapter before the temporal attention).
    temporal: false is the ablation without temporal adaptation (no T_Adapter, no temporal
        embedding): the frozen image model with spatial + joint adapters, a bag of frames.
    moe: if set, the joint adapter is a top-1 mixture of adapters on smile's MoE layer.
    batch_size: global clips per step; test_clips x test_crops: views averaged at test time.
    max_steps: None trains ``epochs`` epochs; a number overrides it (tiny runs).
    schedule_steps: the cosine horizon (None: the steps of this run); set it to stop a run early
        (or resume it later) on the schedule of the longer run.
    """

    vit_path: str = "pretrained/clip-vit-base-patch16"
    num_frames: int = 8
    num_classes: int = 400
    adapter_ratio: float = 0.25
    joint_scale: float = 0.5
    num_tadapter: int = 1
    drop_path: float = 0.2
    head_dropout: float = 0.5
    temporal: bool = True
    moe: MoEConfig | None = None
    lr: float = 3e-4
    wd: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 30
    warmup_epochs: float = 2.5
    batch_size: int = 8
    max_steps: int | None = None
    schedule_steps: int | None = None
    test_clips: int = 3
    test_crops: int = 1
    augment: bool = True
    num_workers: int = 0
    data: VideoData = field(default_factory=lambda: VideoData(list_file="data/k400/train.txt"))
    eval_data: VideoData | None = None
    train: TrainConfig = field(default_factory=_runtime_defaults)

    def validate(self, where: str = "aim") -> None:
        check_model_options(self.adapter_ratio, self.num_tadapter, self.num_frames, where)
        if self.num_classes < 2 or self.batch_size < 1 or self.lr <= 0 or self.epochs < 1:
            raise ConfigError(f"{where}: num_classes >= 2, batch_size >= 1, lr > 0, epochs >= 1 required")
        if not 0 <= self.drop_path < 1 or not 0 <= self.head_dropout < 1:
            raise ConfigError(f"{where}: drop_path and head_dropout must be in [0, 1)")
        if self.test_clips < 1 or self.test_crops not in (1, 3):
            raise ConfigError(f"{where}: test_clips >= 1 and test_crops in (1, 3) required")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps={self.max_steps} must be >= 1 or null")
        if self.moe is not None and self.moe.router != "switch":
            raise ConfigError(
                f"{where}.moe.router={self.moe.router!r}: the mixture of adapters is top-1 (switch)"
            )
        self.data.validate(f"{where}.data")
        if self.eval_data is not None:
            self.eval_data.validate(f"{where}.eval_data")


def check_model_options(adapter_ratio: float, num_tadapter: int, num_frames: int, where: str = "aim") -> None:
    """The spec's bad inputs, one line each (ConfigError is a ValueError)."""
    if not adapter_ratio > 0:
        raise ConfigError(f"{where}.adapter_ratio={adapter_ratio} must be > 0")
    if num_tadapter not in (1, 2):
        raise ConfigError(f"{where}.num_tadapter={num_tadapter} is not allowed; allowed values: 1, 2")
    if num_frames < 1:
        raise ConfigError(f"{where}.num_frames={num_frames} must be >= 1")
