"""Resuming a checkpoint on another layout: world size, nodes x GPUs, expert parallelism, ZeRO
stage, precision or optimizer set.

Besides DeepSpeed's own per-rank optimizer state (what a same-layout resume loads, bit-identically),
every checkpoint holds the optimizer state by parameter NAME, in the spirit of DeepSpeed's
universal checkpoint: for each trainable parameter its fp32 master weight and each
parameter-shaped state tensor of its optimizer (``exp_avg``/``exp_avg_sq`` for Adam-family,
``momentum_buffer`` for SGD, ...) plus the scalar ones (``step``), full size. Dense parameters are
written once (``optim-dense.safetensors``, rank 0); expert parameters per expert-parallel rank
(``optim-experts-ep<r>.safetensors``, local experts stacked along dim 0, as the weights are), so
any layout re-slices them by global expert id (``first = ep_rank * num_local``) with the same
function that re-slices the weights (:func:`smile.runtime.export.expert_block`).

The full tensors are assembled through DeepSpeed's fragment API (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` at ZeRO 1-2 and in the bf16 optimizer, the stage-3
optimizer's ``get_full_hp_param`` at ZeRO-3: collectives over each parameter's partition group)
and written back into whatever partitions the loading engine has.

What a different layout does to the rest (reported in ``FitResult.resharded`` and logged):

* optimizer: an optimizer (by name) whose type is unchanged carries its state; one that is new,
  or whose type changed, starts fresh (no state: created at its first step), and a parameter the
  checkpoint lacks gets zero moments in a carried optimizer. Hyperparameters (lr, betas, decay,
  schedule) always come from the new config; the schedule position is the saved optimizer step.
* data position, world size unchanged: every rank restores its own saved position.
  World size changed: the position is re-derived from the samples seen,
  ``step x grad_accum_steps x micro_batch_size x world_size`` of the saved run, and each rank
  skips ``samples_seen // (micro_batch_size x world_size)`` batches of its new source from the
  start (iterating them; crossing epochs). A factory ``data(rank, world_size)`` that deals a
  global sample order out to the ranks thus continues at the same global sample.
* RNG, world size unchanged: per-rank states restored. Changed: re-seeded with
  ``seed + step x world_size + rank`` (deterministic, distinct per rank and step).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smile.moe.experts import is_expert_parameter
from smile.runtime import checkpoint as ckpt
from smile.runtime.distributed import gather_json
from smile.runtime.export import (
    concat_expert_files,
    expert_block,
    fill_frozen,
    frozen_error,
    frozen_hashes,
    frozen_mismatches,
    frozen_names,
    full_shape,
    read_weights,
    slice_experts,
)
from smile.runtime.serialization import decode
from smile.runtime.state import load_model_state, load_rng_state, model_state, seed_everything

log = logging.getLogger(__name__)

OPTIM_DENSE = "optim-dense.safetensors"
OPTIM_EXPERTS = "optim-experts-ep"  # + <ep rank>.safetensors
OPTIM_META = "optim.json"
FROZEN = "frozen.json"
SEP = "::"
MASTER = "fp32"
LAYOUT_KEYS = ("world_size", "topology", "zero_stage", "precision", "optimizers")


# ---- access to an engine's optimizer state by parameter ------------------------------------------
class _Access:
    """One parameter's full fp32 master / state tensors, whatever DeepSpeed wrapper holds them."""

    def __init__(self, engine) -> None:
        opt = engine.optimizer
        self.opt = opt
        self.kind: str | None = None
        if hasattr(opt, "fp32_partitioned_groups_flat") and hasattr(opt, "fp16_groups"):
            self.kind, lp_groups, self.flats = "zero3", opt.fp16_groups, opt.fp32_partitioned_groups_flat
        elif hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "bit16_groups"):
            self.kind, lp_groups, self.flats = "linked", opt.bit16_groups, opt.single_partition_of_fp32_groups
        elif hasattr(opt, "fp32_groups_flat_partition") and hasattr(opt, "bf16_groups"):
            self.kind, lp_groups, self.flats = "linked", opt.bf16_groups, opt.fp32_groups_flat_partition
        elif isinstance(opt, torch.optim.Optimizer) and not (
            engine.zero_optimization() or engine.bfloat16_enabled()
        ):
            self.kind, lp_groups, self.flats = "plain", [g["params"] for g in opt.param_groups], None
        else:  # e.g. a wrapper this module does not know: weights carry, optimizer state does not
            return
        self.lp_groups = lp_groups
        self.inner = opt if self.kind == "plain" else opt.optimizer
        self.group_of = {id(p): i for i, group in enumerate(lp_groups) for p in group}

    def key(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor the torch optimizer keys this parameter's state by."""
        return param if self.kind == "plain" else self.flats[self.group_of[id(param)]]

    def state_keys(self, param: nn.Parameter) -> tuple[list[str], dict[str, torch.Tensor]]:
        """(parameter-shaped state keys, scalar state entries) of this parameter's group."""
        key = self.key(param)
        state = self.inner.state.get(key, {})
        shaped = sorted(
            k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape == key.shape
        )
        scalars = {
            k: (v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v)))
            for k, v in state.items()
            if (torch.is_tensor(v) and v.dim() == 0) or isinstance(v, (int, float))
        }
        return shaped, scalars

    def get(self, param: nn.Parameter, state_key: str | None) -> torch.Tensor:
        """Full fp32 master (``state_key`` None) or state tensor. Collective at ZeRO 1-3."""
        if self.kind == "plain":
            value = param if state_key is None else self.inner.state[param][state_key]
        elif self.kind == "zero3":
            value = self.opt.get_full_hp_param(param, state_key)
        else:
            value = param.get_full_hp_param(state_key)
        return value.detach().to("cpu", torch.float32, copy=True).reshape(full_shape(param))

    def set(self, param: nn.Parameter, state_key: str | None, value: torch.Tensor) -> None:
        """Write this rank's part of a full fp32 master / state tensor (local, no collective)."""
        if self.kind == "plain":
            target = param if state_key is None else self.inner.state[param][state_key]
            with torch.no_grad():
                target.copy_(value.to(target.device, target.dtype).reshape(target.shape))
        elif self.kind == "zero3":
            part, _ = self.opt._get_fp32_opt_state_partition(
                param, release_swap_buffers=False, optim_state_key=state_key
            )
            _write_partition(part, value, self.opt._get_param_partition_rank(param))
        else:
            param.set_full_hp_param(value.to(torch.float32), state_key)

    def masters_from_weights(self) -> None:
        """fp32 masters := the model's (just loaded) weights."""
        if self.kind != "plain":
            self.opt._restore_from_bit16_weights()

    def link(self, group: int) -> None:
        """Point DeepSpeed's per-parameter state fragments at this group's (new) state tensors."""
        if self.kind == "linked":
            from deepspeed.utils import lazy_init_hp_params_optimizer_state

            lazy_init_hp_params_optimizer_state(self.lp_groups[group], self.flats[group], self.inner.state)

    def relink_after_step(self) -> None:
        if self.kind == "linked" and hasattr(self.opt, "_hp_optimizer_states_linked"):
            self.opt._hp_optimizer_states_linked = False


