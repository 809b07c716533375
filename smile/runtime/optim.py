"""Optimizers from config: parameter selection, parameter groups, and one composite optimizer.

DeepSpeed drives exactly one optimizer per engine. Methods that train two networks with their
own optimizers (different types, lrs, schedules) get a :class:`MultiOptimizer`: a real
``torch.optim.Optimizer`` whose parameter groups are the union of its members' groups, each
tagged with its member's name. ZeRO flattens and partitions every group as usual and steps one
group at a time; the composite forwards each group to its member, and skips members that are
not active this step (``optimizer_mode="alternate"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from smile.runtime.config import ConfigError, OptimizerConfig

GROUP_KEY = "smile_optimizer"


@dataclass
class Selection:
    """Trainable parameters (by name) of each optimizer, in model order."""

    by_optimizer: dict[str, list[tuple[str, nn.Parameter]]]

    def names(self, optimizer: str) -> list[str]:
        return [name for name, _ in self.by_optimizer[optimizer]]


def select_parameters(model: nn.Module, configs: list[OptimizerConfig]) -> Selection:
    """Assign every trainable parameter to exactly one optimizer.

    Explicit globs claim first, in optimizer order; an optimizer listing "*" then takes every
    trainable parameter nobody claimed. Frozen parameters (``requires_grad=False``) are never
    selected. A trainable parameter left unselected, or an optimizer that selects nothing, is
    an error: either would silently train the wrong thing.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner: dict[str, str] = {}
    for catch_all in (False, True):
        for cfg in configs:
            patterns = [p for p in cfg.params if (p == "*") == catch_all]
            for name, _ in trainable:
                if name not in owner and any(fnmatchcase(name, pat) for pat in patterns):
                    owner[name] = cfg.name
    left = [n for n, _ in trainable if n not in owner]
    if left:
        raise ConfigError(
            f"trainable parameters selected by no optimizer: {left[:8]}{' ...' if len(left) > 8 else ''}; "
            "add a glob to some optimizers[].params or freeze them (requires_grad=False)"
        )
    by_optimizer = {cfg.name: [(n, p) for n, p in trainable if owner[n] == cfg.name] for cfg in configs}
    for i, cfg in enumerate(configs):
        if not by_optimizer[cfg.name]:
            raise ConfigError(
                f"optimizers[{i}] ({cfg.name!r}) selects no trainable parameter with params={cfg.params}"
            )
    return Selection(by_optimizer)


def param_groups(cfg: OptimizerConfig, named: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Group one optimizer's parameters by (lr scale, weight decay)."""
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in named:
        override = next((g for g in cfg.groups if any(fnmatchcase(name, pat) for pat in g.params)), None)
        lr_scale = override.lr_scale if override else 1.0
        decay = cfg.weight_decay
        if override is not None and override.weight_decay is not None:
            decay = override.weight_decay
        if (param.ndim < 2 and not cfg.decay_1d) or any(fnmatchcase(name, pat) for pat in cfg.no_decay):
            decay = 0.0
        buckets.setdefault((lr_scale, decay), []).append(param)
    return [
        {
            "params": params,
            "name": f"{cfg.name}.{i}",
            GROUP_KEY: cfg.name,
            "lr_scale": lr_scale,
            "lr": cfg.lr * lr_scale,
            "weight_decay": decay,
        }
        for i, ((lr_scale, decay), params) in enumerate(buckets.items())
    ]


def make_optimizer(cfg: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The torch optimizer of one config over its (already split) parameter groups."""
    if cfg.type == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.type == "adam":
        return torch.optim.Adam(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.type == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class MultiOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one (see the module docstring).

    ``param_groups`` and ``state`` are shared with the members, so DeepSpeed's ZeRO wrappers,
    which rewrite ``group["params"]`` to flat fp32 partitions, drive every member unchanged.
    """

    def __init__(self, members: dict[str, torch.optim.Optimizer]) -> None:
        groups = [g for opt in members.values() for g in opt.param_groups]
        super().__init__(groups, defaults={})
        self.members = members
        self.active: set[str] = set(members)
        self._share_state()

    def _share_state(self) -> None:
        for member in self.members.values():
            member.state = self.state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("MultiOptimizer.step does not take a closure")
        for group in self.param_groups:
            name = group[GROUP_KEY]
            if name not in self.active or not group["params"]:
                continue
            member = self.members[name]
            own = member.param_groups
            member.param_groups = [group]
            try:
                member.step()
            finally:
                member.param_groups = own
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share_state()


def build_optimizer(
    model: nn.Module, configs: list[OptimizerConfig], split_groups=None
) -> tuple[MultiOptimizer, Selection]:
    """Select parameters, build groups (``split_groups`` may split them further, e.g. into
    DeepSpeed's expert groups) and return the composite optimizer."""
    selection = select_parameters(model, configs)
    members = {}
    for cfg in configs:
        groups = param_groups(cfg, selection.by_optimizer[cfg.name])
        if split_groups is not None:
            groups = split_groups(groups)
        groups = [g for g in groups if g["params"]]
        members[cfg.name] = make_optimizer(cfg, groups)
    return MultiOptimizer(members), selection
