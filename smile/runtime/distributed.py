"""Process-group setup for training runs and small collective helpers.

Under torchrun the environment names rank and world; run without it, a one-process group is
started on localhost so the same code path (DeepSpeed needs a process group) runs everywhere.
Every group gets the configured timeout, so a dead or stuck peer ends the run with an error
instead of a hang.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from smile.runtime.config import DistConfig
from smile.moe.topology import Topology


def backend_for(cfg: DistConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: DistConfig | None = None) -> Topology:
    """Start (or join) the default process group and return this rank's Topology.

    Idempotent: if a process group already exists (a test harness, an outer launcher), it is
    used as is.
    """
    cfg = cfg or DistConfig()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE="1",
            )
        backend = backend_for(cfg)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=cfg.timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # torchrun keeps one rendezvous store across restarts; without a per-attempt prefix a
            # restarted rank reads its peers' addresses from the dead attempt and cannot connect.
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"smile/attempt_{restart}/", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if cfg.sim_nodes is not None:
        return Topology.simulated(
            cfg.sim_nodes, dist.get_world_size() // cfg.sim_nodes, cfg.ep_nodes, cfg.timeout_s
        )
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % local:
        raise ValueError(f"LOCAL_WORLD_SIZE={local} does not tile WORLD_SIZE={world}")
    return Topology.simulated(world // local, local, cfg.ep_nodes, cfg.timeout_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
