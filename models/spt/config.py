"""Configs of ``smile zoo spt``: the method (SPTConfig), backbone, data and the job.

Hyperparameter defaults marked "placeholder" are unverified against the paper (spec §2): T0-like
values, L_m=10, S=64, Adafactor lr 1e-3 for bank-only training, 1e-4 for full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from smile.moe import MoEConfig
from smile.runtime import TrainConfig


@dataclass
class SPTConfig:
    """The SPT method.

    bank_size S / prompt_len L_m: the memory bank (placeholders 64 / 10).
    retrieval: "soft" (Σ α_s M_s, length L_m; the default, unverified) or "topk" (k prompts).
    keys: "learned" key per prompt, or "mean" of the prompt's vectors.
    query_source: "template" (the discrete prompt's tokens, the paper) or "input" (ablation).
    train_backbone: setting A trains the full LM with the bank; setting B stage 1 freezes it.
    fixed_prompt_len: an extra task-agnostic soft prompt before the retrieved one (0: none).
    bank_lr_scale: lr multiplier of the bank's own parameter group (the runtime's
        ``ParamGroupConfig.lr_scale``), e.g. 10 for bank 1e-3 over backbone 1e-4 (placeholder).
    init_bank: a bank.safetensors to start from (setting B: the GLUE-pretrained bank).
    template_in_input: the encoder also reads the template tokens (the paper's input). False
        keeps them only as the retrieval query (masked out of the encoder's attention): a
        diagnostic setting in which the task reaches the model through the retrieved prompt
        alone (the README's learning numbers use both).
    """

    backbone_path: str | None = None
    bank_size: int = 64
    prompt_len: int = 10
    retrieval: Literal["soft", "topk"] = "soft"
    top_k: int = 4
    temperature: float = 1.0
    keys: Literal["learned", "mean"] = "learned"
    query_source: Literal["template", "input"] = "template"
    query_projection: bool = False
    train_backbone: bool = True
    fixed_prompt_len: int = 0
    init_std: float = 0.5
    bank_lr_scale: float = 10.0
    init_bank: str | None = None
    template_in_input: bool = True

    def validate(self, where: str = "spt") -> None:
        for name in ("bank_size", "prompt_len", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.retrieval == "topk" and self.top_k > self.bank_size:
            raise ValueError(f"{where}: top_k={self.top_k} > bank_size={self.bank_size}")
        if self.temperature <= 0:
            raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")
        if self.fixed_prompt_len < 0:
            raise ValueError(f"{where}.fixed_prompt_len must be >= 0, got {self.fixed_prompt_len}")


@dataclass
class ModelConfig:
    """A random tiny T5 (``random_config``, offline, word-level tokenizer) when
    ``spt.backbone_path`` is unset; ``moe`` swaps its FFNs for smile MoE layers."""

    random_config: dict[str, Any] = field(default_factory=dict)
    moe: MoEConfig | None = None


@dataclass
class DataConfig:
    """Where the prompted examples come from.

    source: "synthetic" (offline tasks copy / reverse / first with distinct templates),
        "p3" (promptsource-rendered JSONL files under data_dir, fields template_text, input,
        target, choices; or HF dataset ids, e.g. bigscience/P3 subsets, read with cache_dir),
        "glue" (GLUE / SuperGLUE through HF datasets, tasks as "glue/rte", "super_glue/cb";
        data_dir: a local copy of the hub repositories, <data_dir>/<benchmark>/<task>/*.parquet).
    tasks / heldout: training tasks and held-out evaluation tasks (never trained on).
    """

    source: Literal["synthetic", "p3", "glue"] = "synthetic"
    tasks: list[str] = field(default_factory=lambda: ["copy", "reverse", "first"])
    heldout: list[str] = field(default_factory=lambda: ["first_heldout"])
    data_dir: str | None = None
    cache_dir: str | None = None
    max_length: int = 64
    max_target_length: int = 8
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    synthetic_train: int = 512
    synthetic_eval: int = 128
    synthetic_seq_len: int = 3
    synthetic_symbols: int = 8

    def validate(self, where: str = "data") -> None:
        if not self.tasks:
            raise ValueError(f"{where}.tasks must name at least one training task")
        overlap = sorted(set(self.tasks) & set(self.heldout))
        if overlap:
            raise ValueError(f"{where}: held-out tasks {overlap} are also training tasks")
        for name in ("max_length", "max_target_length", "synthetic_seq_len", "synthetic_symbols"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class JobConfig:
    """``smile zoo spt`` config. setting: "multitask" (setting A: train on ``data.tasks``, zero-shot
    rank classification on ``data.heldout``) or "glue2superglue" (setting B: stage 1 pretrains
    the bank with the LM frozen on ``data``; stage 2 fine-tunes on ``finetune_data``)."""

    setting: Literal["multitask", "glue2superglue"] = "multitask"
    spt: SPTConfig = field(default_factory=SPTConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_data: DataConfig | None = None
    finetune_train: TrainConfig | None = None

    def validate(self, where: str = "job") -> None:
        self.spt.validate(f"{where}.spt")
        self.data.validate(f"{where}.data")
        if (self.spt.backbone_path is None) == (not self.model.random_config):
            raise ValueError(
                f"{where}: set exactly one of spt.backbone_path (a from_pretrained directory) and "
                "model.random_config (a random tiny T5)"
            )
        if self.setting == "glue2superglue" and (self.finetune_data is None or self.finetune_train is None):
            raise ValueError(f"{where}: setting=glue2superglue needs finetune_data and finetune_train")
