"""EMA weights: an exponential moving average of the trainable parameters, kept by the Trainer.

Diffusion models (and many generative models) are decoded with the EMA of their weights, not the
raw weights. :class:`EMA` keeps an fp32 shadow of every trainable parameter on its device, updated
after each optimizer step; the Trainer saves it in every checkpoint (``ema.safetensors`` from rank
0 for the dense parameters, ``ema-experts-ep<r>.safetensors`` for each expert-parallel rank's
experts, like the weights), restores it on resume (bit-identical: the update is deterministic
and the shadow is stored exactly), and evaluates with it swapped in (``EMAConfig.evaluate``).
:func:`load_ema_weights` puts a checkpoint's EMA weights into a model for inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from smile.moe.experts import is_expert_parameter
from smile.moe.topology import Topology
from smile.runtime import checkpoint as ckpt
from smile.runtime.config import EMAConfig

DENSE_FILE = "ema.safetensors"


def experts_file(ep_rank: int) -> str:
    return f"ema-experts-ep{ep_rank}.safetensors"


class EMA:
    """fp32 shadow weights of ``model``'s trainable parameters (ZeRO 0-2: every rank holds its
    dense parameters whole and its own experts)."""

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        self.config = config
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): copy the weights until ``start_step``, then
        ``shadow = decay * shadow + (1 - decay) * weights``."""
        self.updates += 1
        for name, p in self.params.items():
            if step <= self.config.start_step:
                self.shadow[name].copy_(p.detach())
            else:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.config.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its own weights again after it."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(dense, experts)`` shadow tensors, split as the checkpoint stores them."""
        dense = {n: t for n, t in self.shadow.items() if not is_expert_parameter(self.params[n])}
        experts = {n: t for n, t in self.shadow.items() if is_expert_parameter(self.params[n])}
        return dense, experts

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Restore shadows by name; a missing or misshapen one raises naming it and ``where``."""
        for name, target in self.shadow.items():
            if name not in tensors:
                raise ckpt.CheckpointError(f"{where}: EMA weights lack parameter {name!r}")
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise ckpt.CheckpointError(
                    f"{where}: EMA weight {name!r} has shape {list(tensors[name].shape)}, "
                    f"the model {list(target.shape)}"
                )
        for name, target in self.shadow.items():
            target.copy_(tensors[name])

    def reset(self) -> None:
        """Shadows := the current weights (a resume that cannot carry the EMA starts it here)."""
        with torch.no_grad():
            for name, p in self.params.items():
                self.shadow[name].copy_(p.detach())


def write_files(ema: EMA, stage: Path, rank: int, topology: Topology) -> dict[str, ckpt.FileRecord]:
    """This rank's EMA files in a checkpoint being staged (dense on rank 0, experts once per
    expert-parallel rank)."""
    dense, experts = ema.state()
    files: dict[str, ckpt.FileRecord] = {}
    if rank == 0:
        files[DENSE_FILE] = ckpt.write_tensors(stage, DENSE_FILE, dense)
    if experts and topology.rank < topology.ep_size:
        name = experts_file(topology.ep_rank)
        files[name] = ckpt.write_tensors(stage, name, experts)
    return files


def read_tensors(
    path: Path, manifest: dict, topology: Topology, experts: bool = True
) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA tensors for this rank (verified against the manifest)."""
    if DENSE_FILE not in manifest.get("files", {}):
        raise ckpt.CheckpointError(
            f"checkpoint {path} has no EMA weights ({DENSE_FILE}); it was saved with train.ema.decay=0"
        )
    tensors = dict(ckpt.read_tensors(path, manifest, DENSE_FILE))
    name = experts_file(topology.ep_rank)
    if experts and name in manifest["files"]:
        tensors.update(ckpt.read_tensors(path, manifest, name))
    return tensors


def load_ema_weights(model: nn.Module, path: str | Path, topology: Topology | None = None) -> list[str]:
    """Copy the EMA weights of checkpoint ``path`` into ``model`` (same expert-parallel layout);
    returns the parameter names set. Parameters the EMA does not cover (frozen ones) are kept."""
    path = Path(path)
    manifest = ckpt.read_manifest(path)
    tensors = read_tensors(path, manifest, topology or Topology(1, 1))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ckpt.CheckpointError(f"checkpoint {path}: EMA weights of unknown parameters {unknown[:6]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ckpt.CheckpointError(
                    f"checkpoint {path}: EMA weight {name!r} has shape {list(tensor.shape)}, "
                    f"the model {list(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return sorted(tensors)
