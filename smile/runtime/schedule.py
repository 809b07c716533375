"""Learning-rate schedules as pure functions of an optimizer's own step count.

The lr of every parameter group is recomputed before each optimizer step from
``(schedule, step, total)``, so a schedule has no state beyond the step counter the trainer
checkpoints: resuming at step s gives exactly the lr an uninterrupted run has at step s.
"""

from __future__ import annotations

import math

from smile.runtime.config import ScheduleConfig


def warmup_steps(schedule: ScheduleConfig, total: int) -> int:
    if schedule.warmup_ratio:
        return int(math.ceil(schedule.warmup_ratio * total))
    return schedule.warmup_steps


def lr_at(schedule: ScheduleConfig, peak_lr: float, step: int, total: int) -> float:
    """The lr for optimizer step ``step`` (0-based) of a run of ``total`` steps."""
    total = schedule.total_steps or total
    warmup = warmup_steps(schedule, total)
    if step < warmup:
        if schedule.warmup_lr is not None:
            return schedule.warmup_lr
        return peak_lr * (step + 1) / (warmup + 1)
    if schedule.kind == "constant":
        return peak_lr
    decay_steps = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    floor = schedule.min_lr_ratio
    if schedule.kind == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (floor + (1.0 - floor) * factor)
