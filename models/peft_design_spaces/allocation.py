"""Trainable-parameter allocation: a total budget spread over tuned layers, then sized per strategy.

The budget counts inference-time PEFT parameters (adapter weights, LoRA factors, prefix keys
and values, BitFit biases); the task head and the training-only prefix MLP are outside it.
Each tuned layer gets its share (equal under "uniform", the paper's choice). Inside a layer,
BitFit's bias count is fixed, the rest is split equally between the sized strategies (adapter
bottleneck, prefix length, LoRA rank), rounded down, and the remainder is handed out one unit
at a time, so every layer lands within one unit of its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from smile.models.peft_design_spaces.config import STRATEGIES, GroupSpec

SIZED: tuple[str, ...] = ("adapter", "prefix", "lora")


class BudgetError(ValueError):
    """The parameter budget cannot give a strategy of a layer one unit (or BitFit its biases)."""


_UNIT_NAME = {"adapter": "adapter bottleneck", "prefix": "prefix length", "lora": "lora rank"}


@dataclass(frozen=True)
class LayerCosts:
    """Parameter cost of one unit of each sized strategy in one layer (and BitFit's fixed cost)."""

    d_model: int
    kv_dim: int
    lora_unit: int  # one LoRA rank over every target weight (global expert count)
    bitfit: int

    def unit(self, strategy: str) -> int:
        if strategy == "adapter":
            return 2 * self.d_model + 1  # one bottleneck unit: a down row, an up column, a down bias
        if strategy == "prefix":
            return 2 * self.kv_dim  # one prefix position: a key and a value
        return self.lora_unit

    def base(self, strategy: str) -> int:
        return self.d_model if strategy == "adapter" else 0  # the adapter's up bias


@dataclass
class LayerPlan:
    """Sizes of the strategies of one layer."""

    layer: int
    group: int
    strategies: tuple[str, ...]
    budget: float
    costs: LayerCosts
    sizes: dict[str, int] = field(default_factory=dict)  # adapter/prefix/lora -> units

    @property
    def params(self) -> int:
        total = self.costs.bitfit if "bitfit" in self.strategies else 0
        for strategy, n in self.sizes.items():
            total += self.costs.base(strategy) + n * self.costs.unit(strategy)
        return total


def layer_weights(allocation: str, count: int) -> list[float]:
    """Relative budget of the tuned layers, in layer order."""
    if allocation == "uniform":
        return [1.0] * count
    if allocation == "increasing":
        return [float(i + 1) for i in range(count)]
    if allocation == "decreasing":
        return [float(count - i) for i in range(count)]
    raise ValueError(f"allocation {allocation!r} unknown; allowed: uniform, increasing, decreasing")


def plan_layers(
    groups: list[GroupSpec], costs: dict[int, LayerCosts], budget: float, allocation: str
) -> list[LayerPlan]:
    """Per-layer strategy sizes for a total ``budget`` of PEFT parameters."""
    tuned = [(g, layer) for g, group in enumerate(groups) if group.strategies for layer in group.layers]
    weights = layer_weights(allocation, len(tuned))
    plans = []
    for (g, layer), w in zip(tuned, weights):
        strategies = tuple(s for s in STRATEGIES if s in groups[g].strategies)
        plan = LayerPlan(layer, g, strategies, budget * w / sum(weights), costs[layer])
        _size(plan)
        plans.append(plan)
    return plans


def _size(plan: LayerPlan) -> None:
    costs, where = plan.costs, f"layer {plan.layer} (group {plan.group + 1})"
    available = plan.budget
    if "bitfit" in plan.strategies:
        available -= costs.bitfit
        if available < 0:
            raise BudgetError(
                f"{where}: strategy 'bitfit' needs {costs.bitfit} bias parameters but the layer's budget "
                f"is {plan.budget:.0f}; raise design.param_budget_ratio or drop bitfit from the group"
            )
    sized = [s for s in SIZED if s in plan.strategies]
    if not sized:
        return
    share = available / len(sized)
    for strategy in sized:
        units = math.floor((share - costs.base(strategy)) / costs.unit(strategy))
        if units < 1:
            one = costs.unit(strategy) + costs.base(strategy)
            raise BudgetError(
                f"{where}: strategy '{strategy}' gets {share:.0f} parameters, too few for "
                f"{_UNIT_NAME[strategy]} >= 1 (one unit costs {one}); "
                f"raise design.param_budget_ratio or drop {strategy} from the group"
            )
        plan.sizes[strategy] = units
    left = plan.budget - plan.params
    grew = True
    while grew:
        grew = False
        for strategy in sized:
            if costs.unit(strategy) <= left:
                plan.sizes[strategy] += 1
                left -= costs.unit(strategy)
                grew = True
