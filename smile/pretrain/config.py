"""The pretraining job's typed configuration: model, MoE layers, data and the runtime's TrainConfig.

The defaults are the README's tiny job (a 2+2-layer T5 with SMILE routing, span corruption on the
embedded corpus), so ``smile train`` with no config file runs it; ``configs/*.yaml`` hold the
cluster runs. Loading and overrides go through the runtime's loader (``model.d_model=256``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smile.data import DataConfig
from smile.moe import MoEConfig
from smile.runtime import (
    CheckpointConfig,
    ConfigError,
    LogConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    from_dict,
)
from smile.runtime.config import merge_mappings, read_mapping

FAMILY_OBJECTIVE = {"t5": "span_corruption", "gpt2": "causal_lm", "llama": "causal_lm"}


@dataclass
class ModelConfig:
    """The transformers model that ``smile.hf.moefy.moefy`` makes MoE.

    family: "t5" (encoder-decoder, span corruption, Switch-Transformer style), "gpt2" or
        "llama" (decoder-only, causal LM).
    init_from: a local transformers directory to start from instead of random weights: a
        SwitchTransformers checkpoint (imported into the expert-parallel layout; needs
        moe.router='switch') or a dense checkpoint of ``family`` (its FFNs are then swapped).
    vocab_size: None takes the tokenizer's size; a larger value pads the embedding.
    d_ff: hidden width of each FFN and of each expert.
    num_decoder_layers: T5 decoder depth (None: num_layers).
    d_kv: T5 attention head width (None: d_model // num_heads).
    num_kv_heads: Llama grouped-query heads (None: num_heads).
    max_seq_len: longest sequence the model takes (GPT-2/Llama positions; T5 declares it).
    """

    family: Literal["t5", "gpt2", "llama"] = "t5"
    init_from: str | None = None
    vocab_size: int | None = None
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 2
    num_decoder_layers: int | None = None
    num_heads: int = 4
    d_kv: int | None = None
    num_kv_heads: int | None = None
    max_seq_len: int = 512
    dropout: float = 0.0

    def validate(self, where: str = "model") -> None:
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {value!r}")
        for name in ("vocab_size", "num_decoder_layers", "d_kv", "num_kv_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{name} must be >= 1 or null, got {value!r}")
        if self.d_kv is None and self.d_model % self.num_heads:
            raise ConfigError(f"{where}.d_model={self.d_model} must divide by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}.num_heads={self.num_heads} must divide by num_kv_heads={self.num_kv_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise ConfigError(f"{where}.init_from={self.init_from!r} is not a directory")


def _tiny_data() -> DataConfig:
    return DataConfig(
        source="embedded", objective="span_corruption", vocab_size=4096, seq_len=128, batch_size=8
    )


def _tiny_train() -> TrainConfig:
    return TrainConfig(
        run_dir="runs/pretrain",
        max_steps=60,
        zero_stage=1,
        grad_clip=1.0,
        optimizers=[
            OptimizerConfig(
                lr=2e-3,
                weight_decay=0.01,
                schedule=ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.1),
            )
        ],
        checkpoint=CheckpointConfig(every=20, keep_last=2),
        log=LogConfig(every=5),
    )


@dataclass
class JobConfig:
    """One pretraining run. ``train.micro_batch_size`` follows ``data.batch_size``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(router="bilevel"))  # the job defaults to SMILE
    data: DataConfig = field(default_factory=_tiny_data)
    train: TrainConfig = field(default_factory=_tiny_train)

    def validate(self, where: str = "job") -> None:
        expected = FAMILY_OBJECTIVE[self.model.family]
        if self.data.objective != expected:
            raise ConfigError(
                f"model.family={self.model.family!r} trains with data.objective={expected!r}, "
                f"got {self.data.objective!r}"
            )
        self.train.micro_batch_size = self.data.batch_size


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "data": DataConfig, "train": TrainConfig}


def load_job(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The job of ``path`` (YAML/TOML/JSON; None: the tiny default) with ``key=value`` overrides.

    Values a file leaves out keep the tiny default's; errors name the field as ``section.field``.
    """
    data = config_to_dict(JobConfig())
    if path is not None:
        data = merge_mappings(data, read_mapping(path))
    return job_from_dict(apply_overrides(data, overrides))


def job_from_dict(data: dict) -> JobConfig:
    """A validated job from a complete mapping (as ``config_to_dict`` writes one)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"the job has no section(s) {unknown}; sections are: {', '.join(SECTIONS)}")
    job = JobConfig(**{name: from_dict(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})
    job.validate()
    return job
