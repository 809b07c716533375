"""Where each rank sits in an N nodes x G GPUs cluster, and the process groups that follow.

A real run reads the layout from torchrun (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``); a simulated
run presents W gloo processes on one machine as ``nodes x gpus_per_node`` so every multi-node
code path runs on a laptop. Rank r is on node ``r // gpus_per_node`` with local rank
``r % gpus_per_node``.

Expert parallelism spans ``ep_nodes`` nodes (all of them by default). When ``ep_nodes < nodes``
the expert-parallel domain is replicated ``nodes // ep_nodes`` times, and each expert's
replicas form its expert-data-parallel group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """True in a worker that torchrun (or smile's own launcher) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def resolve_backend(backend: str = "auto") -> str:
    """``auto``: nccl where CUDA is available, else gloo."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def start_process_group(backend: str = "auto", timeout_s: float = 1800.0) -> None:
    """Start the default process group from the environment (``env://``); the one start-up.

    Idempotent: an existing group (a test harness, an outer launcher) is used as is. Without
    torchrun's variables a one-process group is started on localhost, so the same code path runs
    everywhere. nccl ranks take the GPU of their ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    # torchrun keeps one rendezvous store across restarts; without a per-attempt prefix a
    # restarted rank reads its peers' addresses from the dead attempt and cannot connect.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"smile/attempt_{restart}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def stop_process_group(*, barrier: bool = True) -> None:
    """End the default process group, if any, after a finished run (``barrier``: wait for peers).

    gloo's worker threads must be joined before the interpreter exits; left to finalisation, a
    rank can abort at exit ("terminate called without an active exception") after a good run.
    """
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Topology:
    """An ``nodes x gpus_per_node`` cluster seen from one rank."""

    nodes: int
    gpus_per_node: int
    rank: int = 0
    ep_nodes: int | None = None
    group_timeout_s: float | None = None  # sub-group collective timeout (None: torch's default)
    _groups: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology.{name} must be a positive int, got {value!r}")
        ep_nodes = self.nodes if self.ep_nodes is None else self.ep_nodes
        if ep_nodes < 1 or self.nodes % ep_nodes:
            raise ValueError(f"Topology.ep_nodes={ep_nodes} must be a positive divisor of nodes={self.nodes}")
        object.__setattr__(self, "ep_nodes", ep_nodes)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Topology.rank={self.rank} outside world of {self.world_size}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_env(
        cls,
        sim_nodes: int | None = None,
        ep_nodes: int | None = None,
        group_timeout_s: float | None = None,
    ) -> Topology:
        """This rank's place, read once for every caller: rank and world from the process group
        (torchrun's ``RANK`` / ``WORLD_SIZE`` before one exists), GPUs per node from
        ``LOCAL_WORLD_SIZE``; ``sim_nodes`` presents the world as that many nodes instead."""
        if dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if sim_nodes is not None:
            if sim_nodes < 1 or world % sim_nodes:
                raise ValueError(f"sim_nodes={sim_nodes} does not tile the world size {world}")
            local = world // sim_nodes
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            if world % local:
                raise ValueError(f"LOCAL_WORLD_SIZE={local} does not tile WORLD_SIZE={world}")
        return cls(world // local, local, rank, ep_nodes, group_timeout_s)

    # ---- coordinates ----------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def ep_size(self) -> int:
        return self.ep_nodes * self.gpus_per_node

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.gpus_per_node

    @property
    def ep_rank(self) -> int:
        """Position of this rank inside its expert-parallel domain."""
        return self.rank % self.ep_size

    # ---- process groups -------------------------------------------------------------------
    def group_ranks(self, kind: str) -> list[int]:
        """Ranks of this rank's group of ``kind``: ep (expert-parallel domain), inter (one rank
        per node of the domain, same local rank), intra (this node), edp (replicas of this
        rank's experts)."""
        partitions = self._all_partitions()
        if kind not in partitions:
            raise ValueError(f"unknown process group kind {kind!r}; allowed: {', '.join(partitions)}")
        return next(ranks for ranks in partitions[kind] if self.rank in ranks)

    def _all_partitions(self) -> dict[str, list[list[int]]]:
        w, g, ep = self.world_size, self.gpus_per_node, self.ep_size
        return {
            "ep": [list(range(s, s + ep)) for s in range(0, w, ep)],
            "inter": [
                [s + n * g + lr for n in range(self.ep_nodes)] for s in range(0, w, ep) for lr in range(g)
            ],
            "intra": [list(range(s, s + g)) for s in range(0, w, g)],
            "edp": [list(range(r, w, ep)) for r in range(ep)],
        }

    def _new_group(self, ranks: list[int]) -> dist.ProcessGroup:
        if len(ranks) == dist.get_world_size():
            return dist.group.WORLD
        if self.group_timeout_s is None:
            return dist.new_group(ranks)
        return dist.new_group(ranks, timeout=timedelta(seconds=self.group_timeout_s))

    def group(self, kind: str) -> dist.ProcessGroup | None:
        """The cached process group of ``kind`` (ep, inter, intra, edp) containing this rank.

        The first call is collective: every rank creates every group in the same order, as
        ``new_group`` requires. Returns None when not running distributed.
        """
        if not dist.is_initialized():
            return None
        if not self._groups:
            for name, partitions in self._all_partitions().items():
                for ranks in partitions:
                    pg = self._new_group(ranks)
                    if self.rank in ranks:
                        self._groups[name] = pg
        if kind not in self._groups:
            self.group_ranks(kind)  # raises for an unknown kind
        return self._groups[kind]
