"""Consolidated export to one transformers-style directory, and loading weights back.

Export gathers ZeRO-3 partitions and every expert-parallel rank's experts (expert parameters
are stacked over local experts along dim 0, as ``smile.moe.experts.ExpertFFN`` stores them; the
export holds all experts in global order). A model with ``save_pretrained`` (transformers)
writes through it, so ``from_pretrained`` reads a dense model back directly; any other model
gets ``model.safetensors`` and a ``config.json`` of its ``config`` attribute when it has one.
``smile_export.json`` lists the expert parameters, which :func:`load_weights` re-slices for
whatever expert-parallel layout loads them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from smile.moe.experts import is_expert_parameter
from smile.moe.topology import Topology
from smile.runtime import checkpoint as ckpt
from smile.runtime.distributed import device
from smile.runtime.state import load_model_state, model_state

EXPORT_INFO = "smile_export.json"


def consolidated_state(model: nn.Module, topology: Topology) -> dict[str, torch.Tensor]:
    """The full state dict with all experts (collective; complete on every rank)."""
    dense, experts = model_state(model)
    group = topology.group("ep") if dist.is_initialized() else None
    full = dict(dense)
    for name in sorted(experts):
        local = experts[name]
        if group is None or dist.get_world_size(group) == 1:
            full[name] = local
            continue
        dev = device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
        parts = [torch.empty_like(local, device=dev) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.to(dev), group=group)
        full[name] = torch.cat([p.cpu() for p in parts], dim=0)
    return full


def export_pretrained(model: nn.Module, out_dir: str | Path, topology: Topology) -> Path:
    """Write the consolidated model to ``out_dir`` (collective; rank 0 writes)."""
    out = Path(out_dir)
    state = consolidated_state(model, topology)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        experts = sorted(n for n, p in model.named_parameters() if is_expert_parameter(p))
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        else:
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(out / "model.safetensors"),
                metadata={"format": "pt"},
            )
            config = _config_dict(model)
            if config is not None:
                (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
        info = {"expert_parameters": experts, "expert_dim": 0, "ep_size_at_export": topology.ep_size}
        (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return out


def _config_dict(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else None


def read_export(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an export directory (single or sharded safetensors)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors (or index): not an export directory")
    return load_file(str(single))


def load_weights(model: nn.Module, path: str | Path, topology: Topology | None = None) -> None:
    """Load weights into ``model`` from an export directory or a checkpoint directory.

    Expert parameters are sliced for this rank's expert-parallel position, so an export written
    with any layout loads into any layout with the same total number of experts. Call before
    building the Trainer (it starts a stage from the previous stage's weights).
    """
    path = Path(path)
    topology = topology or Topology(1, 1)
    if (path / ckpt.MANIFEST).is_file():
        manifest = ckpt.read_manifest(path)
        state = ckpt.read_tensors(path, manifest, "model.safetensors")
        if manifest.get("has_experts"):
            for name, tensor in _checkpoint_experts(path, manifest).items():
                state[name] = tensor
    else:
        state = read_export(path)
    params = dict(model.named_parameters())
    for name, tensor in list(state.items()):
        param = params.get(name)
        if param is not None and is_expert_parameter(param) and tensor.shape != param.shape:
            local = param.shape[0]
            if tensor.shape[0] % local or tensor.shape[1:] != param.shape[1:]:
                raise ValueError(
                    f"expert parameter {name}: saved {tuple(tensor.shape)} cannot be split into "
                    f"local blocks of {tuple(param.shape)}"
                )
            start = topology.ep_rank * local
            state[name] = tensor[start : start + local]
    state = _fill_tied(model, state)
    load_model_state(model, state, partitioned=False)


def _checkpoint_experts(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    ep_files = sorted(n for n in manifest["files"] if n.startswith("experts-ep"))
    parts = [ckpt.read_tensors(path, manifest, f"experts-ep{i}.safetensors") for i in range(len(ep_files))]
    return {name: torch.cat([p[name] for p in parts], dim=0) for name in parts[0]}


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill keys that transformers drops for tied weights from their saved twin."""
    own = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for name, tensor in own.items():
        by_id.setdefault(id(tensor), []).append(name)
    out = dict(state)
    for names in by_id.values():
        present = [n for n in names if n in out]
        for name in names:
            if name not in out and present:
                out[name] = out[present[0]]
    return out
