"""The DeepSpeed engine under the Trainer, made aware of smile's expert parameters and groups.

DeepSpeed (0.19.8) reduces a parameter across its expert-data-parallel group, not the whole
data-parallel world, when the parameter carries ``allreduce=False`` and a ``group_name`` whose
groups are registered in ``deepspeed.utils.groups``, and only when the engine believes the model
has MoE layers (``has_moe_layers``), which it decides by looking for its own ``MoE`` modules.
Here:

* smile's topology groups are registered under DeepSpeed's name for them (``ep_size_<E>``), so
  the groups it reduces over are exactly ``topology.group("ep")`` / ``topology.group("edp")``;
* every ``smile.moe.experts.is_expert_parameter`` parameter is tagged (also for ZeRO-3 placement);
* :class:`SmileEngine` sets ``has_moe_layers`` from those tags, computes the exact global gradient
  norm at stage 0 (DeepSpeed averages per-rank norms there), and lets ZeRO-3 partition the dense
  parameters over all ranks and each expert over its expert-data-parallel group, a placement
  DeepSpeed's stage-3 code supports but only unlocks for its own AutoEP layers.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smile.moe.experts import is_expert_parameter
from smile.moe.topology import Topology
from smile.runtime.config import merge_mappings

log = logging.getLogger(__name__)

# The DeepSpeed versions this module's patches of DeepSpeed internals are tested against:
# (lowest supported, first unsupported). Keep in step with pyproject.toml.
DEEPSPEED_RANGE = ("0.19.8", "0.20")
DEEPSPEED_SPEC = f"deepspeed>={DEEPSPEED_RANGE[0]},<{DEEPSPEED_RANGE[1]}"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside :data:`DEEPSPEED_RANGE`."""


def _installed_deepspeed_version() -> str | None:
    """The installed DeepSpeed's version string, or None if it is not installed (cheap: no import)."""
    from importlib import metadata

    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string ("0.19.8+cu124" -> (0, 19, 8))."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(version).release
        except InvalidVersion:
            pass
    except ImportError:
        pass
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    if match is None:
        raise DeepSpeedVersionError(
            f"cannot parse DeepSpeed version {version!r}; smile needs {DEEPSPEED_SPEC}"
        )
    return tuple(int(n) for n in match.group().split("."))


def _padded(release: tuple[int, ...], width: int = 8) -> tuple[int, ...]:
    return release + (0,) * (width - len(release))


def check_deepspeed_version(version: str | None = None) -> str:
    """Raise :class:`DeepSpeedVersionError` unless DeepSpeed ``version`` (default: the installed
    one) is inside :data:`DEEPSPEED_RANGE`; returns the version checked.

    Compares release numbers only, so local builds (``0.19.8+cu124``) of a supported release pass.
    """
    if version is None:
        version = _installed_deepspeed_version()
    if version is None:
        raise DeepSpeedVersionError(f"DeepSpeed is not installed; smile's runtime needs {DEEPSPEED_SPEC}")
    low, high = (_padded(_release(v)) for v in DEEPSPEED_RANGE)
    if not low <= _padded(_release(version)) < high:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is installed but smile's runtime supports only {DEEPSPEED_SPEC} "
            f"(smile/runtime/engine.py patches its internals); install e.g. "
            f"`pip install 'deepspeed=={DEEPSPEED_RANGE[0]}'`"
        )
    return version


def expert_group_name(topology: Topology) -> str:
    """DeepSpeed's name for the groups of expert-parallel size ``ep`` (some of its code parses it)."""
    return f"ep_size_{topology.ep_size}"


def deepspeed_config(
    *,
    world_size: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    zero_stage: int,
    bf16: bool,
    grad_clip: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict the Trainer runs with (``extra`` deep-merged on top)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(),
            "reduce_scatter": True,
        },
        # The composite optimizer is a torch.optim.Optimizer DeepSpeed does not list.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return merge_mappings(config, extra or {})


