"""Multimodal-CoT (Zhang et al., "Multimodal Chain-of-Thought Reasoning in Language Models",
TMLR 2024): a T5 whose encoder output is fused with image patch features by single-head
cross-attention and a sigmoid gate, trained in two stages (rationale, then answer)."""

from smile.models.mm_cot.config import DataCfg, MMCoTConfig, TinyT5Cfg
from smile.models.mm_cot.fusion import GatedVisionFusion, T5ForMultimodalGeneration, build_model
from smile.models.mm_cot.prompts import (
    FAILED,
    PROMPT_FORMATS,
    build_source,
    build_target,
    category_accuracy,
    extract_answer,
)

__all__ = [
    "FAILED",
    "PROMPT_FORMATS",
    "DataCfg",
    "GatedVisionFusion",
    "MMCoTConfig",
    "T5ForMultimodalGeneration",
    "TinyT5Cfg",
    "build_model",
    "build_source",
    "build_target",
    "category_accuracy",
    "extract_answer",
]
