"""The design-space search: greedy progressive refinement (Chen et al., 2023; paper, abstract).

Stages run in order: layer grouping, parameter allocation, tunable groups, strategy assignment
(one group after another). At a stage every choice is scored by the mean over ``n_samples``
designs sampled from the current space with that choice fixed and the still-free components drawn
at random, each trained for ``short_train_steps``. A design's score is its held-out metric
averaged over the search's tasks: the paper picks each design choice by its average performance
over a set of tasks (GLUE), not by one task. The best choice is fixed before the next stage, so
the space shrinks stage by stage. The choice lists are configurable; their defaults are this
implementation's reading of the paper, not copied from it.

Ties: choices whose scores lie within ``tie_tolerance`` of the best are tied. A tie goes to the
choice whose sampled designs have fewer trainable parameters on average (the cheaper design when
quality cannot tell them apart), then to the choice listed first in the stage's configured choice
list. Every tie is logged as a warning and recorded in the stage's history entry.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smile.models.peft_design_spaces.allocation import BudgetError
from smile.models.peft_design_spaces.config import (
    ALLOCATIONS,
    GROUPINGS,
    STRATEGIES,
    DesignSpaceConfig,
    group_sizes_for,
)

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("grouping", "allocation", "tunable_groups", "strategies")


def all_strategy_sets() -> list[list[str]]:
    """Every non-empty subset of the four strategies (15)."""
    return [list(c) for r in range(1, len(STRATEGIES) + 1) for c in itertools.combinations(STRATEGIES, r)]


@dataclass
class SearchConfig:
    """Options of ``smile zoo peft_design_spaces search`` (and ``train --search``).

    tunable_groups: candidate sets of tuned groups, 1-based (e.g. [1, 2] tunes G1 and G2).
    strategy_sets: candidate strategy sets per group; empty means all 15 non-empty subsets.
    tasks: tasks of ``data.benchmark`` whose held-out metrics a design's score averages (each
        task's own metric, as the GLUE average does); empty means ``data.task`` alone.
    holdout_fraction / max_holdout_samples: the held-out split each task's candidates are scored
        on, carved from its training split with ``seed`` (candidates train on the rest); the eval
        split stays untouched for the final report.
    tie_tolerance: scores within this of the best count as tied (0: exactly equal); see the
        module docstring for the tie rule.
    """

    n_samples: int = 4
    short_train_steps: int = 100
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    num_groups: int = 4
    groupings: list[str] = field(default_factory=lambda: list(GROUPINGS))
    allocations: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    tunable_groups: list[list[int]] = field(
        default_factory=lambda: [[1], [2], [3], [4], [1, 2], [3, 4], [1, 2, 3, 4]]
    )
    strategy_sets: list[list[str]] = field(default_factory=list)
    seed: int = 0
    max_tries: int = 20
    tasks: list[str] = field(default_factory=list)
    holdout_fraction: float = 0.1
    max_holdout_samples: int | None = None
    tie_tolerance: float = 0.0

    def validate(self, where: str = "search") -> None:
        for name in ("n_samples", "short_train_steps", "num_groups", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"{where}.holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if self.max_holdout_samples is not None and self.max_holdout_samples < 1:
            raise ValueError(f"{where}.max_holdout_samples={self.max_holdout_samples} must be >= 1")
        if self.tie_tolerance < 0:
            raise ValueError(f"{where}.tie_tolerance={self.tie_tolerance} must be >= 0")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{where}.tasks={self.tasks} lists a task twice")
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"{where}.stages has {stage!r}; allowed: {', '.join(STAGES)}")
        for name, allowed in (("groupings", GROUPINGS), ("allocations", ALLOCATIONS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{where}.{name}={getattr(self, name)}: choose from {', '.join(allowed)}")
        for groups in self.tunable_groups:
            if not groups or any(not 1 <= g <= self.num_groups for g in groups):
                raise ValueError(
                    f"{where}.tunable_groups entry {groups} must list groups 1..{self.num_groups}"
                )
        for strategies in self.strategy_sets:
            if not strategies or set(strategies) - set(STRATEGIES):
                raise ValueError(
                    f"{where}.strategy_sets entry {strategies}: a non-empty subset of {STRATEGIES}"
                )


@dataclass
class DesignSpace:
    """The current space: fixed components, and the base design (budget, targets, widths)."""

    base: DesignSpaceConfig
    num_layers: int
    num_groups: int = 4
    grouping: str | None = None
    allocation: str | None = None
    tuned: tuple[int, ...] | None = None  # 1-based
    strategies: dict[int, tuple[str, ...]] = field(default_factory=dict)  # group (1-based) -> strategies

    def sample(self, rng: random.Random, config: SearchConfig) -> DesignSpaceConfig:
        """A design from this space: fixed components kept, free ones drawn at random."""
        grouping = self.grouping or rng.choice(config.groupings)
        allocation = self.allocation or rng.choice(config.allocations)
        tuned = self.tuned or tuple(rng.choice(config.tunable_groups))
        sets = config.strategy_sets or all_strategy_sets()
        per_group = []
        for g in range(1, self.num_groups + 1):
            if g not in tuned:
                per_group.append([])
            else:
                per_group.append(list(self.strategies.get(g) or rng.choice(sets)))
        return self._design(grouping, allocation, per_group)

    def design(self) -> DesignSpaceConfig:
        """The design the fixed components describe (unfixed ones: spindle, uniform, all groups and
        the base design's strategies)."""
        base_sets = self.base.strategies_per_group
        per_group = []
        for g in range(1, self.num_groups + 1):
            if self.tuned is not None and g not in self.tuned:
                per_group.append([])
            else:
                fallback = base_sets[g - 1] if len(base_sets) == self.num_groups else list(STRATEGIES)
                per_group.append(list(self.strategies.get(g) or fallback))
        return self._design(self.grouping or "spindle", self.allocation or "uniform", per_group)

    def _design(self, grouping: str, allocation: str, per_group: list[list[str]]) -> DesignSpaceConfig:
        return dataclasses.replace(
            self.base,
            group_sizes=group_sizes_for(grouping, self.num_layers, self.num_groups),
            allocation=allocation,
            strategies_per_group=per_group,
            tune_all_groups=all(per_group),
        )


@dataclass
class SearchResult:
    best: DesignSpaceConfig
    space: DesignSpace
    history: list[dict[str, Any]]


@dataclass
class Trial:
    """One sampled design trained briefly: its held-out metric per search task and its size."""

    scores: dict[str, float]
    trainable_params: float

    @property
    def score(self) -> float:
        """The selection criterion: the average over the search's tasks."""
        return sum(self.scores.values()) / len(self.scores)


Evaluate = Callable[[DesignSpaceConfig, int], Trial]


class DesignSpaceSearch:
    """Greedy stage-wise refinement of ``space`` (see the module docstring)."""

    def __init__(
        self, space: DesignSpace, n_samples: int, short_train_steps: int, config: SearchConfig | None = None
    ) -> None:
        self.space = dataclasses.replace(space, strategies=dict(space.strategies))
        self.config = dataclasses.replace(
            config or SearchConfig(), n_samples=n_samples, short_train_steps=short_train_steps
        )
        self.config.validate()
        self.history: list[dict[str, Any]] = []

    def _choices(self, stage: str) -> list[tuple[str, Callable[[DesignSpace], DesignSpace]]]:
        """(label, space with that choice fixed) for one stage (strategies: one entry per group)."""
        cfg, replace = self.config, dataclasses.replace
        if stage == "grouping":
            return [(g, lambda s, g=g: replace(s, grouping=g)) for g in cfg.groupings]
        if stage == "allocation":
            return [(a, lambda s, a=a: replace(s, allocation=a)) for a in cfg.allocations]
        return [(str(t), lambda s, t=tuple(t): replace(s, tuned=t)) for t in cfg.tunable_groups]

    def _score(self, space: DesignSpace, evaluate: Evaluate, rng: random.Random) -> dict[str, Any]:
        """Mean score, per-task mean scores and mean trainable parameters of ``n_samples`` designs."""
        trials, designs = [], []
        for _ in range(self.config.n_samples):
            for _ in range(self.config.max_tries):
                design = space.sample(rng, self.config)
                try:
                    trials.append(evaluate(design, self.config.short_train_steps))
                except BudgetError:  # the budget cannot size a sampled strategy set: draw again
                    continue
                designs.append(dataclasses.asdict(design))
                break
        if not trials:
            return {
                "score": float("-inf"),
                "task_scores": {},
                "trainable_params": float("inf"),
                "designs": [],
            }
        tasks = list(trials[0].scores)
        return {
            "score": sum(t.score for t in trials) / len(trials),
            "task_scores": {k: sum(t.scores[k] for t in trials) / len(trials) for k in tasks},
            "trainable_params": sum(t.trainable_params for t in trials) / len(trials),
            "designs": designs,
        }

    def _pick(self, name: str, results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
        """The best choice, and a record of the tie when several share the best score."""
        top = max(r["score"] for r in results.values())
        if top == float("-inf"):
            raise ValueError(
                f"search stage {name}: no sampled design fits the budget; raise param_budget_ratio"
            )
        order = list(results)  # the configured choice order
        tied = [k for k in order if results[k]["score"] >= top - self.config.tie_tolerance]
        if len(tied) == 1:
            return tied[0], None
        best = min(tied, key=lambda k: (results[k]["trainable_params"], order.index(k)))
        tie = {
            "choices": tied,
            "scores": {k: results[k]["score"] for k in tied},
            "trainable_params": {k: results[k]["trainable_params"] for k in tied},
            "rule": "fewer trainable parameters, then the configured choice order",
            "chosen": best,
        }
        log.warning(
            "search stage %s: %d choices tie at score %.6g (tolerance %g): %s; chose %r by %s",
            name,
            len(tied),
            top,
            self.config.tie_tolerance,
            ", ".join(f"{k} ({results[k]['trainable_params']:.0f} trainable)" for k in tied),
            best,
            tie["rule"],
        )
        return best, tie

    def _stage(self, name: str, options, evaluate: Evaluate, rng: random.Random) -> None:
        results = {label: self._score(fix(self.space), evaluate, rng) for label, fix in options}
        best, tie = self._pick(name, results)
        self.space = dict(options)[best](self.space)
        self.history.append(
            {
                "stage": name,
                "chosen": best,
                "tie": tie,
                "scores": {k: v["score"] for k, v in results.items()},
                "task_scores": {k: v["task_scores"] for k, v in results.items()},
                "trainable_params": {k: v["trainable_params"] for k, v in results.items()},
                "samples": {k: v["designs"] for k, v in results.items()},
            }
        )

    def run(self, evaluate: Evaluate) -> SearchResult:
        """Search with ``evaluate(design, steps) -> Trial`` (held-out metrics, higher is better)."""
        rng = random.Random(self.config.seed)
        for stage in self.config.stages:
            if stage != "strategies":
                self._stage(stage, self._choices(stage), evaluate, rng)
                continue
            sets = self.config.strategy_sets or all_strategy_sets()
            for g in range(1, self.space.num_groups + 1):
                if self.space.tuned is not None and g not in self.space.tuned:
                    continue
                options = [
                    (
                        ",".join(s),
                        lambda sp, g=g, s=tuple(s): dataclasses.replace(
                            sp, strategies={**sp.strategies, g: s}
                        ),
                    )
                    for s in sets
                ]
                self._stage(f"strategies G{g}", options, evaluate, rng)
        return SearchResult(self.space.design(), self.space, self.history)
