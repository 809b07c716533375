"""Where PEFT modules go in stock transformers T5 and RoBERTa (and their smile-MoE variants).

A backbone is a list of :class:`Layer` s (RoBERTa encoder layers; T5 encoder blocks then decoder
blocks) plus the names of its task head. Each layer names its self-attention module (prefix),
the FFN sub-module whose output the adapter follows, the self-attention projections LoRA aliases
(q, k, v, o), and the bias sites of BitFit. MoE layers from ``moe.moefy`` expose their expert
weights and router to LoRA through the ``experts`` and ``router`` aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from smile.moe.experts import ExpertFFN
from smile.moe.layer import MoELayer

FAMILIES: tuple[str, ...] = ("roberta", "t5")
ATTENTION_ALIASES: tuple[str, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Layer:
    """One transformer layer and its PEFT attachment points."""

    index: int
    block: nn.Module
    self_attention: nn.Module
    ffn_parent: nn.Module
    ffn_name: str
    attention_weights: dict[str, str]  # alias -> parameter path inside ``block``
    d_model: int
    num_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.num_heads * self.head_dim


def family_of(model: nn.Module) -> str:
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"backbone model_type {family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    return family


def layers(model: nn.Module) -> list[Layer]:
    """The backbone's layers in order (T5: encoder blocks, then decoder blocks)."""
    family = family_of(model)
    if family == "roberta":
        blocks = list(model.base_model.encoder.layer)
        return [_roberta_layer(i, b) for i, b in enumerate(blocks)]
    blocks = list(model.get_encoder().block) + list(model.get_decoder().block)
    return [_t5_layer(i, b) for i, b in enumerate(blocks)]


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the task head (always trained, outside the budget).

    T5 is text-to-text: its LM head is the pretrained (tied) embedding, so it has no task head.
    """
    return ("classifier.",) if family_of(model) == "roberta" else ()


def _roberta_layer(index: int, block: nn.Module) -> Layer:
    sa = block.attention.self
    weights = {
        "q": "attention.self.query.weight",
        "k": "attention.self.key.weight",
        "v": "attention.self.value.weight",
        "o": "attention.output.dense.weight",
    }
    return Layer(
        index,
        block,
        sa,
        block.output,
        "dense",
        weights,
        d_model=sa.query.in_features,
        num_heads=sa.num_attention_heads,
        head_dim=sa.attention_head_size,
    )


def _t5_layer(index: int, block: nn.Module) -> Layer:
    sa = block.layer[0].SelfAttention
    weights = {alias: f"layer.0.SelfAttention.{alias}.weight" for alias in ATTENTION_ALIASES}
    ffn = block.layer[len(block.layer) - 1]
    return Layer(
        index,
        block,
        sa,
        ffn,
        "DenseReluDense",
        weights,
        d_model=sa.d_model,
        num_heads=sa.n_heads,
        head_dim=sa.key_value_proj_dim,
    )


def _outside(block: nn.Module, skip: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Named sub-modules of ``block`` that are not inside a module of a ``skip`` type."""
    inside: set[str] = set()
    out = []
    for name, module in block.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, skip):
            inside.add(name)
            continue
        out.append((name, module))
    return out


def bitfit_sites(layer: Layer, skip: tuple[type, ...] = ()) -> list[tuple[nn.Module, int]]:
    """Modules whose bias BitFit trains (or adds, for bias-free linears), with the bias size.

    Linear and LayerNorm layers outside smile MoE layers (and outside ``skip`` types, i.e. PEFT
    modules) count; the experts and router of an MoE layer have no biases to tune.
    """
    sites = []
    for _, module in _outside(layer.block, (MoELayer, *skip)):
        if isinstance(module, nn.Linear):
            sites.append((module, module.out_features))
        elif isinstance(module, nn.LayerNorm) and module.bias is not None:
            sites.append((module, module.bias.numel()))
    return sites


@dataclass(frozen=True)
class Target:
    """One weight LoRA adapts: ``module.<name>`` inside a layer."""

    path: str
    module: nn.Module
    name: str
    expert: bool
    global_factor: int  # local -> global parameter count (experts held by other ranks)


def _owner(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (block.get_submodule(parent) if parent else block), name


def _expert_factor(block: nn.Module, path: str) -> int:
    """Global/local ratio of an expert weight (the MoE layer holds ``num_local`` of ``num_experts``)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = block.get_submodule(".".join(parts[:cut]))
        if isinstance(module, MoELayer):
            return module.num_experts // module.experts.num_local
    return 1


def lora_candidates(layer: Layer, skip: tuple[type, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Parameter paths (inside the layer) of weights LoRA can adapt, with their shapes."""
    out = {}
    for prefix, module in _outside(layer.block, skip):
        for name, param in module.named_parameters(recurse=False):
            if param.dim() in (2, 3):
                out[f"{prefix}.{name}" if prefix else name] = tuple(param.shape)
    return out


def resolve_targets(layer: Layer, pattern: str, skip: tuple[type, ...] = ()) -> list[Target]:
    """The weights of ``layer`` that one ``lora_targets`` entry names (may be empty)."""
    candidates = lora_candidates(layer, skip)
    if pattern in layer.attention_weights:
        paths = [layer.attention_weights[pattern]]
    elif pattern == "experts":
        paths = [p for p in candidates if isinstance(_owner(layer.block, p)[0], ExpertFFN)]
    elif pattern == "router":
        paths = [p for p in candidates if ".router." in f".{p}" and len(candidates[p]) == 2]
    else:
        paths = [p for p in candidates if fnmatchcase(p, pattern) or fnmatchcase(p, f"*.{pattern}")]
    targets = []
    for path in paths:
        module, name = _owner(layer.block, path)
        expert = isinstance(module, ExpertFFN)
        factor = _expert_factor(layer.block, path) if expert else 1
        targets.append(Target(path, module, name, expert, factor))
    return targets
