"""Process-group setup for training runs and small collective helpers.

Under torchrun the environment names rank and world; run without it, a one-process group is
started on localhost so the same code path (DeepSpeed needs a process group) runs everywhere.
Every group gets the configured timeout, so a dead or stuck peer ends the run with an error
instead of a hang.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from smile.moe.topology import Topology, resolve_backend, start_process_group
from smile.runtime import supervision
from smile.runtime.config import DistConfig


def backend_for(cfg: DistConfig) -> str:
    return resolve_backend(cfg.backend)


def init_distributed(cfg: DistConfig | None = None) -> Topology:
    """Start (or join) the default process group and return this rank's Topology.

    Idempotent: if a process group already exists (a test harness, an outer launcher), it is
    used as is. Every group gets the configured timeout. Under torchrun the worker is tied to its
    agent (``supervision.install``): it dies with it instead of training on as an orphan.
    """
    cfg = cfg or DistConfig()
    supervision.install()
    start_process_group(cfg.backend, cfg.timeout_s)
    return Topology.from_env(cfg.sim_nodes, cfg.ep_nodes, cfg.timeout_s)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_json(obj: Any, group=None) -> list[Any]:
    """All-gather a JSON-serialisable object from every rank (no pickling)."""
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    dev = device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[: payload.numel()] = payload.to(dev)
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded, group=group)
    return [json.loads(bytes(c[: int(s.item())].cpu().tolist())) for c, s in zip(chunks, sizes)]
