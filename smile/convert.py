"""Turn transformers models into smile MoE models, and move SwitchTransformers checkpoints in and out.

* :func:`moefy` swaps the dense FFN of every ``every``-th block of a transformers model for a
  smile :class:`~smile.layer.MoELayer` (any router, any dispatcher), Switch-Transformer style:
  with HF's placement rule, block ``i`` becomes sparse when ``every == 1`` or ``i % every == 1``
  (``every=2``: blocks 1, 3, 5 ...). Supported: T5 and mT5 (encoder and decoder stacks),
  SwitchTransformers skeletons, GPT-2, and the Llama family (Llama, Mistral, Qwen2).
* :func:`import_switch` reads a transformers SwitchTransformers checkpoint from a local directory
  into that layout: each rank builds the dense parts and reads only its own experts' tensors.
* :func:`export_switch` writes such a model back as a SwitchTransformers directory that
  ``from_pretrained`` loads; every expert-parallel rank writes its own experts' shard, so no rank
  ever holds all experts. Import then export reproduces the checkpoint's tensors exactly.

The MoE slot returns the FFN's output only (what the host block expects); the routers' auxiliary
losses of the last forward are collected with :func:`moe_aux_loss`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from smile.layer import MoELayer
from smile.routing import SwitchRouter
from smile.topology import Topology

ACTIVATIONS = ("auto", "gelu", "relu", "swiglu", "geglu")
FAMILIES = ("t5", "mt5", "switch_transformers", "gpt2", "llama", "mistral", "qwen2")


class ConvertError(ValueError):
    """A model, checkpoint or MoE option that the conversion cannot handle."""


@dataclass
class MoESpec:
    """Which FFNs become MoE layers and how those layers route and dispatch.

    num_experts: experts per MoE layer (a multiple of the expert-parallel size).
    router: "switch" (top-1), "topk" (GShard, ``k`` copies), "bilevel" (SMILE).
    dispatcher: "auto" (hierarchical for bilevel, flat otherwise, local on one rank), "flat",
        "hierarchical" or "local".
    every: sparse-layer step: block i is MoE when ``every == 1`` or ``i % every == 1``.
    capacity_factor: per-expert buffer factor; None is dropless; "auto" is dropless for bilevel
        and 1.0 for the others (MoELayer's default).
    k: copies per token for "topk" (default 2) and "switch" (1); k_node / k_gpu for "bilevel".
    aux_loss_weight, node_loss_weight, z_loss_weight, jitter_eps: router options (see MoELayer).
    activation: expert activation; "auto" follows the dense FFN it replaces.
    backend: dispatch kernels ("auto", "torch", "triton", "cuda"); gemm: expert GEMM ("auto",
        "grouped_mm", "triton", "bmm").
    dispatch_payload ("exact", "bf16", "fp8") / combine_payload ("exact", "bf16"): All2All wire format.
    chunks: pipeline depth, an integer >= 1 or "auto" (MoELayer's default).
    """

    num_experts: int = 8
    router: Literal["switch", "topk", "bilevel"] = "bilevel"
    dispatcher: Literal["auto", "flat", "hierarchical", "local"] = "auto"
    every: int = 2
    capacity_factor: float | Literal["auto"] | None = "auto"
    k: int | None = None
    k_node: int = 1
    k_gpu: int = 1
    aux_loss_weight: float = 0.01
    node_loss_weight: float | None = None
    z_loss_weight: float = 0.0
    jitter_eps: float = 0.0
    activation: Literal["auto", "gelu", "relu", "swiglu", "geglu"] = "auto"
    backend: Literal["auto", "torch", "triton", "cuda"] = "auto"
    gemm: Literal["auto", "grouped_mm", "triton", "bmm"] = "auto"
    dispatch_payload: Literal["exact", "bf16", "fp8"] = "exact"
    combine_payload: Literal["exact", "bf16"] = "exact"
    chunks: int | Literal["auto"] = "auto"

    def validate(self, where: str = "moe") -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConvertError(f"{where}.{name} must be an integer >= 1, got {value!r}")

        for name in ("num_experts", "every", "k_node", "k_gpu"):
            positive_int(name)
        if self.k is not None:
            positive_int("k")
            if self.router == "bilevel":
                raise ConvertError(f"{where}.k applies to 'switch'/'topk'; bilevel uses k_node and k_gpu")
        cf = self.capacity_factor
        if cf != "auto" and cf is not None and (isinstance(cf, (bool, str)) or not cf > 0):
            raise ConvertError(f"{where}.capacity_factor must be > 0, 'auto' or null (dropless), got {cf!r}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConvertError(f"{where}.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ConvertError(f"{where}.jitter_eps must be in [0, 1), got {self.jitter_eps!r}")
        if self.activation not in ACTIVATIONS:
            raise ConvertError(f"{where}.activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.chunks != "auto":
            positive_int("chunks")

    def resolved_capacity(self) -> float | None:
        """The capacity factor the layers use ("auto" resolved as MoELayer does)."""
        if self.capacity_factor == "auto":
            return None if self.router == "bilevel" else 1.0
        return self.capacity_factor

    def dispatcher_for(self, topology: Topology) -> str:
        """The dispatcher to build: "auto" resolves to SMILE's or Switch's pairing."""
        if topology.ep_size == 1:
            return "local"
        if self.dispatcher != "auto":
            return self.dispatcher
        return "hierarchical" if self.router == "bilevel" else "flat"

    def check_topology(self, topology: Topology, where: str = "moe") -> None:
        """Raise before any layer is built if the experts cannot be spread over ``topology``."""
        if self.num_experts % topology.ep_size:
            raise ConvertError(
                f"{where}.num_experts={self.num_experts} must be a multiple of the expert-parallel "
                f"size {topology.ep_size} ({topology.ep_nodes} nodes x {topology.gpus_per_node} GPUs)"
            )
        if self.dispatcher == "local" and topology.ep_size > 1:
            raise ConvertError(f"{where}.dispatcher='local' needs one rank; this run has {topology.ep_size}")

    def layer(self, d_model: int, d_ff: int, activation: str, topology: Topology) -> MoELayer:
        options: dict = {
            "aux_loss_weight": self.aux_loss_weight,
            "z_loss_weight": self.z_loss_weight,
            "jitter_eps": self.jitter_eps,
        }
        if self.router == "bilevel":
            options.update(k_node=self.k_node, k_gpu=self.k_gpu, node_loss_weight=self.node_loss_weight)
        return MoELayer(
            d_model,
            d_ff,
            self.num_experts,
            router=self.router,
            k=self.k,
            dispatcher=self.dispatcher_for(topology),
            capacity_factor=self.resolved_capacity(),
            topology=topology,
            activation=activation if self.activation == "auto" else self.activation,
            backend=self.backend,
            gemm=self.gemm,
            dispatch_payload=self.dispatch_payload,
            combine_payload=self.combine_payload,
            chunks=self.chunks,
            **options,
        )


class MoEFeedForward(nn.Module):
    """Fills a transformer's FFN slot with a smile MoE layer.

    The host block expects a tensor back, so the router's auxiliary loss is kept on the module
    (``aux_loss``) and summed by :func:`moe_aux_loss` after the forward.
    """

    def __init__(self, moe: MoELayer, dropout: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = nn.Dropout(dropout)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, self.aux_loss = self.moe(hidden_states)
        return self.dropout(out)


def moe_modules(model: nn.Module) -> Iterator[tuple[str, MoEFeedForward]]:
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            yield name, module


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of the last forward (each is consumed, so never counted twice)."""
    total: torch.Tensor | None = None
    for _, module in moe_modules(model):
        if module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
            module.aux_loss = None
    if total is None:
        raise ConvertError("moe_aux_loss: the model has no MoE layer that ran a forward since the last call")
    return total


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


def moefy(model: nn.Module, spec: MoESpec, topology: Topology | None = None) -> list[str]:
    """Swap the FFN of every sparse block (see :func:`is_sparse`) for a smile MoE layer, in place.

    Returns the names of the replaced modules. Expert weights are drawn from torch's RNG and the
    global expert id, so seed every rank alike before calling it.
    """
    topology = topology or Topology(1, 1)
    spec.validate()
    spec.check_topology(topology)
    replaced = []
    for site in ffn_sites(model):
        if not is_sparse(site.layer, spec.every):
            continue
        layer = spec.layer(site.d_model, site.d_ff, site.activation, topology)
        setattr(site.parent, site.attr, MoEFeedForward(layer, site.dropout))
        replaced.append(site.name)
    if not replaced:
        raise ConvertError(f"moefy: moe.every={spec.every} selects no block of this model")
    return replaced


# ---------------------------------------------------------------------------------------------
# SwitchTransformers checkpoints <-> smile's expert-parallel layout.
# ---------------------------------------------------------------------------------------------
class _Checkpoint:
    """Lazy tensor access to a transformers checkpoint directory (safetensors or .bin, sharded or not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (path / index_name).is_file():
                self.where = json.loads((path / index_name).read_text())["weight_map"]
                break
            if (path / single).is_file():
                self.where = None
                self._single = single
                break
        else:
            raise ConvertError(f"{path} holds no model.safetensors / pytorch_model.bin (or their index)")
        self._open: dict[str, object] = {}
        if self.where is None:
            self.where = dict.fromkeys(self._keys(self._single), self._single)

    def _file(self, name: str):
        if name not in self._open:
            file = self.path / name
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[name] = safe_open(str(file), "pt")
            else:
                self._open[name] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._open[name]

    def _keys(self, name: str) -> list[str]:
        handle = self._file(name)
        return list(handle.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        handle = self._file(self.where[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


def _expert_names(prefix: str, expert: int) -> tuple[str, str]:
    return f"{prefix}.experts.expert_{expert}.wi.weight", f"{prefix}.experts.expert_{expert}.wo.weight"


def _switch_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConvertError(f"{path} is not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "switch_transformers":
        raise ConvertError(f"{path}: model_type {config.model_type!r}, expected 'switch_transformers'")
    if config.router_bias:
        raise ConvertError(f"{path}: router_bias=true is not supported (smile routers have no bias)")
    if config.encoder_sparse_step != config.decoder_sparse_step or config.encoder_sparse_step < 1:
        raise ConvertError(
            f"{path}: encoder_sparse_step={config.encoder_sparse_step} and decoder_sparse_step="
            f"{config.decoder_sparse_step} must be equal and >= 1"
        )
    return config


def switch_skeleton(config, spec: MoESpec, topology: Topology) -> nn.Module:
    """A SwitchTransformers model whose sparse MLPs are smile MoE layers (weights random)."""
    from transformers import SwitchTransformersForConditionalGeneration

    dense = copy.deepcopy(config)
    dense.encoder_sparse_step = dense.decoder_sparse_step = 0  # build dense MLPs, not all experts
    model = SwitchTransformersForConditionalGeneration(dense)
    model.config = config
    moefy(model, spec, topology)
    return model


def switch_spec(
    config, dispatcher: str = "auto", capacity_factor: float | None = 1.0, backend: str = "auto"
) -> MoESpec:
    """The MoE options that reproduce a SwitchTransformers config's layers."""
    return MoESpec(
        num_experts=config.num_experts,
        router="switch",
        dispatcher=dispatcher,
        every=config.encoder_sparse_step,
        capacity_factor=capacity_factor,
        aux_loss_weight=config.router_aux_loss_coef,
        z_loss_weight=config.router_z_loss_coef,
        jitter_eps=config.router_jitter_noise,
        backend=backend,
    )


def import_switch(
    path: str | Path,
    topology: Topology | None = None,
    *,
    dispatcher: str = "auto",
    capacity_factor: float | None = 1.0,
    backend: str = "auto",
) -> nn.Module:
    """Load a SwitchTransformers checkpoint directory into smile's expert-parallel layout.

    Rank r of the expert-parallel group reads only experts ``[r * e, (r + 1) * e)`` of each
    sparse layer. Capacity follows ``capacity_factor`` (HF's ``expert_capacity`` is a
    per-sequence count with no smile equivalent). Returns the model in eval mode.
    """
    path = Path(path)
    topology = topology or Topology(1, 1)
    config = _switch_config(path)
    model = switch_skeleton(config, switch_spec(config, dispatcher, capacity_factor, backend), topology)
    ckpt = _Checkpoint(path)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    moe_prefixes = []
    for name, module in moe_modules(model):
        moe_prefixes.append(name + ".")
        experts = module.moe.experts
        first = topology.ep_rank * experts.num_local
        router_key = f"{name}.router.classifier.weight"
        state[f"{name}.moe.router.proj.weight"] = _need(ckpt, router_key, used)
        w_in, w_out = [], []
        for expert in range(first, first + experts.num_local):
            wi, wo = _expert_names(name, expert)
            w_in.append(_need(ckpt, wi, used).t())
            w_out.append(_need(ckpt, wo, used).t())
        state[f"{name}.moe.experts.w_in"] = torch.stack(w_in)
        state[f"{name}.moe.experts.w_out"] = torch.stack(w_out)
    for names in _tied_groups(model):
        if any(n.startswith(tuple(moe_prefixes)) for n in names):
            continue
        present = [n for n in names if n in ckpt]
        if not present:
            raise ConvertError(f"{path}: checkpoint has no tensor {names[0]!r}")
        tensor = _need(ckpt, present[0], used)
        for n in names:
            state[n] = tensor
    unknown = sorted(k for k in ckpt.where if k not in used and not _is_expert_key(k, moe_prefixes))
    if unknown:
        raise ConvertError(f"{path}: tensors the model has no place for: {unknown[:6]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _need(ckpt: _Checkpoint, key: str, used: set[str]) -> torch.Tensor:
    if key not in ckpt:
        raise ConvertError(f"{ckpt.path}: checkpoint has no tensor {key!r}")
    used.add(key)
    return ckpt.get(key)


def _is_expert_key(key: str, moe_prefixes: list[str]) -> bool:
    return ".experts.expert_" in key and any(key.startswith(p) for p in moe_prefixes)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied embeddings form one group)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def export_switch(
    model: nn.Module, out_dir: str | Path, topology: Topology | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a switch-routed smile model as a SwitchTransformers checkpoint directory (collective).

    Rank 0 writes ``config.json``, the dense tensors and the index; each rank of the first
    expert-parallel group writes its own experts (no gather). ``dtype`` casts every tensor
    (default: as stored). Parameters must be whole on each rank (ZeRO stage <= 2).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    topology = topology or Topology(1, 1)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "switch_transformers":
        raise ConvertError("export_switch needs a SwitchTransformers host model (see import_switch)")
    modules = list(moe_modules(model))
    for name, module in modules:
        if not isinstance(module.moe.router, SwitchRouter) or module.moe.router.k != 1:
            raise ConvertError(f"export_switch: {name} is not a top-1 'switch' router (HF Switch's kind)")
    prefixes = tuple(name + "." for name, _ in modules)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype or t.dtype).contiguous()

    dense: dict[str, torch.Tensor] = {}
    for names in _tied_groups(model):
        if not names[0].startswith(prefixes):
            dense[names[0]] = cast(model.state_dict(keep_vars=True)[names[0]])
    for name, module in modules:
        dense[f"{name}.router.classifier.weight"] = cast(module.moe.router.proj.weight)
    experts: dict[str, torch.Tensor] = {}
    for name, module in modules:
        ffn = module.moe.experts
        first = topology.ep_rank * ffn.num_local
        for i in range(ffn.num_local):
            wi, wo = _expert_names(name, first + i)
            experts[wi] = cast(ffn.w_in[i].t())
            experts[wo] = cast(ffn.w_out[i].t())

    rank = topology.rank
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    meta = {"format": "pt"}
    if topology.ep_size == 1:
        if rank == 0:
            save_file({**dense, **experts}, str(out / "model.safetensors"), metadata=meta)
    else:
        shards = topology.ep_size + 1
        shard = "model-{:05d}-of-{:05d}.safetensors".format
        if rank < topology.ep_size:
            save_file(experts, str(out / shard(rank + 2, shards)), metadata=meta)
        if rank == 0:
            save_file(dense, str(out / shard(1, shards)), metadata=meta)
            weight_map = dict.fromkeys(dense, shard(1, shards))
            size = sum(t.numel() * t.element_size() for t in dense.values())
            for name, module in modules:
                ffn = module.moe.experts
                itemsize = torch.empty((), dtype=dtype or ffn.w_in.dtype).element_size()
                for expert in range(module.moe.num_experts):
                    for key in _expert_names(name, expert):
                        weight_map[key] = shard(2 + expert // ffn.num_local, shards)
                    size += 2 * ffn.d_model * ffn.d_ff * itemsize
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if rank == 0:
        config = copy.deepcopy(config)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(str(out))
    if dist.is_initialized():
        dist.barrier()
    return out

