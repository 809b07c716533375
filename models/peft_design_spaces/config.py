"""A point in the PEFT design space: layer grouping, parameter allocation, tunable groups and
per-group strategy assignment (Chen et al., ICLR 2023), as a typed, validated config.

The paper's four components map to fields here:
  layer grouping        -> ``group_sizes`` (consecutive layers; :func:`group_sizes_for` makes patterns)
  parameter allocation  -> ``param_budget_ratio`` + ``allocation``
  tunable groups        -> a group with an empty strategy list is frozen (needs ``tune_all_groups=False``)
  strategy assignment   -> ``strategies_per_group``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Paper, abstract: the strategy pool is Adapter, Prefix, BitFit and LoRA, and the discovered
# patterns are (i) spindle grouping, (ii) uniform allocation, (iii) tune all groups, (iv) a
# strategy set per group. Those four facts are checked against the abstract; everything finer
# (sizes, per-group sets, budgets of other backbones) is marked where it is defined.
STRATEGIES: tuple[str, ...] = ("adapter", "prefix", "bitfit", "lora")
# spec: unverified, chosen because the paper's design space compares uniform allocation with
# allocations that grow or shrink with depth, and these are the two monotone alternatives.
ALLOCATIONS: tuple[str, ...] = ("uniform", "increasing", "decreasing")
# spec: unverified, chosen because the paper's grouping stage contrasts spindle with other
# shapes; these five (incl. its mirror, bottleneck) are the simple shapes of 4 consecutive groups.
GROUPINGS: tuple[str, ...] = ("increasing", "uniform", "decreasing", "spindle", "bottleneck")
# spec: unverified, chosen because Houlsby-style adapters use one of these nonlinearities; relu
# is the default.
ADAPTER_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "tanh")

# The S4 strategy assignment, from the spec (Section 2) as recalled for T5-base: G1 Adapter+LoRA,
# G2 Adapter+Prefix, G3 Adapter+Prefix+BitFit, G4 Prefix+BitFit+LoRA.
# spec: unverified, chosen because it is the spec's recollection of the paper's S4-model (its
# strategy-assignment stage) and no copy of the paper's tables was available to check it;
# RoBERTa uses the same sets for lack of a checked alternative.
S4_STRATEGIES: tuple[tuple[str, ...], ...] = (
    ("adapter", "lora"),
    ("adapter", "prefix"),
    ("adapter", "prefix", "bitfit"),
    ("prefix", "bitfit", "lora"),
)


@dataclass
class GroupSpec:
    """One group of consecutive layers and the strategies every layer in it gets."""

    layers: list[int]
    strategies: set[str]


def _pattern_weights(pattern: str, num_groups: int) -> list[int]:
    if pattern == "uniform":
        return [1] * num_groups
    if pattern == "increasing":
        return list(range(1, num_groups + 1))
    if pattern == "decreasing":
        return list(range(num_groups, 0, -1))
    spindle = [1 + min(i, num_groups - 1 - i) for i in range(num_groups)]
    if pattern == "spindle":
        return spindle
    if pattern == "bottleneck":
        return [max(spindle) + 1 - w for w in spindle]
    raise ValueError(f"grouping pattern {pattern!r} unknown; allowed: {', '.join(GROUPINGS)}")


def group_sizes_for(pattern: str, num_layers: int, num_groups: int = 4) -> list[int]:
    """Split ``num_layers`` consecutive layers into ``num_groups`` groups shaped like ``pattern``.

    Spindle is (1, 2, 2, 1) in proportion (fewer layers in the outer groups, the shape the
    paper's abstract names): (2, 4, 4, 2) for 12 layers. spec: unverified, chosen because the spec
    gives (2, 4, 4, 2) as the default for L=12 and 1:2:2:1 is the smallest integer spindle; the
    paper's exact sizes per backbone were not checked. Pass ``group_sizes`` to override. Sizes are
    rounded by largest remainder and every group keeps at least one layer.
    """
    if num_groups < 1 or num_layers < num_groups:
        raise ValueError(f"cannot split {num_layers} layers into {num_groups} non-empty groups")
    weights = _pattern_weights(pattern, num_groups)
    exact = [num_layers * w / sum(weights) for w in weights]
    sizes = [max(1, int(x)) for x in exact]
    order = sorted(range(num_groups), key=lambda i: (-(exact[i] - int(exact[i])), i))
    i = 0
    while sum(sizes) < num_layers:
        sizes[order[i % num_groups]] += 1
        i += 1
    while sum(sizes) > num_layers:
        j = max(range(num_groups), key=lambda g: (sizes[g] - exact[g], sizes[g]))
        sizes[j] -= 1
    return sizes


@dataclass
class DesignSpaceConfig:
    """One PEFT design (an S4 model is the default).

    backbone_path: local ``from_pretrained`` directory of the T5 / RoBERTa backbone (None when the
        job builds a randomly initialised backbone from ``model.random_config``).
    group_sizes: layers per consecutive group (must sum to the backbone's layer count: encoder
        then decoder blocks for T5); None means the spindle pattern over 4 groups.
    strategies_per_group: for each group, a subset of adapter / prefix / bitfit / lora.
    param_budget_ratio: PEFT parameters (inference-time count, head excluded) over backbone
        parameters; 0.5% for T5-base in the paper (per a secondary summary).
    allocation: how the budget is spread over the tuned layers; the paper's finding is uniform.
    lora_targets: weights LoRA adapts in each LoRA layer: aliases q, k, v, o (self-attention),
        experts (w_in and w_out of smile MoE experts), router (MoE router projections), or a glob
        over parameter names inside the layer (e.g. ``experts.w_in``).
    prefix_mlp_hidden: hidden width of the MLP that reparameterises prefixes during training
        (Li & Liang 2021); 0 trains the key/value prefixes directly. 512: Li & Liang's prefix MLP
        width; spec: unverified against this paper, chosen because the spec names it.
    lora_alpha: LoRA scale numerator (the update is ``alpha / r * B A``). 16: spec: unverified,
        chosen because it is a common LoRA setting for r around 8 (alpha / r about 2).
    adapter_activation: the adapter's nonlinearity.
    tune_all_groups: the paper's "tune all groups" pattern; when true an empty group is an error.
    """

    backbone_path: str | None = None
    group_sizes: list[int] | None = None
    strategies_per_group: list[list[str]] = field(default_factory=lambda: [list(s) for s in S4_STRATEGIES])
    param_budget_ratio: float = 0.005
    allocation: Literal["uniform", "increasing", "decreasing"] = "uniform"
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    prefix_mlp_hidden: int = 512
    lora_alpha: float = 16.0
    adapter_activation: Literal["relu", "gelu", "tanh"] = "relu"
    tune_all_groups: bool = True

    def validate(self, where: str = "design") -> None:
        if not self.strategies_per_group:
            raise ValueError(f"{where}.strategies_per_group must list at least one group")
        for g, strategies in enumerate(self.strategies_per_group):
            unknown = sorted(set(strategies) - set(STRATEGIES))
            if unknown:
                raise ValueError(
                    f"{where}.strategies_per_group[{g}] has unknown strategy {unknown}; "
                    f"allowed: {', '.join(STRATEGIES)}"
                )
            if not strategies and self.tune_all_groups:
                raise ValueError(
                    f"{where}.strategies_per_group[{g}] is empty while tune_all_groups=true; "
                    "give the group at least one strategy or set tune_all_groups=false"
                )
        if not any(self.strategies_per_group):
            raise ValueError(f"{where}.strategies_per_group: at least one group must be tuned")
        if self.group_sizes is not None:
            if len(self.group_sizes) != len(self.strategies_per_group):
                raise ValueError(
                    f"{where}.group_sizes has {len(self.group_sizes)} groups, strategies_per_group "
                    f"{len(self.strategies_per_group)}; they must match"
                )
            if any(not isinstance(s, int) or s < 1 for s in self.group_sizes):
                raise ValueError(f"{where}.group_sizes={self.group_sizes} must be positive integers")
        if not 0.0 < self.param_budget_ratio < 1.0:
            raise ValueError(f"{where}.param_budget_ratio={self.param_budget_ratio} must be in (0, 1)")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"{where}.allocation={self.allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
        if self.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"{where}.adapter_activation={self.adapter_activation!r}; "
                f"allowed: {', '.join(ADAPTER_ACTIVATIONS)}"
            )
        if self.prefix_mlp_hidden < 0:
            raise ValueError(f"{where}.prefix_mlp_hidden={self.prefix_mlp_hidden} must be >= 0")
        if self.lora_alpha <= 0:
            raise ValueError(f"{where}.lora_alpha={self.lora_alpha} must be > 0")
        if any("lora" in s for s in self.strategies_per_group) and not self.lora_targets:
            raise ValueError(f"{where}.lora_targets must name at least one weight when a group uses lora")

    def groups(self, num_layers: int) -> list[GroupSpec]:
        """The groups over a backbone with ``num_layers`` layers."""
        self.validate()
        sizes = self.group_sizes
        if sizes is None:
            sizes = group_sizes_for("spindle", num_layers, len(self.strategies_per_group))
        if sum(sizes) != num_layers:
            raise ValueError(
                f"design.group_sizes={list(sizes)} sums to {sum(sizes)} layers, but the backbone has "
                f"{num_layers} layers"
            )
        out, start = [], 0
        for size, strategies in zip(sizes, self.strategies_per_group):
            out.append(GroupSpec(list(range(start, start + size)), set(strategies)))
            start += size
        return out


# Presets. Budget 0.5%: the paper's T5-base setting, as a secondary summary of the paper reports
# it (+2.4 GLUE over the best single PEFT method at 0.5%); for RoBERTa-base the same 0.5% is
# spec: unverified, chosen because the spec gives no other budget. Group sizes: spec: unverified,
# chosen because they are the 1:2:2:1 spindle over T5-base's 12 encoder + 12 decoder blocks
# (grouped together, encoder first) and over RoBERTa-base's 12 layers. Strategy sets: S4_STRATEGIES.
S4_T5_BASE = DesignSpaceConfig(group_sizes=[4, 8, 8, 4], param_budget_ratio=0.005)
S4_ROBERTA_BASE = DesignSpaceConfig(group_sizes=[2, 4, 4, 2], param_budget_ratio=0.005)
