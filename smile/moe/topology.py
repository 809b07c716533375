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
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


def under_torchrun() -> bool:
    """True in a worker that torchrun (or smile's own launcher) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


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
    def simulated(
        cls,
        nodes: int,
        gpus_per_node: int,
        ep_nodes: int | None = None,
        group_timeout_s: float | None = None,
    ) -> Topology:
        """Present the initialised process group as ``nodes x gpus_per_node``."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if nodes * gpus_per_node != world:
            raise ValueError(
                f"topology {nodes} nodes x {gpus_per_node} gpus_per_node = "
                f"{nodes * gpus_per_node} ranks does not tile the world size {world}"
            )
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(nodes, gpus_per_node, rank, ep_nodes, group_timeout_s)

    @classmethod
    def from_env(
        cls,
        sim_nodes: int | None = None,
        ep_nodes: int | None = None,
        group_timeout_s: float | None = None,
    ) -> Topology:
        """Read torchrun's environment; ``sim_nodes`` overrides the node count (simulation)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if sim_nodes is not None:
            if sim_nodes < 1 or world % sim_nodes:
                raise ValueError(f"sim_nodes={sim_nodes} does not tile the world size {world}")
            local = world // sim_nodes
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            if world % local:
                raise ValueError(f"LOCAL_WORLD_SIZE={local} does not tile WORLD_SIZE={world}")
        rank = int(os.environ.get("RANK", "0"))
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

    @property
    def ep_node(self) -> int:
        """Node index of this rank inside its expert-parallel domain."""
        return self.ep_rank // self.gpus_per_node

    # ---- process groups -------------------------------------------------------------------
    def ep_ranks(self) -> list[int]:
        start = self.rank - self.ep_rank
        return list(range(start, start + self.ep_size))

    def inter_node_ranks(self) -> list[int]:
        """Ranks of the EP domain sharing this rank's local rank (one per node)."""
        start = self.rank - self.ep_rank
        return [start + n * self.gpus_per_node + self.local_rank for n in range(self.ep_nodes)]

    def intra_node_ranks(self) -> list[int]:
        start = self.node * self.gpus_per_node
        return list(range(start, start + self.gpus_per_node))

    def expert_data_parallel_ranks(self) -> list[int]:
        """Ranks that hold replicas of this rank's experts."""
        return list(range(self.ep_rank, self.world_size, self.ep_size))

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
            raise ValueError(f"unknown process group kind {kind!r}; allowed: ep, inter, intra, edp")
        return self._groups[kind]