def tag_expert_parameters(model: nn.Module, group_name: str) -> int:
    """Mark smile expert parameters the way DeepSpeed's MoE code recognises; returns how many."""
    count = 0
    for param in model.parameters():
        if is_expert_parameter(param):
            param.allreduce = False
            param.group_name = group_name
            param.ds_zero_placement_family = "autoep_expert"
            param.ds_zero_partition_group_name = group_name
            count += 1
    return count


def register_groups(topology: Topology, timeout: timedelta) -> None:
    """Make DeepSpeed reduce experts over smile's groups and the rest over a world clone.

    Collective: every rank calls it once, in the same order, before the engine is built.
    """
    check_deepspeed_version()
    from deepspeed.utils import groups

    name = expert_group_name(topology)
    groups._EXPERT_PARALLEL_GROUP[name] = topology.group("ep")
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = topology.group_ranks("ep")
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = topology.group("edp")
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = topology.group_ranks("edp")
    if groups._WORLD_GROUP is None:
        # DeepSpeed's dense data-parallel group; made here so it carries the run's timeout.
        groups._WORLD_GROUP = dist.new_group(list(range(dist.get_world_size())), timeout=timeout)


def _engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class SmileEngine(DeepSpeedEngine):
        """DeepSpeedEngine that treats tagged smile expert parameters as MoE parameters."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if any(is_expert_parameter(p) and p.requires_grad for p in model.parameters()):
                self.has_moe_layers = True

        def _validate_zero3_moe_compatibility(self) -> None:
            if not self.has_moe_layers:
                return
            if self.sequence_parallel_size != 1:
                raise ValueError("ZeRO-3 with smile experts does not support sequence parallelism")
            if self.zero_quantized_gradients():
                raise ValueError("ZeRO-3 with smile experts does not support zero_quantized_gradients")
            if getattr(self._config.zero_config, "zero_hpz_partition_size", 1) > 1:
                raise ValueError("ZeRO-3 with smile experts does not support zero_hpz_partition_size > 1")

        def clip_fp32_gradients(self) -> None:
            """Stage-0 fp32 clipping with the exact global norm over dense and all experts."""
            self._global_grad_norm = clip_global_norm(self.module.parameters(), self.gradient_clipping())

    return SmileEngine


def clip_global_norm(parameters, max_norm: float) -> float:
    """Clip reduced gradients by the norm of the whole model's gradient.

    Dense gradients are identical on every rank after reduction; each expert's gradient is
    identical across its replicas, so summing expert squares over the expert-parallel group
    counts every expert exactly once.
    """
    from deepspeed.utils import groups

    params = [p for p in parameters if p.grad is not None]
    dense = [p.grad for p in params if not is_expert_parameter(p)]
    expert = [p for p in params if is_expert_parameter(p)]
    device = params[0].grad.device if params else torch.device("cpu")
    dense_sq = sum((g.float().pow(2).sum() for g in dense), torch.zeros((), device=device))
    expert_sq = sum((p.grad.float().pow(2).sum() for p in expert), torch.zeros((), device=device))
    if expert and dist.is_initialized():
        dist.all_reduce(expert_sq, group=groups._get_expert_parallel_group(expert[0].group_name))
    total = float((dense_sq + expert_sq).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], backend: str):
    """Construct the engine (what ``deepspeed.initialize`` does, with :class:`SmileEngine`)."""
    check_deepspeed_version()
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    _skip_unused_shm_op()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_comm.init_distributed(dist_backend=backend, dist_init_required=False, verbose=False)
    partition_parameters.shutdown_init_context()
    try:
        config_class = DeepSpeedConfig(config)
        deepspeed.set_optimizer_flags(config_class, module)
        engine = _engine_class()(
            args=None, model=module, optimizer=optimizer, config=config, config_class=config_class
        )
    finally:
        partition_parameters.restore_init_context()
    return engine


def _skip_unused_shm_op() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce op.

    It serves only DeepSpeed's inference all-reduce, which training never calls, and building it
    takes minutes of C++ compilation on a fresh machine.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
