"""The Trainer: one training loop on a DeepSpeed engine for the pretraining job and every method.

A model plugs in with a loss function ``loss_fn(model, batch, ctx) -> loss | (loss, metrics)``
returning the task loss (the Trainer adds the aux losses of every smile MoE layer in the model,
logged as ``moe_aux``); parallelism (ZeRO, expert groups), precision, accumulation, clipping,
schedules, several optimizers, evaluation, metrics, checkpoints and resume are the Trainer's job::

    topology = init_distributed(cfg.dist)            # before building an expert-parallel model
    model = build_model(topology)
    trainer = Trainer(model, loss_fn, cfg, train_data, eval_data, topology=topology)
    result = trainer.fit()                           # resumes from the newest checkpoint

Each rank passes its own data (or a factory ``data(rank, world_size)``). Every rank must run
the same number of forward passes (MoE layers and ZeRO-3 communicate inside forward).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smile.moe import collect_aux_loss
from smile.moe.experts import is_expert_parameter
from smile.moe.topology import Topology
from smile.runtime import checkpoint as ckpt
from smile.runtime import ema as ema_files
from smile.runtime import lock as runlock
from smile.runtime import reshard, supervision
from smile.runtime.config import TrainConfig, config_to_dict
from smile.runtime.data import DataStream, Source, resolve
from smile.runtime.distributed import backend_for, gather_json, init_distributed
from smile.runtime.engine import (
    build_engine,
    deepspeed_config,
    expert_group_name,
    register_groups,
    tag_expert_parameters,
)
from smile.runtime.metrics import (
    MetricsSink,
    StepTimer,
    maybe_profile,
    peak_tflops,
    plot_run,
    profile_sections,
    reduce_mean,
)
from smile.runtime.optim import GROUP_KEY, build_optimizer
from smile.runtime.schedule import lr_at
from smile.runtime.serialization import decode, encode
from smile.runtime.state import (
    load_model_state,
    load_optimizer_state,
    load_rng_state,
    model_state,
    optimizer_state,
    rng_state,
    seed_everything,
)


@dataclass(frozen=True)
class StepContext:
    """What the loss function may need to know about the current call."""

    step: int
    micro_step: int
    training: bool
    active: frozenset[str]
    topology: Topology
    device: torch.device


LossFn = Callable[[nn.Module, Any, StepContext], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]
EvalFn = Callable[[nn.Module, Iterable, StepContext], Mapping[str, float]]
# generate_fn(model, ctx) -> metrics | (metrics, samples): generation at each evaluation
GenerateFn = Callable[[nn.Module, StepContext], "Mapping[str, float] | tuple[Mapping[str, float], list]"]


@dataclass
class FitResult:
    step: int
    losses: list[float]
    resumed_from: str | None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    export: str | None = None
    resharded: dict[str, Any] | None = None  # what a resume on another layout did (reshard.py)

    def summary(self, run_dir: str | Path) -> dict[str, Any]:
        """A JSON-ready record of the run (what a method's ``train`` returns, plus its own keys)."""
        return {
            "run_dir": str(run_dir),
            "step": self.step,
            "losses": self.losses,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "resumed_from": self.resumed_from,
            "train_metrics": self.train_metrics,
        }


class _LossModule(nn.Module):
    """Runs the user's loss function inside the engine's forward, so DeepSpeed's backward
    prologue and ZeRO-3 parameter hooks see every module the loss touches."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.metrics: dict[str, torch.Tensor | float] = {}

    def forward(self, batch: Any, ctx: StepContext) -> torch.Tensor:
        out = self.loss_fn(self.model, batch, ctx)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise TypeError(
                f"loss_fn must return a scalar tensor (or (loss, metrics)), got {type(loss).__name__}"
            )
        metrics = dict(metrics)
        aux = collect_aux_loss(self.model)  # every MoE layer's router losses, added here once
        if aux is not None:
            loss = loss + aux
            metrics["moe_aux"] = aux
        self.metrics = {k: (v.detach() if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}
        return loss


class TrainingFailedError(RuntimeError):
    """No optimizer step of a run was applied: every loss or gradient was non-finite."""


class Trainer:
    """Training loop over a DeepSpeed engine with MoE-aware parameter groups."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainConfig,
        train_data: Source,
        eval_data: Source | None = None,
        *,
        topology: Topology | None = None,
        eval_fn: EvalFn | None = None,
        generate_fn: GenerateFn | None = None,
    ) -> None:
        config.validate()
        self.config = config
        if topology is not None and not dist.is_initialized():
            raise RuntimeError("Trainer got a topology but no process group; use init_distributed()")
        self.topology = topology if topology is not None else init_distributed(config.dist)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.topology.world_size != self.world_size:
            raise ValueError(
                f"topology has {self.topology.world_size} ranks, the process group {self.world_size}"
            )
        self.run_id = self._lock_run_dir(config)  # before anything is written
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_available())
        self.model = model
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.generate_fn = generate_fn
        self._opt_configs = {o.name: o for o in config.optimizers}

        has_experts = tag_expert_parameters(model, expert_group_name(self.topology)) > 0
        register_groups(self.topology, timedelta(seconds=config.dist.timeout_s))
        split = None
        if has_experts:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as split
        self.optimizer, self.selection = build_optimizer(model, config.optimizers, split_groups=split)
        ds_config = deepspeed_config(
            world_size=self.world_size,
            micro_batch_size=config.micro_batch_size,
            grad_accum_steps=config.grad_accum_steps,
            zero_stage=config.zero_stage,
            bf16=self.bf16,
            grad_clip=config.grad_clip,
            extra=config.deepspeed,
        )
        self.engine = build_engine(
            _LossModule(model, loss_fn), self.optimizer, ds_config, backend_for(config.dist)
        )
        self.device = self.engine.device
        # EMA of the trainable weights (smile.runtime.ema): checkpointed, used for evaluation.
        self.ema = ema_files.EMA(model, config.ema) if config.ema.enabled else None

        self.data = DataStream(resolve(train_data, self.rank, self.world_size))
        self.eval_source = None if eval_data is None else resolve(eval_data, self.rank, self.world_size)
        self.step = 0
        self.optimizer_steps = {name: 0 for name in self._opt_configs}
        self.totals = {name: self._steps_of(name, config.max_steps) for name in self._opt_configs}
        self.checkpoint_root = config.checkpoint_dir
        self.run_dir = Path(config.run_dir)
        self.resumed_from: str | None = None
        self._losses: list[torch.Tensor | float] = []
        self._timer = StepTimer()
        self._window = _Window()
        self._sections: dict[str, float] = {}
        self._flops_per_token = _flops_per_token(model)

    # ---- schedule of optimizers ---------------------------------------------------------------
    def active_optimizers(self, step: int) -> frozenset[str]:
        """Optimizers that step at ``step``: all of them ("joint"), or one per turn ("alternate")."""
        if self.config.optimizer_mode == "joint":
            return frozenset(self._opt_configs)
        cycle = sum(o.frequency for o in self.config.optimizers)
        position = step % cycle
        for opt in self.config.optimizers:
            if position < opt.frequency:
                return frozenset({opt.name})
            position -= opt.frequency
        raise AssertionError("unreachable")

    def _steps_of(self, name: str, steps: int) -> int:
        if self.config.optimizer_mode == "joint":
            return steps
        cycle = sum(o.frequency for o in self.config.optimizers)
        offset = 0
        for opt in self.config.optimizers:
            if opt.name == name:
                full, rest = divmod(steps, cycle)
                return full * opt.frequency + min(max(rest - offset, 0), opt.frequency)
            offset += opt.frequency
        raise KeyError(name)

    def lr(self, name: str) -> float:
        """Current peak-scaled lr of optimizer ``name`` (before per-group lr_scale)."""
        cfg = self._opt_configs[name]
        return lr_at(cfg.schedule, cfg.lr, self.optimizer_steps[name], self.totals[name])

    def _apply_lrs(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(group[GROUP_KEY]) * group.get("lr_scale", 1.0)

    @contextmanager
    def _only_active_trainable(self, active: frozenset[str]):
        """Freeze the parameters of optimizers that sit out this step ("alternate" mode)."""
        frozen = [
            p for name, named in self.selection.by_optimizer.items() if name not in active for _, p in named
        ]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train to ``max_steps`` (resuming first, per ``checkpoint.resume``); evaluate, save, export."""
        cfg = self.config
        self._resume()
        if self.resumed_from is None:
            seed_everything(cfg.seed + self.rank)
        sink = MetricsSink(
            self.run_dir,
            rank=self.rank,
            total_steps=cfg.max_steps,
            start_step=self.step,
            jsonl=cfg.log.jsonl,
            tensorboard=cfg.log.tensorboard,
            progress_bar=cfg.log.progress_bar,
        )
        last_train: dict[str, Any] = {}
        eval_metrics: dict[str, float] = {}
        saved_at = self.step if self.resumed_from else -1
        evaluated_at = -1
        path: Path | None = None
        first_step, skipped_before = self.step, getattr(self.engine, "skipped_steps", 0)
        try:
            self.engine.train()
            self._window.start()
            while self.step < cfg.max_steps:
                began = time.perf_counter()
                self._train_step()
                supervision.heartbeat(self.run_dir, self.rank, self.step)  # progress, for the launcher
                self._window.wall += time.perf_counter() - began
                sink.advance()
                done = self.step == cfg.max_steps
                if self.step % cfg.log.every == 0 or done:
                    last_train = self._log_record()
                    sink.write(last_train)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluates:
                    eval_metrics, evaluated_at = self.evaluate(), self.step
                    sink.write({"split": "eval", "step": self.step, **eval_metrics})
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    path, saved_at = self.save_checkpoint(), self.step
            self._check_steps_applied(first_step, skipped_before)  # before a final save or "done"
            if self.evaluates and evaluated_at != self.step:
                eval_metrics = self.evaluate()
                sink.write({"split": "eval", "step": self.step, **eval_metrics})
            if cfg.checkpoint.save_final and saved_at != self.step:
                path = self.save_checkpoint()
        finally:
            sink.close()
        exported = self.export(cfg.checkpoint.export_dir) if cfg.checkpoint.export_dir else None
        if self.rank == 0 and cfg.log.plot and cfg.log.jsonl:
            plot_run(sink.path, self.run_dir / "metrics.png")
        dist.barrier()
        return FitResult(
            step=self.step,
            losses=[float(x) for x in self._losses],
            resumed_from=self.resumed_from,
            train_metrics=last_train,
            eval_metrics=eval_metrics,
            checkpoint=None if path is None else str(path),
            export=None if exported is None else str(exported),
            resharded=getattr(self, "resharded", None),
        )

    def _check_steps_applied(self, first_step: int, skipped_before: int) -> None:
        """Raise :class:`TrainingFailedError` (on every rank: collective) when no step of this run
        was applied: each had a non-finite loss, or DeepSpeed skipped each for non-finite grads."""
        ran = self.step - first_step
        if ran <= 0:
            return
        nonfinite = int(sum(not torch.isfinite(torch.as_tensor(x)).item() for x in self._losses[-ran:]))
        skipped = getattr(self.engine, "skipped_steps", 0) - skipped_before
        counts = torch.tensor([nonfinite, skipped], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        nonfinite, skipped = int(counts[0]), int(counts[1])
        if max(nonfinite, skipped) >= ran:
            raise TrainingFailedError(
                f"training failed: none of the {ran} optimizer steps of this run (steps {first_step + 1}"
                f"-{self.step}) was applied: {nonfinite} had a non-finite loss, {skipped} were skipped "
                "for non-finite gradients (overflow); lower the learning rate (optimizers.*.lr), set "
                "grad_clip > 0, or check the data and the model's initialisation"
            )

    def _train_step(self) -> None:
        cfg = self.config
        active = self.active_optimizers(self.step)
        self.optimizer.active = set(active)
        self._apply_lrs()
        profile = bool(cfg.log.profile_every) and (self.step + 1) % cfg.log.profile_every == 0
        loss_sum: torch.Tensor | float = 0.0
        with self._only_active_trainable(active), maybe_profile(profile, self.model) as prof:
            for micro in range(cfg.grad_accum_steps):
                with self._timer.phase("data"):
                    raw = next(self.data)
                    batch = _to_device(raw, self.device, torch.bfloat16 if self.bf16 else None)
                ctx = StepContext(self.step, micro, True, active, self.topology, self.device)
                with self._timer.phase("forward"):
                    loss = self.engine(batch, ctx)
                with self._timer.phase("backward"):
                    self.engine.backward(loss)
                with self._timer.phase("optimizer"):
                    self.engine.step()
                loss_sum = loss_sum + loss.detach().float()
                self._window.add_micro(self.engine.module.metrics, batch)
        if prof is not None:
            self._sections = profile_sections(prof)
        step_loss = loss_sum / cfg.grad_accum_steps
        self._losses.append(step_loss)
        self._window.add_step(step_loss, self._timer.pop())
        for name in active:
            self.optimizer_steps[name] += 1
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)

    def _log_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"split": "train", "step": self.step}
        record.update(self._window.summary(self.world_size))
        for name in self._opt_configs:
            record[f"lr/{name}"] = self.lr(name)
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        peak = peak_tflops(self.config.log.peak_tflops)
        if peak and "tokens_per_s" in record and self._flops_per_token:
            record["mfu"] = record["tokens_per_s"] * self._flops_per_token / (self.world_size * peak * 1e12)
        for key, seconds in self._sections.items():  # from a step profiled since the last record
            record[f"time/{key}"] = seconds
        self._sections = {}
        self._window.start()
        return record

    # ---- evaluation ---------------------------------------------------------------------------
    @property
    def evaluates(self) -> bool:
        """Whether there is anything to evaluate (eval data, or a ``generate_fn``)."""
        return self.eval_source is not None or self.generate_fn is not None

    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the eval data (or ``eval_fn``'s metrics), plus
        ``generate_fn``'s, across ranks; with the EMA weights when ``ema.evaluate``."""
        if not self.evaluates:
            raise ValueError("Trainer.evaluate needs eval_data or a generate_fn")
        ctx = StepContext(self.step, 0, False, frozenset(), self.topology, self.device)
        self.engine.eval()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        use_ema = self.ema is not None and self.config.ema.evaluate
        try:
            with torch.no_grad(), self.ema.applied() if use_ema else nullcontext():
                if self.eval_source is not None and self.eval_fn is not None:
                    for key, value in self.eval_fn(self.model, self.eval_source, ctx).items():
                        sums[key] += float(value)
                        counts[key] += 1
                    collect_aux_loss(self.model)  # eval's router losses never reach a training step
                elif self.eval_source is not None:
                    for i, raw in enumerate(self.eval_source):
                        if self.config.eval_batches is not None and i >= self.config.eval_batches:
                            break
                        batch = _to_device(raw, self.device, torch.bfloat16 if self.bf16 else None)
                        loss = self.engine(batch, ctx)
                        sums["loss"] += float(loss)
                        counts["loss"] += 1
                        for key, value in self.engine.module.metrics.items():
                            if key not in ("tokens", "samples"):
                                sums[key] += float(value)
                                counts[key] += 1
                if self.generate_fn is not None:
                    for key, value in self._generate(ctx).items():
                        sums[key] += float(value)
                        counts[key] += 1
        finally:
            self.engine.train()
        return reduce_mean(dict(sums), dict(counts))

    def _generate(self, ctx: StepContext) -> Mapping[str, float]:
        """Run ``generate_fn`` with its own RNG (seeded by seed, step and rank; the training RNG
        stream is untouched, so resume stays bit-identical); rank 0 writes its samples to
        ``<run_dir>/samples/step_<N>.jsonl``."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.config.seed * 1_000_003 + self.step) * 4096 + self.rank)
            out = self.generate_fn(self.model, ctx)
        collect_aux_loss(self.model)  # generation's router losses never reach a training step
        metrics, samples = out if isinstance(out, tuple) else (out, None)
        if samples is not None and self.rank == 0:
            folder = self.run_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(sample) + "\n" for sample in samples)
            (folder / f"step_{self.step:08d}.jsonl").write_text(lines)
        return metrics

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint of the current step (collective); prune to keep_last.
        Refuses (on every rank, before writing) to replace a ``step_N`` of another run."""
        root, step = self.checkpoint_root, self.step
        conflict = gather_json(ckpt.owner_conflict(root, step, self.run_id) if self.rank == 0 else None)[0]
        if conflict:
            raise ckpt.CheckpointError(conflict)
        stage = ckpt.staging_dir(root, step)
        if self.rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
        dist.barrier()
        dense, experts = model_state(self.model)
        files = self._write_shards(stage, dense, experts)
        meta = self._checkpoint_meta(dense, experts)
        meta["run_id"] = self.run_id
        self._commit_checkpoint(files, meta)
        return root / ckpt.step_dir_name(step)

    def _write_shards(self, stage: Path, dense: dict, experts: dict) -> dict[str, ckpt.FileRecord]:
        """This rank's files: dense weights (rank 0), its experts (one replica), its own state."""
        files: dict[str, ckpt.FileRecord] = {}
        weights, expert_weights = dense, experts
        if self.config.checkpoint.trainable_only:  # frozen tensors: recorded (frozen.json), not saved
            files.update(reshard.write_frozen_record(self, stage, dense, experts))
            weights, expert_weights, _, _ = reshard.split_trainable(self.model, dense, experts)
        if self.rank == 0:
            files["model.safetensors"] = ckpt.write_tensors(stage, "model.safetensors", weights)
        if experts and self.topology.rank < self.topology.ep_size:
            name = f"experts-ep{self.topology.ep_rank}.safetensors"
            files[name] = ckpt.write_tensors(stage, name, expert_weights)
        self._named_state_saved = False
        if self.config.checkpoint.reshardable:  # optimizer state by parameter name (collective)
            files.update(reshard.write_named_state(self, stage))
        state = {
            "optimizer": optimizer_state(self.engine),
            "rng": rng_state(),
            "data": self.data.state_dict(),
            "loop": {"step": self.step, "optimizer_steps": dict(self.optimizer_steps)},
        }
        if self.ema is not None:
            files.update(ema_files.write_files(self.ema, stage, self.rank, self.topology))
        tree, tensors = encode(state)
        name = f"rank{self.rank}"
        files[f"{name}.safetensors"] = ckpt.write_tensors(stage, f"{name}.safetensors", tensors)
        files[f"{name}.json"] = ckpt.write_json(stage, f"{name}.json", tree)
        return files

    def _commit_checkpoint(self, files: dict[str, ckpt.FileRecord], meta: dict[str, Any]) -> None:
        """Collect every rank's file records; rank 0 writes the manifest, renames, prunes."""
        gathered = gather_json({k: [r.sha256, r.size] for k, r in files.items()})
        if self.rank == 0:
            merged = {k: ckpt.FileRecord(*v) for part in gathered for k, v in part.items()}
            supervision.ensure_agent_alive(f"commit checkpoint step {self.step}")  # never as an orphan
            ckpt.commit(self.checkpoint_root, self.step, merged, meta)
            ckpt.prune(self.checkpoint_root, self.config.checkpoint.keep_last)
        dist.barrier()

    def _checkpoint_meta(self, dense: dict, experts: dict) -> dict[str, Any]:
        return {
            **reshard.layout_of(self),
            "has_experts": bool(experts),
            "dense_shapes": {k: list(v.shape) for k, v in dense.items()},
            "config": config_to_dict(self.config),
            # what a resume on another layout needs (smile.runtime.reshard)
            "named_state": {"version": 1, "optimizer": bool(getattr(self, "_named_state_saved", False))},
            "optimizer_steps": dict(self.optimizer_steps),
            "samples_seen": self.step
            * self.config.grad_accum_steps
            * self.config.micro_batch_size
            * self.world_size,
            "trainable_only": self.config.checkpoint.trainable_only,
            "frozen_source": self.config.checkpoint.frozen_source,
            "ema": None
            if self.ema is None
            else {"decay": self.config.ema.decay, "updates": self.ema.updates},
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything from a checkpoint (collective). One written by a run of the same
        layout (world size, topology, ZeRO stage, precision, optimizers) is restored exactly;
        another layout is resharded (:mod:`smile.runtime.reshard`; see ``self.resharded``)."""
        path = Path(path)
        manifest = ckpt.read_manifest(path)
        self.resharded = None
        differences = reshard.layout_differences(self, manifest)
        if differences:
            self.resharded = reshard.load_resharded(self, path, manifest, differences)
            if self.ema is not None:  # dense EMA carried when saved; expert EMA restarts here
                self.ema.reset()
                if manifest.get("ema"):
                    dense = ema_files.read_tensors(path, manifest, self.topology, experts=False)
                    self.ema.load({**self.ema.state()[1], **dense}, f"checkpoint {path}")
                self.resharded["ema"] = "dense carried" if manifest.get("ema") else "reset to the weights"
            return
        self._check_compatible(path, manifest)
        dense = ckpt.read_tensors(path, manifest, "model.safetensors")
        weights = dict(dense)
        if manifest["has_experts"]:
            weights.update(
                ckpt.read_tensors(path, manifest, f"experts-ep{self.topology.ep_rank}.safetensors")
            )
        tree = ckpt.read_json(path, manifest, f"rank{self.rank}.json")
        state = decode(tree, ckpt.read_tensors(path, manifest, f"rank{self.rank}.safetensors"))
        if manifest.get("trainable_only"):  # the frozen part was rebuilt: check it, keep it
            reshard.verify_frozen(self, path, manifest)
            weights = reshard.fill_frozen(self.model, weights)
        try:
            load_model_state(self.model, weights, partitioned=self.config.zero_stage == 3)
        except KeyError as err:
            raise ckpt.CheckpointError(f"checkpoint {path}: {err.args[0]}") from err
        load_optimizer_state(self.engine, state["optimizer"])
        self.data.load_state_dict(state["data"])
        load_rng_state(state["rng"])
        if self.ema is not None:
            if not manifest.get("ema"):
                raise ckpt.CheckpointError(
                    f"checkpoint {path} has no EMA weights but this run has ema.decay="
                    f"{self.config.ema.decay}; resume with ema.decay=0, or start from it with load_weights"
                )
            self.ema.load(ema_files.read_tensors(path, manifest, self.topology), f"checkpoint {path}")
            self.ema.updates = int(manifest["ema"]["updates"])
        self.step = int(state["loop"]["step"])
        self.optimizer_steps.update({k: int(v) for k, v in state["loop"]["optimizer_steps"].items()})
        self.engine.global_steps = self.step
        dist.barrier()

    def _check_compatible(self, path: Path, manifest: dict[str, Any]) -> None:
        topo = self.topology
        here = {
            "world_size": self.world_size,
            "topology": {"nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "ep_nodes": topo.ep_nodes},
            "zero_stage": self.config.zero_stage,
            "precision": "bf16" if self.bf16 else "fp32",
            "optimizers": list(self._opt_configs),
        }
        for key, value in here.items():
            if manifest.get(key) != value:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} was written with {key}={manifest.get(key)!r}, "
                    f"this run has {key}={value!r}; "
                    "resume with the same world size, topology, ZeRO stage, precision and optimizers "
                    "(use smile.runtime.load_weights to start a different run from its weights)"
                )

    def _lock_run_dir(self, config: TrainConfig) -> str:
        """Rank 0 takes the run-dir lock and removes a crash's leftovers; every rank gets this
        run's id or the same error. The lock is released by :meth:`close` or at exit."""
        lock, outcome = None, {"run_id": None, "error": None, "locked": False}
        if self.rank == 0:
            try:
                lock = runlock.acquire(config.run_dir)
                ckpt.clean_leftovers(config.checkpoint_dir, Path(config.run_dir))
                outcome["run_id"] = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            except Exception as err:  # every rank must raise, not wait in the gather below
                outcome.update(error=str(err), locked=isinstance(err, runlock.RunLockedError))
                if lock is not None:
                    lock.release()
                    lock = None
                if not outcome["locked"]:
                    gather_json(outcome)
                    raise
        outcome = gather_json(outcome)[0]
        if outcome["error"]:
            error = runlock.RunLockedError if outcome["locked"] else RuntimeError
            raise error(outcome["error"] if outcome["locked"] else f"rank 0 failed: {outcome['error']}")
        self._release_lock = weakref.finalize(self, lock.release) if lock is not None else None
        return outcome["run_id"]

    def close(self) -> None:
        """Release the run-directory lock (rank 0; also done when the Trainer is collected or
        the interpreter exits)."""
        if getattr(self, "_release_lock", None) is not None:
            self._release_lock()

    def _resume(self) -> None:
        mode = self.config.checkpoint.resume
        if mode == "never":
            return
        if mode == "auto":
            choice = None
            if self.rank == 0:  # rank 0 verifies every file, newest first, and broadcasts its pick
                found, _, skipped = ckpt.latest_verified(self.checkpoint_root)
                for bad, why in skipped:
                    ckpt.log.warning("resume: skipping checkpoint %s: %s", bad, why)
                choice = None if found is None else str(found)
                if found is None and skipped:
                    choice = {
                        "error": f"resume=auto: no checkpoint under {self.checkpoint_root} verifies "
                        f"({len(skipped)} broken: {', '.join(p.name for p, _ in skipped)}); move them "
                        "away, or start fresh with checkpoint.resume=never and another checkpoint dir"
                    }
            choice = gather_json(choice)[0]
            if isinstance(choice, dict):
                raise ckpt.CheckpointError(choice["error"])
            if choice is None:
                return
        else:
            choice = mode
        self.load_checkpoint(choice)
        self.resumed_from = str(choice)
        # Continuing a run of this checkpoint dir continues its run id (and may re-save its steps).
        if Path(choice).resolve().parent == Path(self.checkpoint_root).resolve():
            self.run_id = ckpt.read_manifest(Path(choice)).get("run_id") or self.run_id

    # ---- export -------------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> Path:
        """Consolidated save_pretrained-style directory of the model (collective; rank 0 writes)."""
        from smile.runtime.export import export_pretrained

        return export_pretrained(self.model, out_dir, self.topology)


class _Window:
    """Sums over the steps since the last log record."""

    def start(self) -> None:
        self.wall = 0.0  # seconds inside training steps (evaluation and checkpoints excluded)
        self.steps = 0
        self.loss: torch.Tensor | float = 0.0
        self.sums: dict[str, Any] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.samples = 0.0
        self.tokens: torch.Tensor | float = 0.0
        self.has_tokens = False
        self.phases: dict[str, float] = defaultdict(float)

    def add_micro(self, metrics: Mapping[str, Any], batch: Any) -> None:
        samples, tokens = metrics.get("samples"), metrics.get("tokens")
        if samples is None:
            samples = _count_samples(batch)
        if tokens is None:
            tokens = _count_tokens(batch)
        self.samples += float(samples or 0)
        if tokens is not None:
            self.tokens = self.tokens + tokens  # a tensor stays on device until the log record
            self.has_tokens = True
        for key, value in metrics.items():
            if key not in ("samples", "tokens"):
                self.sums[key] = self.sums[key] + value
                self.counts[key] += 1

    def add_step(self, loss: torch.Tensor, phases: dict[str, float]) -> None:
        self.steps += 1
        self.loss = self.loss + loss
        for key, value in phases.items():
            self.phases[key] += value

    def summary(self, world_size: int) -> dict[str, Any]:
        elapsed = max(self.wall, 1e-9)
        sums = {k: float(v) for k, v in self.sums.items()}
        sums["loss"] = float(self.loss)
        counts = dict(self.counts)
        counts["loss"] = float(self.steps)
        record: dict[str, Any] = reduce_mean(sums, counts)
        totals = torch.tensor([self.samples, float(self.tokens)], dtype=torch.float64)
        if world_size > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(dev)
            dist.all_reduce(totals)
            totals = totals.cpu()
        record["samples_per_s"] = float(totals[0]) / elapsed
        if self.has_tokens:
            record["tokens_per_s"] = float(totals[1]) / elapsed
        record["step_time"] = elapsed / max(self.steps, 1)
        for key, value in self.phases.items():
            record[f"time/{key}"] = value / max(self.steps, 1)
        return record


def _count_samples(batch: Any) -> int | None:
    tensor = _first_tensor(batch)
    return None if tensor is None or tensor.dim() == 0 else int(tensor.shape[0])


def _count_tokens(batch: Any) -> torch.Tensor | int | None:
    if isinstance(batch, Mapping):
        if torch.is_tensor(batch.get("attention_mask")):
            return batch["attention_mask"].sum()
        if torch.is_tensor(batch.get("input_ids")):
            return int(batch["input_ids"].numel())
    return None


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if torch.is_tensor(batch):
        return batch
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    )
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None) -> Any:
    """Move tensors to the engine's device; under bf16, floating tensors become bf16."""
    if torch.is_tensor(batch):
        batch = batch.to(device, non_blocking=True)
        if float_dtype is not None and batch.is_floating_point():
            batch = batch.to(float_dtype)
        return batch
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device, float_dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, float_dtype) for v in batch)
    return batch


def _flops_per_token(model: nn.Module) -> float | None:
    """Training FLOPs per token: the model's own ``flops_per_token`` if it has one, else
    6 x non-expert parameters (a lower bound for MoE models)."""
    own = getattr(model, "flops_per_token", None)
    if own is not None:
        return float(own() if callable(own) else own)
    dense = (p for p in model.parameters() if not is_expert_parameter(p))
    return 6.0 * sum(getattr(p, "ds_numel", p.numel()) for p in dense)  # ds_numel: ZeRO-3 partitioned
