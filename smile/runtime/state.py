"""Capture and restore what a checkpoint holds: model weights (dense and this rank's experts),
DeepSpeed optimizer state, and RNG states.

Model weights are saved full-size (ZeRO-3 partitions are gathered): non-expert parameters and
buffers once, expert parameters once per expert-parallel rank. Optimizer state is DeepSpeed's
own per-rank ``state_dict`` (fp32 master partitions and moments), serialised without pickle.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from smile.moe.experts import is_expert_parameter

# Keys of DeepSpeed's ZeRO state dicts that hold Python objects. The loss scaler is static for
# the fp32/bf16 runs this runtime makes (it is re-attached from the live optimizer on load);
# the slice mappings only serve DeepSpeed's universal-checkpoint converter.
_OBJECT_KEYS = ("loss_scaler", "param_slice_mappings")


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full ``(dense, experts)`` state of ``model`` on this rank. Collective under ZeRO-3."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    with _gathered(list(model.parameters())):
        for name, tensor in model.state_dict(keep_vars=True).items():
            target = experts if is_expert_parameter(tensor) else dense
            target[name] = tensor.detach().to("cpu", copy=True)
    return dense, experts


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], partitioned: bool) -> None:
    """Copy saved weights into ``model`` (strict on names). Under ZeRO-3 (``partitioned``) only
    buffers are copied here; parameters come back with the optimizer's fp32 partitions."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint weights do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    with torch.no_grad():
        for name, target in own.items():
            if partitioned and isinstance(target, nn.Parameter):
                continue
            source = state[name]
            if tuple(source.shape) != tuple(target.shape):
                raise KeyError(
                    f"checkpoint weight {name} has shape {tuple(source.shape)}, "
                    f"model has {tuple(target.shape)}"
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def optimizer_state(engine) -> dict[str, Any]:
    state = engine.optimizer.state_dict()
    return {k: v for k, v in state.items() if k not in _OBJECT_KEYS}


def load_optimizer_state(engine, state: dict[str, Any]) -> None:
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):  # bf16 at ZeRO-0
        optimizer.load_state_dict(state, load_optimizer_states=True)
    elif _is_deepspeed_wrapper(engine):
        state = dict(state)
        if hasattr(optimizer, "loss_scaler"):
            state["loss_scaler"] = optimizer.loss_scaler
        world = engine.dp_world_size
        optimizer.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)


def _is_deepspeed_wrapper(engine) -> bool:
    return bool(engine.zero_optimization() or engine.bfloat16_enabled())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
