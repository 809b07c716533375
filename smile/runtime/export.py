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
    building the Trainer (it starts a stage from the previous stage's weights). A checkpoint saved
    with ``checkpoint.trainable_only`` lacks its frozen parameters: ``model`` must hold them
    already (rebuilt from their source), and they are checked against the recorded sha256.
    """
    path = Path(path)
    topology = topology or Topology(1, 1)
    state, manifest = read_weights(path)
    state = slice_experts(model, state, topology)
    if manifest is not None and manifest.get("trainable_only"):
        frozen = ckpt.read_json(path, manifest, "frozen.json") if "frozen.json" in manifest["files"] else {}
        problems = frozen_mismatches(model, frozen, topology)
        if problems:
            raise ckpt.CheckpointError(frozen_error(path, manifest, problems))
        state = fill_frozen(model, state)
    state = _fill_tied(model, state)
    load_model_state(model, state, partitioned=False)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """All weights of an export or a checkpoint (verified; experts of every expert-parallel rank
    concatenated in global expert order) and the checkpoint's manifest (None for an export)."""
    path = Path(path)
    if not (path / ckpt.MANIFEST).is_file():
        return read_export(path), None
    manifest = ckpt.read_manifest(path)
    state = ckpt.read_tensors(path, manifest, "model.safetensors")
    if manifest.get("has_experts"):
        state.update(concat_expert_files(path, manifest, "experts-ep"))
    return state, manifest


def concat_expert_files(path: Path, manifest: dict, prefix: str) -> dict[str, torch.Tensor]:
    """``<prefix><r>.safetensors`` of every expert-parallel rank r, concatenated along dim 0:
    local expert i of rank r becomes global expert ``r * num_local + i``."""
    count = sum(1 for n in manifest["files"] if n.startswith(prefix) and n.endswith(".safetensors"))
    if count == 0:
        return {}
    parts = [ckpt.read_tensors(path, manifest, f"{prefix}{i}.safetensors") for i in range(count)]
    # 0-dim entries (an optimizer's step) are per parameter, the same on every rank: kept once
    return {
        name: parts[0][name] if parts[0][name].dim() == 0 else torch.cat([p[name] for p in parts], dim=0)
        for name in parts[0]
    }


def expert_block(
    name: str, tensor: torch.Tensor, local_shape: tuple[int, ...], topology: Topology
) -> torch.Tensor:
    """This rank's block of a tensor stacked over all experts (dim 0), by global expert id."""
    local_shape = tuple(local_shape)
    if tuple(tensor.shape) == local_shape:
        return tensor
    local = local_shape[0]
    if tensor.shape[0] % local or tuple(tensor.shape[1:]) != local_shape[1:]:
        raise ValueError(
            f"expert parameter {name}: saved {tuple(tensor.shape)} cannot be split into "
            f"local blocks of {local_shape}"
        )
    if tensor.shape[0] != local * topology.ep_size:
        raise ValueError(
            f"expert parameter {name}: saved {tensor.shape[0]} experts, this layout holds "
            f"{local} x {topology.ep_size} expert-parallel ranks = {local * topology.ep_size}"
        )
    start = topology.ep_rank * local
    return tensor[start : start + local]


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape (ZeRO-3 keeps an empty placeholder and ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def slice_experts(
    model: nn.Module, state: dict[str, torch.Tensor], topology: Topology
) -> dict[str, torch.Tensor]:
    """``state`` with every expert parameter cut to this rank's experts (the one re-slicer)."""
    params = dict(model.named_parameters())
    out = dict(state)
    for name, tensor in state.items():
        param = params.get(name)
        if param is not None and is_expert_parameter(param):
            out[name] = expert_block(name, tensor, full_shape(param), topology)
    return out


def frozen_hashes(
    model_tensors: dict[str, torch.Tensor], frozen: set[str], experts: set[str], topology: Topology
) -> dict[str, dict]:
    """name -> {shape, dtype, sha256} of frozen tensors; a frozen expert stack is recorded per
    global expert (``name[g]``) so any expert-parallel layout can check its own experts."""
    out: dict[str, dict] = {}
    for name in sorted(frozen & set(model_tensors)):
        tensor = model_tensors[name]
        if name in experts:
            first = topology.ep_rank * tensor.shape[0]
            for i in range(tensor.shape[0]):
                out[f"{name}[{first + i}]"] = _record(tensor[i])
        else:
            out[name] = _record(tensor)
    return out


def _record(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "sha256": ckpt.tensor_sha256(tensor)}


def frozen_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(frozen parameter names as in ``state_dict``, expert parameter names)."""
    frozen, experts = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter):
            if not tensor.requires_grad:
                frozen.add(name)
            if is_expert_parameter(tensor):
                experts.add(name)
    return frozen, experts


def frozen_mismatches(
    model: nn.Module,
    recorded: dict[str, dict],
    topology: Topology,
    tensors: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """What of the recorded frozen part this rank's ``model`` (or its gathered ``tensors``) lacks
    or holds differently; only this rank's experts are checked."""
    tensors = tensors if tensors is not None else {k: v.detach() for k, v in model.state_dict().items()}
    frozen, experts = frozen_names(model)
    wanted = frozen | {k.split("[")[0] for k in recorded}
    here = frozen_hashes(tensors, wanted, experts, topology)
    problems = []
    mine = {k for k in recorded if k.split("[")[0] not in experts or k in here}
    for key in sorted(mine):
        got = here.get(key)
        if got is None:
            problems.append(f"{key}: missing from the model")
        elif got != recorded[key]:
            want = recorded[key]
            problems.append(
                f"{key}: model has {got['dtype']}{got['shape']} sha256 {got['sha256'][:12]}..., "
                f"checkpoint recorded {want['dtype']}{want['shape']} sha256 {want['sha256'][:12]}..."
            )
    recorded_names = {k.split("[")[0] for k in recorded}
    for name in sorted(frozen - recorded_names):
        problems.append(
            f"{name}: frozen in the model but neither saved nor recorded as frozen in the checkpoint"
        )
    return problems


def frozen_error(path: Path, manifest: dict, problems: list[str]) -> str:
    source = manifest.get("frozen_source")
    return (
        f"checkpoint {path} saved trainable parameters only; the frozen part of this model does not "
        f"match the one it was trained with (frozen_source={source!r}): "
        + "; ".join(problems[:6])
        + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
    )


def fill_frozen(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus the model's own frozen parameters (a trainable-only checkpoint lacks them)."""
    out = dict(state)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in out and isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            out[name] = tensor.detach()
    return out


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
