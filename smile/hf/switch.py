"""SwitchTransformers checkpoints <-> smile's expert-parallel layout.

* :func:`import_switch` reads a transformers SwitchTransformers checkpoint from a local directory
  into that layout: each rank builds the dense parts and reads only its own experts' tensors.
* :func:`export_switch` writes such a model back as a SwitchTransformers directory that
  ``from_pretrained`` loads; every expert-parallel rank writes its own experts' shard, so no rank
  ever holds all experts. Import then export reproduces the checkpoint's tensors exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from smile.hf.moefy import ConvertError, moe_modules, moefy
from smile.moe import MoEConfig, Topology
from smile.moe.routing import SwitchRouter


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


def switch_skeleton(config, moe: MoEConfig, topology: Topology) -> nn.Module:
    """A SwitchTransformers model whose sparse MLPs are smile MoE layers (weights random)."""
    from transformers import SwitchTransformersForConditionalGeneration

    dense = copy.deepcopy(config)
    dense.encoder_sparse_step = dense.decoder_sparse_step = 0  # build dense MLPs, not all experts
    model = SwitchTransformersForConditionalGeneration(dense)
    model.config = config
    moefy(model, moe, topology)
    return model


def switch_spec(
    config, dispatcher: str = "auto", capacity_factor: float | None = 1.0, backend: str = "auto"
) -> MoEConfig:
    """The MoE options that reproduce a SwitchTransformers config's layers."""
    return MoEConfig(
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