def _write_partition(part: torch.Tensor, value: torch.Tensor, rank: int) -> None:
    """Copy rank ``rank``'s slice of the flattened ``value`` into ``part`` (zero padding past the end)."""
    flat = value.reshape(-1)
    start = part.numel() * rank
    count = max(0, min(part.numel(), flat.numel() - start))
    with torch.no_grad():
        part.zero_()
        if count:
            part.view(-1)[:count].copy_(flat[start : start + count].to(part.device, part.dtype))


# ---- save ------------------------------------------------------------------------------------------
def collect_optimizer_state(
    engine, named: list[tuple[str, nn.Parameter]]
) -> dict[str, dict[str, torch.Tensor]] | None:
    """Every trainable parameter's full fp32 master and optimizer state, by name (collective;
    every rank gets full tensors). None when the engine's optimizer wrapper is not supported."""
    access = _Access(engine)
    if access.kind is None:
        return None
    if access.kind == "linked":  # DeepSpeed links the fragments once, after the first group's step
        for group, flat in enumerate(access.flats):
            if access.inner.state.get(flat):
                access.link(group)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in named:
        shaped, scalars = access.state_keys(param)
        entry = {MASTER: access.get(param, None)}
        for key in shaped:
            entry[key] = access.get(param, key)
        entry.update({k: v.to("cpu", copy=True) for k, v in scalars.items()})
        out[name] = entry
    return out


