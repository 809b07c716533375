"""smile.runtime: the shared training runtime (DeepSpeed ZeRO with MoE-aware groups, typed
config, checkpoints with verified resume, metrics) that the pretraining job and the zoo use."""

from smile.runtime.checkpoint import CheckpointError, latest_checkpoint, verify_all
from smile.runtime.config import (
    CheckpointConfig,
    ConfigError,
    DistConfig,
    LogConfig,
    OptimizerConfig,
    ParamGroupConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    from_dict,
    load_config,
)
from smile.runtime.distributed import init_distributed
from smile.runtime.export import export_pretrained, load_weights
from smile.runtime.trainer import FitResult, StepContext, Trainer

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DistConfig",
    "FitResult",
    "LogConfig",
    "OptimizerConfig",
    "ParamGroupConfig",
    "ScheduleConfig",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "config_to_dict",
    "export_pretrained",
    "from_dict",
    "init_distributed",
    "latest_checkpoint",
    "load_config",
    "load_weights",
    "verify_all",
]
