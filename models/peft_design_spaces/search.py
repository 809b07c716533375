"""The design-space search: greedy progressive refinement (Chen et al., 2023, Section 3).

Stages run in order: layer grouping, parameter allocation, tunable groups, strategy assignment
(one group after another). At a stage every choice is scored by the mean validation metric of
``n_samples`` designs sampled from the current space with that choice fixed and the still-free
components drawn at random, each trained for ``short_train_steps``. The best choice is fixed
before the next stage, so the space shrinks stage by stage. The choice lists are configurable;
their defaults are this implementation's reading of the paper, not copied from it.
"""

from __future__ import annotations

import dataclasses
import itertools
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

STAGES: tuple[str, ...] = ("grouping", "allocation", "tunable_groups", "strategies")


def all_strategy_sets() -> list[list[str]]:
    """Every non-empty subset of the four strategies (15)."""
    return [list(c) for r in range(1, len(STRATEGIES) + 1) for c in itertools.combinations(STRATEGIES, r)]


@dataclass
class SearchConfig:
    """Options of ``smile zoo peft_design_spaces search`` (and ``train --search``).

    tunable_groups: candidate sets of tuned groups, 1-based (e.g. [1, 2] tunes G1 and G2).
    strategy_sets: candidate strategy sets per group; empty means all 15 non-empty subsets.
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

    def validate(self, where: str = "search") -> None:
        for name in ("n_samples", "short_train_steps", "num_groups", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
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


Evaluate = Callable[[DesignSpaceConfig, int], float]


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

    def _score(self, space: DesignSpace, evaluate: Evaluate, rng: random.Random) -> tuple[float, list]:
        scores, designs = [], []
        for _ in range(self.config.n_samples):
            for _ in range(self.config.max_tries):
                design = space.sample(rng, self.config)
                try:
                    scores.append(float(evaluate(design, self.config.short_train_steps)))
                except BudgetError:  # the budget cannot size a sampled strategy set: draw again
                    continue
                designs.append(dataclasses.asdict(design))
                break
        mean = sum(scores) / len(scores) if scores else float("-inf")
        return mean, designs

    def _stage(self, name: str, options, evaluate: Evaluate, rng: random.Random) -> None:
        results = {}
        for label, fix in options:
            score, designs = self._score(fix(self.space), evaluate, rng)
            results[label] = {"score": score, "designs": designs}
        best = max(results, key=lambda k: results[k]["score"])
        if results[best]["score"] == float("-inf"):
            raise ValueError(
                f"search stage {name}: no sampled design fits the budget; raise param_budget_ratio"
            )
        self.space = dict(options)[best](self.space)
        self.history.append(
            {
                "stage": name,
                "chosen": best,
                "scores": {k: v["score"] for k, v in results.items()},
                "samples": {k: v["designs"] for k, v in results.items()},
            }
        )

    def run(self, evaluate: Evaluate) -> SearchResult:
        """Search with ``evaluate(design, steps) -> validation metric`` (higher is better)."""
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
