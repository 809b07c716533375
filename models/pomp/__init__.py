"""POMP (Ren et al., NeurIPS 2023): prompt pre-training over ~20K classes with local contrast and
local correction, on a frozen transformers CLIPModel. ``smile zoo pomp train|eval``."""

from smile.models.pomp.config import DataCfg, POMPConfig
from smile.models.pomp.local_contrast import (
    correction_shift,
    local_contrast_logits,
    local_contrast_loss,
    sample_negatives,
    step_generator,
)
from smile.models.pomp.model import POMPModel
from smile.models.pomp.prompt import PromptLearner

__all__ = [
    "DataCfg",
    "POMPConfig",
    "POMPModel",
    "PromptLearner",
    "correction_shift",
    "local_contrast_logits",
    "local_contrast_loss",
    "sample_negatives",
    "step_generator",
]
