"""The zoo entry points of Trap and Replace: train both stages from a config, evaluate a stage
(``smile.models.registry`` points here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smile.models.trap_replace.config import TrapReplaceConfig
from smile.models.trap_replace.stages import StageResult, evaluate_stage, train_stage1, train_stage2


def train(cfg: TrapReplaceConfig, stages: Sequence[int] = (1, 2), **kwargs: Any) -> list[StageResult]:
    """The defense: stage 1 (bait and trap on the poisoned set), then stage 2 (replace the head on
    the clean holdout); ``stages=(2,)`` runs stage 2 on a finished stage 1. ``kwargs`` (``dataset``,
    ``hard_images``, ``evaluate``) go to each stage."""
    if not stages or any(stage not in (1, 2) for stage in stages):
        raise ValueError(f"trap_replace: stages must be 1 and/or 2, got {list(stages)}")
    runs = {1: train_stage1, 2: train_stage2}
    return [runs[stage](cfg, **kwargs) for stage in stages]


def evaluate(cfg: TrapReplaceConfig, stage: int = 2, **kwargs: Any) -> dict[str, Any]:
    """CA and ASR of a finished stage (default 2, the defended model) on the test sets."""
    return evaluate_stage(cfg, stage, **kwargs)
