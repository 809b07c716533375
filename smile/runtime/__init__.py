"""smile.runtime: the shared training runtime (DeepSpeed ZeRO with MoE-aware groups, typed
config, checkpoints with verified resume, metrics) that the pretraining job and the zoo use."""

from smile.runtime.checkpoint import CheckpointError, latest_checkpoint, verify_all
from smile.runtime.config import (
    CheckpointConfig,
    ConfigError,
    DistConfig,
    EMAConfig,
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
from smile.runtime.ema import load_ema_weights
from smile.runtime.export import export_pretrained, load_weights
from smile.runtime.lock import RunLockedError
from smile.runtime.trainer import FitResult, StepContext, Trainer, TrainingFailedError

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DistConfig",
    "EMAConfig",
    "FitResult",
    "LogConfig",
    "OptimizerConfig",
    "ParamGroupConfig",
    "RunLockedError",
    "ScheduleConfig",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "TrainingFailedError",
    "apply_overrides",
    "config_to_dict",
    "export_pretrained",
    "from_dict",
    "init_distributed",
    "latest_checkpoint",
    "load_config",
    "load_ema_weights",
    "load_weights",
    "verify_all",
]
