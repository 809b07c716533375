"""``apply_design``: freeze a stock T5/RoBERTa model and attach one design's PEFT modules.

The result is a :class:`PEFTModel` that forwards to the (modified in place) backbone. PEFT
parameters carry a tag (like smile's expert tag) so the training job, the budget report and the
PEFT-only checkpoint find them whatever module path they end up under.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smile.models.peft_design_spaces import backbones
from smile.models.peft_design_spaces.allocation import LayerCosts, LayerPlan, plan_layers
from smile.models.peft_design_spaces.attention import ATTENTION_NAME, PREFIX_ATTR
from smile.models.peft_design_spaces.components import (
    Adapter,
    Prefix,
    PrefixMLP,
    WithAdapter,
    add_bias,
    add_lora,
    merge_lora,
)
from smile.models.peft_design_spaces.config import DesignSpaceConfig
from smile.moe.experts import is_expert_parameter
from smile.moe.layer import MoELayer

_PEFT_ATTR = "_smile_peft"


def mark_peft(param: nn.Parameter, global_factor: int = 1) -> nn.Parameter:
    """Tag a parameter as PEFT; ``global_factor`` turns its local size into the global one."""
    param.requires_grad_(True)
    setattr(param, _PEFT_ATTR, global_factor)
    return param


def is_peft(param: torch.Tensor) -> bool:
    return hasattr(param, _PEFT_ATTR)


def _mark_module(module: nn.Module, global_factor: int = 1) -> nn.Module:
    for param in module.parameters():
        mark_peft(param, global_factor)
    return module


def global_param_count(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Parameters of ``model`` counting every expert of every rank (tied weights once)."""
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude_prefixes))
    for module in model.modules():
        if isinstance(module, MoELayer):
            local = sum(p.numel() for p in module.experts.parameters())
            total += local * (module.num_experts // module.experts.num_local - 1)
    return total


class PEFTModel(nn.Module):
    """A frozen backbone carrying the PEFT modules of one design; forwards to the backbone."""

    def __init__(
        self,
        backbone: nn.Module,
        design: DesignSpaceConfig,
        plans: list[LayerPlan],
        backbone_params: int,
        prefix_mlp: PrefixMLP | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.design = design
        self.plans = plans
        self.backbone_params = backbone_params
        self.prefix_mlp = prefix_mlp
        self.family = backbones.family_of(backbone)
        self.head_prefixes = tuple(f"backbone.{p}" for p in backbones.head_prefixes(backbone))

    @property
    def config(self):
        return self.backbone.config

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.backbone.generate(*args, **kwargs)

    # ---- parameter sets --------------------------------------------------------------------------
    def is_head(self, name: str) -> bool:
        return bool(self.head_prefixes) and name.startswith(self.head_prefixes)

    def peft_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if is_peft(p))

    def trained_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """PEFT parameters and the task head: everything training may change."""
        return ((n, p) for n, p in self.named_parameters() if is_peft(p) or self.is_head(n))

    # ---- inference transforms --------------------------------------------------------------------
    def merge_lora(self) -> int:
        """Fold LoRA updates into the weights (prefixes and adapters stay, as in the paper)."""
        return merge_lora(self.backbone)

    def fold_prefixes(self) -> None:
        """Drop the prefix MLP, keeping the keys/values it produces."""
        for module in self.backbone.modules():
            if isinstance(module, Prefix) and module.reparameterised:
                module.fold()
                _mark_module(module)
        self.prefix_mlp = None

    @contextmanager
    def prefixes_enabled(self, enabled: bool):
        """Switch every prefix on or off (off, the model computes exactly its backbone's attention)."""
        prefixes = [m for m in self.backbone.modules() if isinstance(m, Prefix)]
        before = [p.enabled for p in prefixes]
        for p in prefixes:
            p.enabled = enabled
        try:
            yield
        finally:
            for p, flag in zip(prefixes, before):
                p.enabled = flag

    # ---- PEFT-only checkpoint --------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trained_named_parameters()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], ep_rank: int = 0) -> None:
        """Load PEFT + head tensors; expert tensors saved with all experts are sliced to this rank's."""
        own = dict(self.trained_named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"PEFT weights do not match the design: missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
        with torch.no_grad():
            for name, param in own.items():
                tensor = state[name]
                if is_expert_parameter(param) and tensor.shape != param.shape:
                    local = param.shape[0]
                    tensor = tensor[ep_rank * local : (ep_rank + 1) * local]
                if tensor.shape != param.shape:
                    raise KeyError(
                        f"PEFT weight {name}: saved {tuple(tensor.shape)}, model {tuple(param.shape)}"
                    )
                param.copy_(tensor.to(param.dtype))


def _layer_costs(layer: backbones.Layer, targets: list[backbones.Target]) -> LayerCosts:
    lora_unit = 0
    for t in targets:
        shape = getattr(t.module, t.name).shape
        lora_unit += (shape[0] * (shape[1] + shape[2]) * t.global_factor) if len(shape) == 3 else sum(shape)
    bitfit = sum(size for _, size in backbones.bitfit_sites(layer))
    return LayerCosts(layer.d_model, layer.kv_dim, lora_unit, bitfit)


def _resolve_lora(layers: list[backbones.Layer], plan_layers_with_lora: set[int], patterns: list[str]):
    """LoRA targets per layer; a pattern must match somewhere, every LoRA layer needs a target."""
    found: dict[int, list[backbones.Target]] = {}
    hits = dict.fromkeys(patterns, 0)
    for layer in layers:
        if layer.index not in plan_layers_with_lora:
            continue
        targets: dict[str, backbones.Target] = {}
        for pattern in patterns:
            matched = backbones.resolve_targets(layer, pattern)
            hits[pattern] += len(matched)
            targets.update({t.path: t for t in matched})
        if not targets:
            raise ValueError(f"design.lora_targets={patterns} match no weight of layer {layer.index}")
        found[layer.index] = list(targets.values())
    for pattern, count in hits.items():
        if plan_layers_with_lora and count == 0:
            sample = sorted(backbones.lora_candidates(layers[min(plan_layers_with_lora)]))[:12]
            raise ValueError(
                f"design.lora_targets entry {pattern!r} matches no weight in any LoRA layer; use q, k, v, o, "
                f"experts, router or a glob over weights such as {sample}"
            )
    return found


def apply_design(model: nn.Module, design: DesignSpaceConfig) -> PEFTModel:
    """Freeze ``model`` and add the PEFT modules of ``design`` (the head, if any, stays trainable)."""
    layers = backbones.layers(model)
    groups = design.groups(len(layers))
    head = backbones.head_prefixes(model)
    backbone_params = global_param_count(model, head)
    for param in model.parameters():
        param.requires_grad_(False)

    lora_layers = {i for g in groups if "lora" in g.strategies for i in g.layers}
    targets = _resolve_lora(layers, lora_layers, list(design.lora_targets))
    costs = {layer.index: _layer_costs(layer, targets.get(layer.index, [])) for layer in layers}
    plans = plan_layers(groups, costs, design.param_budget_ratio * backbone_params, design.allocation)

    prefix_mlp = None
    if design.prefix_mlp_hidden and any("prefix" in p.strategies for p in plans):
        kv_dims = {layers[p.layer].kv_dim for p in plans if "prefix" in p.strategies}
        if len(kv_dims) != 1:
            raise ValueError(
                f"the shared prefix MLP needs one key/value width, the layers have {sorted(kv_dims)}"
            )
        first = layers[plans[0].layer]
        prefix_mlp = _mark_module(PrefixMLP(first.d_model, design.prefix_mlp_hidden, kv_dims.pop()))
        prefix_mlp.to(next(model.parameters()).device)

    for plan in plans:
        _attach(layers[plan.layer], plan, targets.get(plan.layer, []), design, prefix_mlp)
    if any("prefix" in p.strategies for p in plans):
        model.set_attn_implementation(ATTENTION_NAME)
    for name, param in model.named_parameters():
        if head and name.startswith(head):
            param.requires_grad_(True)
    return PEFTModel(model, design, plans, backbone_params, prefix_mlp)


def _attach(
    layer: backbones.Layer,
    plan: LayerPlan,
    targets: list[backbones.Target],
    design: DesignSpaceConfig,
    prefix_mlp: PrefixMLP | None,
) -> None:
    device = next(layer.block.parameters()).device
    if "bitfit" in plan.strategies:
        for module, _ in backbones.bitfit_sites(layer):
            mark_peft(add_bias(module) if isinstance(module, nn.Linear) else module.bias)
    if "lora" in plan.strategies:
        for t in targets:
            _mark_module(
                add_lora(t.module, t.name, plan.sizes["lora"], design.lora_alpha, t.expert), t.global_factor
            )
    if "adapter" in plan.strategies:
        inner = getattr(layer.ffn_parent, layer.ffn_name)
        adapter = Adapter(layer.d_model, plan.sizes["adapter"], design.adapter_activation).to(device)
        setattr(layer.ffn_parent, layer.ffn_name, WithAdapter(inner, _mark_module(adapter)))
    if "prefix" in plan.strategies:
        prefix = Prefix(plan.sizes["prefix"], layer.num_heads, layer.head_dim, layer.d_model, prefix_mlp)
        layer.self_attention.add_module(PREFIX_ATTR, _mark_module(prefix.to(device)))


def _layer_params(layer: backbones.Layer) -> int:
    """Inference-time PEFT parameters in one layer (prefix keys/values, not the MLP input)."""
    total = 0
    prefixes = [m for m in layer.block.modules() if isinstance(m, Prefix)]
    inside = {id(p) for m in prefixes for p in m.parameters()}
    for param in layer.block.parameters():
        if is_peft(param) and id(param) not in inside:
            total += param.numel() * getattr(param, _PEFT_ATTR)
    return total + sum(m.length * 2 * m.num_heads * m.head_dim for m in prefixes)


def budget_report(model: PEFTModel) -> dict[str, Any]:
    """Budget against actual parameter counts, overall and per layer.

    ``peft_params`` counts inference-time PEFT parameters (global, all experts); the task head
    and the training-only prefix MLP are reported separately and are not part of the budget.
    """
    layers = backbones.layers(model.backbone)
    per_layer = []
    for plan in model.plans:
        per_layer.append(
            {
                "layer": plan.layer,
                "group": plan.group,
                "strategies": list(plan.strategies),
                "sizes": dict(plan.sizes),
                "planned": plan.params,
                "params": _layer_params(layers[plan.layer]),
                "budget": plan.budget,
            }
        )
    peft = sum(row["params"] for row in per_layer)
    head = sum(p.numel() for n, p in model.named_parameters() if model.is_head(n))
    mlp = 0 if model.prefix_mlp is None else sum(p.numel() for p in model.prefix_mlp.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "backbone_params": model.backbone_params,
        "target_ratio": model.design.param_budget_ratio,
        "budget": model.design.param_budget_ratio * model.backbone_params,
        "peft_params": peft,
        "ratio": peft / model.backbone_params,
        "head_params": head,
        "prefix_mlp_params": mlp,
        "trainable_params": trainable,
        "layers": per_layer,
    }


def save_peft(model: PEFTModel, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the PEFT + head weights, the design and the budget report (the only artifact needed
    on top of the frozen backbone)."""
    import json

    from safetensors.torch import save_file

    from smile.runtime import config_to_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.peft_state_dict() if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "peft.safetensors"))
    (out / "design.json").write_text(json.dumps(config_to_dict(model.design), indent=1))
    (out / "budget.json").write_text(json.dumps(budget_report(model), indent=1))
    return out


def load_peft(model: PEFTModel, path: str | Path, ep_rank: int = 0) -> None:
    from safetensors.torch import load_file

    file = Path(path) / "peft.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no peft.safetensors (write it with save_peft)")
    model.load_peft_state_dict(load_file(str(file)), ep_rank=ep_rank)


__all__ = [
    "PEFTModel",
    "apply_design",
    "budget_report",
    "global_param_count",
    "is_peft",
    "load_peft",
    "mark_peft",
    "save_peft",
]
