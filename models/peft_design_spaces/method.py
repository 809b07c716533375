"""The zoo entry points of PEFT design spaces: train a design from a job config, evaluate a saved
PEFT artifact, search the design space (``smile.models.registry`` points here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smile.models.peft_design_spaces.config import DesignSpaceConfig
from smile.models.peft_design_spaces.search import SearchResult
from smile.models.peft_design_spaces.training import Experiment, JobConfig, run_search


def train(job: JobConfig, design: DesignSpaceConfig | None = None, *, search: bool = False) -> dict[str, Any]:
    """Train ``design`` (default: ``job.design``; ``search=True``: the design-space search's best)
    and save its PEFT artifact under ``<train.run_dir>/peft``; returns eval metrics and budget."""
    exp = Experiment(job)
    if search:
        design = run_search(exp).best
    return exp.train(design)


def evaluate(job: JobConfig, peft_dir: str | Path | None = None) -> dict[str, float]:
    """Metrics of a saved PEFT artifact (default ``<train.run_dir>/peft``) on the eval split."""
    return Experiment(job).evaluate(peft_dir or Path(job.train.run_dir) / "peft")


def search(job: JobConfig) -> SearchResult:
    """The paper's greedy design-space search."""
    return run_search(Experiment(job))
