"""Typed configuration of Multimodal-CoT: the model, one stage's prompt and optimisation, the data.

Defaults are the official code's (UnifiedQA-T5-base, ViT features (145, 1024), lr 5e-5, 20 epochs,
batch 16, input_len 512, output_len 512 for the rationale stage and 64 for the answer stage,
seed 42). ``stage`` picks the run: ``<run_dir>/rationale`` or ``<run_dir>/answer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smile.models.mm_cot.prompts import STAGE_FORMATS
from smile.models.mm_cot.synthetic import SYNTHETIC_TASKS
from smile.moe import MoEConfig
from smile.runtime import CheckpointConfig, ConfigError, LogConfig, TrainConfig

STAGES = ("rationale", "answer")
OUTPUT_LEN = {"rationale": 512, "answer": 64}


@dataclass
class TinyT5Cfg:
    """A random-init T5 for offline runs (used when ``base_model_path`` is null)."""

    d_model: int = 32
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 8
    dropout_rate: float = 0.0


@dataclass
class DataCfg:
    """Where problems and image features come from (nothing downloads unless source is hf).

    source: scienceqa (``root``/problems.json + pid_splits.json), hf (a HF ``datasets`` id or
        local copy with derek-thomas/ScienceQA's columns), synthetic (``synthetic_task``, offline).
    features_dir: ``<pid>.npy`` arrays (m, p) per problem with an image (``smile zoo mm_cot
        extract`` writes them with a local ViT from ``vit_path``).
    captions_file: official captions.json ({"captions": {pid: text}}) for ``use_caption``.
    limit: keep the first N problems of each split (smoke runs).
    """

    source: Literal["scienceqa", "hf", "synthetic"] = "scienceqa"
    root: str | None = None
    hf_path: str = "derek-thomas/ScienceQA"
    cache_dir: str | None = None
    features_dir: str | None = None
    captions_file: str | None = None
    vit_path: str | None = None
    train_split: str = "train"
    eval_split: str = "val"
    test_split: str = "test"
    limit: int | None = None
    synthetic_task: str = "image_vqa"
    synthetic_train: int = 512
    synthetic_eval: int = 256
    synthetic_signal: float = 3.0

    def validate(self, where: str = "data") -> None:
        if self.source == "scienceqa" and not self.root:
            raise ConfigError(f"{where}.root must name the folder with problems.json and pid_splits.json")
        if self.source == "synthetic" and self.synthetic_task not in SYNTHETIC_TASKS:
            raise ConfigError(
                f"{where}.synthetic_task={self.synthetic_task!r}; allowed: {', '.join(SYNTHETIC_TASKS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit={self.limit} must be >= 1")


def _runtime_defaults() -> TrainConfig:
    return TrainConfig(
        seed=42,
        zero_stage=2,
        grad_clip=1.0,
        checkpoint=CheckpointConfig(keep_last=2),
        log=LogConfig(every=50),
    )


@dataclass
class MMCoTConfig:
    """Multimodal-CoT, one stage per run.

    base_model_path: a local ``from_pretrained`` T5 directory (UnifiedQA / FLAN-Alpaca); null uses
        ``tiny`` with a word-level tokenizer built from the data (offline runs).
    prompt_format: null is the stage's default (QCM-E for rationale, QCMG-A for answer); QCM-A
        trains direct answering without a rationale (the baseline).
    output_len: null is 512 (rationale) / 64 (answer); it also bounds generation.
    max_steps: null trains ``epochs`` passes over the training split.
    rationale_file: the stage-1 predictions the answer stage reads for its eval/test splits
        (null: ``<run_dir>/rationale/predictions_<split>.json``, what rationale eval writes).
    fusion_gate: null learns the gate; 0.0 forces it shut (image ignored, the ablation).
    vision_mask: mask all-zero patches and image-less samples in the fusion (off = the paper).
    allow_missing_image: accept a missing ``image_feats`` as all-zero features.
    num_threads: torch CPU threads (1 avoids oversubscription on small shared CPUs), null: torch's.
    moe: swap the T5 FFNs (encoder and decoder) for smile MoE layers, or null.
    """

    run_dir: str = "runs/mm_cot"
    stage: Literal["rationale", "answer"] = "rationale"
    base_model_path: str | None = None
    tiny: TinyT5Cfg = field(default_factory=TinyT5Cfg)
    img_type: str = "vit"
    patch_shape: tuple[int, int] = (145, 1024)
    prompt_format: str | None = None
    input_len: int = 512
    output_len: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 20
    batch_size: int = 16
    eval_batch_size: int = 16
    max_steps: int | None = None
    num_beams: int = 1
    use_caption: bool = False
    vision_mask: bool = False
    allow_missing_image: bool = False
    fusion_gate: float | None = None
    rationale_file: str | None = None
    eval_during_training: bool = True
    num_threads: int | None = None
    data: DataCfg = field(default_factory=DataCfg)
    moe: MoEConfig | None = None
    train: TrainConfig = field(default_factory=_runtime_defaults)

    def validate(self, where: str = "mm_cot") -> None:
        allowed = STAGE_FORMATS[self.stage]
        if self.prompt_format is not None and self.prompt_format not in allowed:
            raise ConfigError(
                f"{where}.prompt_format={self.prompt_format!r} unknown for stage {self.stage!r}; "
                f"valid: {', '.join(allowed)}"
            )
        if len(self.patch_shape) != 2 or min(self.patch_shape) < 1:
            raise ConfigError(f"{where}.patch_shape={list(self.patch_shape)} must be [patches, dim] >= 1")
        for name in ("input_len", "epochs", "batch_size", "eval_batch_size", "num_beams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr={self.lr} must be > 0")
        if self.fusion_gate is not None and not 0.0 <= self.fusion_gate <= 1.0:
            raise ConfigError(f"{where}.fusion_gate={self.fusion_gate} must be in [0, 1] or null")
        self.data.validate(f"{where}.data")

    @property
    def format(self) -> str:
        return self.prompt_format or STAGE_FORMATS[self.stage][0]

    @property
    def target_len(self) -> int:
        return self.output_len or OUTPUT_LEN[self.stage]