def write_named_state(trainer, stage: Path) -> dict[str, ckpt.FileRecord]:
    """The optimizer state by name (see the module docstring); collective. Files of this rank."""
    files: dict[str, ckpt.FileRecord] = {}
    named = [(n, p) for member in trainer.selection.by_optimizer.values() for n, p in member]
    order = {n: i for i, (n, _) in enumerate(trainer.model.named_parameters())}
    named.sort(key=lambda item: order.get(item[0], len(order)))  # one order on every rank
    state = collect_optimizer_state(trainer.engine, named)
    trainer._named_state_saved = state is not None
    if state is None:
        return files
    experts = {n for n, p in named if is_expert_parameter(p)}
    dense = {f"{n}{SEP}{k}": v for n, e in state.items() if n not in experts for k, v in e.items()}
    local = {f"{n}{SEP}{k}": v for n, e in state.items() if n in experts for k, v in e.items()}
    topo = trainer.topology
    if trainer.rank == 0:
        files[OPTIM_DENSE] = ckpt.write_tensors(stage, OPTIM_DENSE, dense)
        owner = {n: m for m, params in trainer.selection.by_optimizer.items() for n, _ in params}
        meta = {
            "version": 1,
            "optimizers": {name: {"type": cfg.type} for name, cfg in trainer._opt_configs.items()},
            "params": {n: {"optimizer": owner[n], "expert": n in experts} for n in state},
        }
        files[OPTIM_META] = ckpt.write_json(stage, OPTIM_META, meta)
    if experts and topo.rank < topo.ep_size:
        name = f"{OPTIM_EXPERTS}{topo.ep_rank}.safetensors"
        files[name] = ckpt.write_tensors(stage, name, local)
    return files


def split_trainable(model: nn.Module, dense: dict, experts: dict) -> tuple[dict, dict, set[str], set[str]]:
    """(dense, experts) without frozen parameters, and the frozen / expert parameter names."""
    frozen, expert_names = frozen_names(model)
    return (
        {k: v for k, v in dense.items() if k not in frozen},
        {k: v for k, v in experts.items() if k not in frozen},
        frozen,
        expert_names,
    )


def write_frozen_record(trainer, stage: Path, dense: dict, experts: dict) -> dict[str, ckpt.FileRecord]:
    """``frozen.json``: name, shape, dtype and sha256 of every frozen tensor (experts per global
    expert id); collective (rank 0 writes)."""
    topo = trainer.topology
    frozen, expert_names = frozen_names(trainer.model)
    mine: dict[str, dict] = {}
    if trainer.rank == 0:
        mine.update(frozen_hashes(dense, frozen, expert_names, topo))
    if topo.rank < topo.ep_size:
        mine.update(frozen_hashes(experts, frozen, expert_names, topo))
    merged: dict[str, dict] = {}
    for part in gather_json(mine):
        merged.update(part)
    if trainer.rank == 0:
        return {FROZEN: ckpt.write_json(stage, FROZEN, dict(sorted(merged.items())))}
    return {}


