"""moefy: turn the dense FFNs of a transformers model into smile MoE layers.

:func:`moefy` swaps the dense FFN of every ``config.every``-th block of a transformers model for a
smile :class:`~smile.moe.MoELayer` (any router, any dispatcher), Switch-Transformer style: with
HF's placement rule, block ``i`` becomes sparse when ``every == 1`` or ``i % every == 1``
(``every=2``: blocks 1, 3, 5 ...). Supported: T5 and mT5 (encoder and decoder stacks),
SwitchTransformers skeletons, GPT-2, and the Llama family (Llama, Mistral, Qwen2).

The MoE slot returns the FFN's output only (what the host block expects); each layer keeps its
auxiliary loss, which the runtime's Trainer adds to the task loss (``smile.moe.collect_aux_loss``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from smile.moe import MoEConfig, MoEConfigError, MoELayer, Topology

FAMILIES = ("t5", "mt5", "switch_transformers", "gpt2", "llama", "mistral", "qwen2")


class ConvertError(MoEConfigError):
    """A model, checkpoint or MoE option that the conversion cannot handle."""


class MoEFeedForward(nn.Module):
    """Fills a transformer's FFN slot with a smile MoE layer.

    The host block expects a tensor back; the layer keeps its auxiliary loss for the Trainer.
    """

    def __init__(self, moe: MoELayer, dropout: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, _ = self.moe(hidden_states)
        return self.dropout(out)


def moe_modules(model: nn.Module) -> Iterator[tuple[str, MoEFeedForward]]:
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            yield name, module


def moe_dropped_fraction(model: nn.Module) -> torch.Tensor | float:
    """Mean fraction of token copies dropped for capacity in the last forward, over MoE layers.

    A device tensor (no host sync in the training step); 0.0 when no layer has run.
    """
    fractions = [
        1.0 - m.moe.last_stats.keep.float().mean()
        for _, m in moe_modules(model)
        if m.moe.last_stats is not None and m.moe.last_stats.keep.numel()
    ]
    return torch.stack(fractions).mean() if fractions else 0.0


# ---------------------------------------------------------------------------------------------
# Where the dense FFNs of each supported family live.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FFNSite:
    """One dense FFN slot: ``getattr(parent, attr)`` is the FFN of block ``layer``."""

    name: str
    parent: nn.Module
    attr: str
    layer: int
    d_model: int
    d_ff: int
    activation: str
    dropout: float


def is_sparse(layer: int, every: int) -> bool:
    """HF SwitchTransformers' placement rule (``sparse_step``)."""
    return every == 1 or layer % every == 1


def _submodule(model: nn.Module, *paths: str) -> tuple[str, nn.Module] | None:
    for path in paths:
        try:
            return path, model.get_submodule(path) if path else model
        except AttributeError:
            continue
    return None


def _activation(name: str, gated: bool, where: str) -> str:
    gelus = ("gelu", "gelu_new", "gelu_pytorch_tanh")
    if not gated and name in ("relu", *gelus):
        return "relu" if name == "relu" else "gelu"
    if gated and name in gelus:
        return "geglu"
    if gated and name in ("silu", "swish"):
        return "swiglu"
    raise ConvertError(f"{where} activation {name!r} has no smile expert equivalent; set moe.activation")


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every dense FFN slot of ``model``, stack by stack, in block order."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ConvertError(f"moefy: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    sites: list[FFNSite] = []
    if family in ("t5", "mt5", "switch_transformers"):
        attr = "mlp" if family == "switch_transformers" else "DenseReluDense"
        gated = bool(getattr(config, "is_gated_act", False))
        act = _activation(config.dense_act_fn, gated, f"{family}.dense_act_fn")
        for stack in ("encoder", "decoder"):
            found = _submodule(model, stack)
            if found is None:
                continue
            for i, block in enumerate(found[1].block):
                name = f"{stack}.block.{i}.layer.{len(block.layer) - 1}.{attr}"
                sites.append(FFNSite(name, block.layer[-1], attr, i, config.d_model, config.d_ff, act, 0.0))
        return sites
    if family == "gpt2":
        prefix, blocks = _submodule(model, "transformer.h", "h")
        d_ff = config.n_inner or 4 * config.n_embd
        act = _activation(config.activation_function, False, "gpt2.activation_function")
        return [
            FFNSite(f"{prefix}.{i}.mlp", block, "mlp", i, config.n_embd, d_ff, act, config.resid_pdrop)
            for i, block in enumerate(blocks)
        ]
    prefix, blocks = _submodule(model, "model.layers", "layers")
    act = _activation(config.hidden_act, True, f"{family}.hidden_act")
    return [
        FFNSite(f"{prefix}.{i}.mlp", block, "mlp", i, config.hidden_size, config.intermediate_size, act, 0.0)
        for i, block in enumerate(blocks)
    ]


def moefy(model: nn.Module, config: MoEConfig, topology: Topology | None = None) -> list[str]:
    """Swap the FFN of every sparse block (see :func:`is_sparse`) for a smile MoE layer, in place.

    Each layer takes ``d_model``, ``d_ff`` and (for ``activation="auto"``) the activation of the
    FFN it replaces. Returns the names of the replaced modules. Expert weights are drawn from
    torch's RNG and the global expert id, so seed every rank alike before calling it.
    """
    topology = topology or Topology(1, 1)
    config.validate()
    config.check_topology(topology)
    replaced = []
    for site in ffn_sites(model):
        if not is_sparse(site.layer, config.every):
            continue
        layer_config = dataclasses.replace(
            config,
            d_model=site.d_model,
            d_ff=site.d_ff,
            activation=config.resolved_activation(site.activation),
        )
        setattr(
            site.parent, site.attr, MoEFeedForward(MoELayer(layer_config, topology=topology), site.dropout)
        )
        replaced.append(site.name)
    if not replaced:
        raise ConvertError(f"moefy: moe.every={config.every} selects no block of this model")
    return replaced