# ---- load ------------------------------------------------------------------------------------------
def layout_of(trainer) -> dict[str, Any]:
    topo = trainer.topology
    return {
        "world_size": trainer.world_size,
        "topology": {"nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "ep_nodes": topo.ep_nodes},
        "zero_stage": trainer.config.zero_stage,
        "precision": "bf16" if trainer.bf16 else "fp32",
        "optimizers": list(trainer._opt_configs),
    }


def layout_differences(trainer, manifest: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    here = layout_of(trainer)
    return {k: (manifest.get(k), here[k]) for k in LAYOUT_KEYS if manifest.get(k) != here[k]}


def check_reshardable(path: Path, manifest: dict[str, Any], differences: dict[str, tuple[Any, Any]]) -> None:
    """Refuse a manifest that cannot describe a real run (e.g. edited) before resharding from it."""
    topo = manifest.get("topology") or {}
    world = manifest.get("world_size")
    ranks = topo.get("nodes", 0) * topo.get("gpus_per_node", 0)
    problems = []
    if world != ranks:
        problems.append(f"its topology {topo} has {ranks} ranks")
    missing = [
        f"rank{r}.json"
        for r in range(world if isinstance(world, int) else 0)
        if f"rank{r}.json" not in manifest["files"]
    ]
    if missing:
        problems.append(f"its manifest lists no {', '.join(missing[:4])}")
    if problems:
        said = "; ".join(f"{k}={old!r}, this run has {k}={new!r}" for k, (old, new) in differences.items())
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written with {said}, but it cannot be resharded: "
            + "; ".join(problems)
            + " (an inconsistent or edited manifest)"
        )


def verify_frozen(trainer, path: Path, manifest: dict[str, Any]) -> None:
    """Collective: the rebuilt frozen part of the model must match the checkpoint's record."""
    recorded = ckpt.read_json(path, manifest, FROZEN) if FROZEN in manifest["files"] else {}
    dense, experts = model_state(trainer.model)  # gathered under ZeRO-3
    problems = frozen_mismatches(trainer.model, recorded, trainer.topology, {**dense, **experts})
    everyone = sorted({p for part in gather_json(problems) for p in part})
    if everyone:
        raise ckpt.CheckpointError(frozen_error(path, manifest, everyone))


def _saved_optimizer_state(trainer, path: Path, manifest: dict[str, Any]) -> tuple[dict, dict] | None:
    """``({name: {key: tensor for this rank}}, optim.json)`` or None when the checkpoint has none."""
    if not manifest.get("named_state", {}).get("optimizer") or OPTIM_META not in manifest["files"]:
        return None
    meta = ckpt.read_json(path, manifest, OPTIM_META)
    flat = ckpt.read_tensors(path, manifest, OPTIM_DENSE)
    flat.update(concat_expert_files(path, manifest, OPTIM_EXPERTS))
    params = dict(trainer.model.named_parameters())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in flat.items():
        name, key = full_key.rsplit(SEP, 1)
        param = params.get(name)
        if param is not None and is_expert_parameter(param) and tensor.dim() > 0:
            tensor = expert_block(name, tensor, full_shape(param), trainer.topology)
        out.setdefault(name, {})[key] = tensor
    return out, meta


def load_resharded(trainer, path: Path, manifest: dict[str, Any], differences: dict) -> dict[str, Any]:
    """Restore ``trainer`` from a checkpoint of another layout (collective); returns the report."""
    check_reshardable(path, manifest, differences)
    model, topo, cfg = trainer.model, trainer.topology, trainer.config
    zero3 = cfg.zero_stage == 3
    # -- read and check everything first: nothing is changed before all checks pass
    weights, _ = read_weights(path)
    weights = slice_experts(model, weights, topo)
    rebuilt: set[str] = set()
    if manifest.get("trainable_only"):
        verify_frozen(trainer, path, manifest)
        rebuilt = set(fill_frozen(model, weights)) - set(weights)
        weights = fill_frozen(model, weights)
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: weights do not match the model: "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    saved = _saved_optimizer_state(trainer, path, manifest)
    old_world, new_world = int(manifest["world_size"]), trainer.world_size
    same_world = old_world == new_world
    if same_world:
        tree = ckpt.read_json(path, manifest, f"rank{trainer.rank}.json")
        per_rank = decode(tree, ckpt.read_tensors(path, manifest, f"rank{trainer.rank}.safetensors"))
        loop = per_rank["loop"]
    else:
        per_rank = None
        loop = {"step": manifest["step"], "optimizer_steps": manifest.get("optimizer_steps")}
        if loop["optimizer_steps"] is None:  # older checkpoints: rank 0's loop state
            loop = decode(ckpt.read_json(path, manifest, "rank0.json")["loop"], {})

    # -- weights (and the fp32 masters from them)
    access = _Access(trainer.engine)
    try:
        load_model_state(model, weights, partitioned=zero3)
    except KeyError as err:
        raise ckpt.CheckpointError(f"checkpoint {path}: {err.args[0]}") from err
    if zero3:
        opt = trainer.engine.optimizer
        for name, param in model.named_parameters():
            if hasattr(param, "ds_tensor") and name not in rebuilt:
                _write_partition(param.ds_tensor, weights[name], opt._get_param_partition_rank(param))
    if access.kind is not None:
        access.masters_from_weights()

    # -- optimizer state
    report_opt = _apply_optimizer_state(trainer, access, saved)

    # -- loop, data, RNG
    trainer.step = int(loop["step"])
    trainer.optimizer_steps.update(
        {k: int(v) for k, v in loop["optimizer_steps"].items() if k in trainer.optimizer_steps}
    )
    trainer.engine.global_steps = trainer.step
    if same_world:
        trainer.data.load_state_dict(per_rank["data"])
        load_rng_state(per_rank["rng"])
        data_report: dict[str, Any] = {"mode": "restored per rank (world size unchanged)"}
        rng_report = "restored per rank"
    else:
        old_cfg = manifest.get("config", {})
        samples = manifest.get("samples_seen")
        if samples is None:
            samples = (
                trainer.step
                * old_cfg.get("grad_accum_steps", 1)
                * old_cfg.get("micro_batch_size", 1)
                * old_world
            )
        per_step = cfg.micro_batch_size * new_world
        batches, remainder = divmod(int(samples), per_step)
        trainer.data.seek(batches)
        seed = cfg.seed + trainer.step * new_world + trainer.rank
        seed_everything(seed)
        data_report = {
            "mode": "re-derived from samples seen",
            "samples_seen": int(samples),
            "batches_skipped_per_rank": batches,
            "samples_not_divisible": remainder,
        }
        rng_report = (
            f"re-seeded: seed + step x world_size + rank (rank 0: {cfg.seed + trainer.step * new_world})"
        )
    report = {
        "from": {k: manifest.get(k) for k in LAYOUT_KEYS},
        "to": layout_of(trainer),
        "changed": sorted(differences),
        "weights": "loaded; experts re-sliced by global expert id",
        "optimizer": report_opt,
        "data": data_report,
        "rng": rng_report,
    }
    if trainer.rank == 0:
        log.warning(
            "resumed %s on a different layout (%s): %s",
            path,
            ", ".join(sorted(differences)),
            json.dumps(report),
        )
    dist.barrier()
    return report


def _apply_optimizer_state(trainer, access: _Access, saved: tuple[dict, dict] | None) -> dict[str, Any]:
    """Write the saved per-name state into this engine's partitions; what could not be carried
    starts fresh. Local (no collective)."""
    members = trainer._opt_configs
    if access.kind is None:
        return {
            "carried": [],
            "reinitialized": {m: "optimizer wrapper not supported for resharding" for m in members},
            "params_reinitialized": [],
        }
    state, meta = saved if saved is not None else ({}, {})
    saved_types = {m: v.get("type") for m, v in meta.get("optimizers", {}).items()}
    carry, reinit = [], {}
    for name, cfg in members.items():
        if saved is None:
            reinit[name] = "the checkpoint has no per-name optimizer state (reshardable: false, or older)"
        elif name not in saved_types:
            reinit[name] = "not in the checkpoint"
        elif saved_types[name] != cfg.type:
            reinit[name] = f"type changed from {saved_types[name]} to {cfg.type}"
        else:
            carry.append(name)
    owner = {n: m for m, params in trainer.selection.by_optimizer.items() for n, _ in params}
    names = {id(p): n for m in trainer.selection.by_optimizer.values() for n, p in m}
    params_reinit: list[str] = []
    # fp32 masters: the saved ones where present (exact under bf16), else from the weights.
    for member in trainer.selection.by_optimizer.values():
        for name, param in member:
            if MASTER in state.get(name, {}):
                access.set(param, None, state[name][MASTER])
    groups = range(len(access.lp_groups))
    for group in groups:
        params = [p for p in access.lp_groups[group] if id(p) in names]
        if not params:
            continue
        key = access.key(params[0]) if access.kind != "plain" else None
        targets = [key] if key is not None else params
        member = owner[names[id(params[0])]]
        if member not in carry:
            for t in targets:
                access.inner.state.pop(t, None)
            continue
        entries = [state.get(names[id(p)], {}) for p in params]
        shaped = sorted({k for e in entries for k, v in e.items() if k != MASTER and v.dim() > 0})
        scalars = next((dict((k, v) for k, v in e.items() if v.dim() == 0) for e in entries if e), {})
        if not shaped and not scalars:
            for t in targets:
                access.inner.state.pop(t, None)
            continue
        for t in targets:
            fresh: dict[str, Any] = {k: torch.zeros_like(t) for k in shaped}
            fresh.update({k: v.clone().to(torch.float32) for k, v in scalars.items()})
            access.inner.state[t] = fresh
        access.link(group)
        for param, entry in zip(params, entries):
            for k in shaped:
                if k in entry:
                    access.set(param, k, entry[k])
                else:
                    params_reinit.append(f"{names[id(param)]}.{k}")
    access.relink_after_step()
    return {"carried": carry, "reinitialized": reinit, "params_reinitialized": params_reinit}
