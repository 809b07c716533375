"""The MoE layer: router -> permute -> All2All -> experts -> All2All -> weighted combine.

A drop-in ``nn.Module`` for a transformer FFN. Any router pairs with any dispatcher:
SMILE is ``router="bilevel", dispatcher="hierarchical"``; the Switch baseline is
``router="switch", dispatcher="flat"``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from smile.comm import build_dispatcher
from smile.dispatch import get_backend, permute, unpermute_combine
from smile.experts import ExpertFFN
from smile.pipeline import pipelined_experts
from smile.routing import build_router
from smile.topology import Topology

AUTO_CHUNKS = 3  # pipeline depth of chunks="auto": the best of 2, 3, 4 measured (docs/benchmarks.md)


@dataclass
class LayerStats:
    """Per-step routing statistics of one layer (this rank's tokens).

    Held as device tensors so the forward pass never waits on the host; read them when logging.
    """

    tokens_per_expert: torch.Tensor  # [E] kept copies sent to each global expert
    keep: torch.Tensor  # [T, k] bool
    losses: dict[str, torch.Tensor]

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - float(self.keep.float().mean()) if self.keep.numel() else 0.0


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN over the expert-parallel domain of ``topology``.

    Each rank holds ``num_experts / ep_size`` experts. ``capacity_factor=None`` is dropless;
    ``"auto"`` (the default) is dropless for SMILE's ``bilevel`` router and 1.0 for the others,
    as in Switch/GShard. A capacity only decides which copies are dropped: the All2Alls carry the
    kept rows alone (their counts travel first), never capacity padding.
    ``dispatch_payload`` (exact, bf16, fp8) and ``combine_payload`` (exact, bf16) set the
    All2All wire formats; exact by default. ``chunks`` > 1 pipelines the layer
    (:mod:`smile.pipeline`): the tokens are split into that many chunks whose All2Alls overlap
    each other and the expert compute, bit-identically; ``"auto"`` picks ``AUTO_CHUNKS`` under
    expert parallelism, 1 on a single rank.
    Expert weights are initialised from ``(seed drawn from torch's RNG, global expert id)``,
    so the same seed gives the same model on any topology. ``forward`` returns
    ``(output, aux_loss)``; add ``aux_loss`` to the task loss.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str = "switch",
        k: int | None = None,
        dispatcher: str | None = None,
        capacity_factor: float | str | None = "auto",
        topology: Topology | None = None,
        activation: str = "gelu",
        backend: str = "auto",
        gemm: str = "auto",
        dispatch_payload: str = "exact",
        combine_payload: str = "exact",
        chunks: int | str = "auto",
        **router_options,
    ) -> None:
        super().__init__()
        self.topology = topology or Topology(1, 1)
        if dispatcher is None:
            dispatcher = "local" if self.topology.ep_size == 1 else "flat"
        if capacity_factor == "auto":
            capacity_factor = None if router == "bilevel" else 1.0
        if router != "bilevel" and k is not None:
            router_options["k"] = k
        self.d_model, self.num_experts = d_model, num_experts
        self.chunks = _resolve_chunks(chunks, self.topology.ep_size)
        self.dispatcher = build_dispatcher(
            dispatcher,
            self.topology,
            num_experts,
            dispatch_payload=dispatch_payload,
            combine_payload=combine_payload,
        )
        self.router = build_router(
            router,
            d_model,
            num_experts,
            num_nodes=self.topology.ep_nodes,
            capacity_factor=capacity_factor,
            **router_options,
        )
        seed = int(torch.randint(2**31 - 1, (1,)))
        first = self.topology.ep_rank * self.dispatcher.num_local
        self.experts = ExpertFFN(self.dispatcher.num_local, d_model, d_ff, activation, seed, first, gemm)
        self.backend_name = backend
        self.last_stats: LayerStats | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects hidden size d_model={self.d_model}, got {x.shape[-1]}")
        tokens = x.reshape(-1, self.d_model)
        plan = self.router(tokens)
        backend = get_backend(self.backend_name, tokens.device)
        with record_function("smile.dispatch"):
            # The keep mask enforces any capacity: only kept rows travel, nothing is padded.
            slots = _chunk_slots(plan.expert_ids, self.chunks, self.num_experts)
            dest, src, slot_counts = backend.dispatch_index(
                slots, plan.keep, self.chunks * self.num_experts, None, kept_total=plan.kept_total
            )
            rows = permute(tokens, src, dest, backend)
        counts = slot_counts.view(self.chunks, self.num_experts)
        if self.chunks == 1:
            expert_in, expert_counts, handle = self.dispatcher.dispatch(rows, counts[0])
            back = self.dispatcher.combine(self.experts(expert_in, expert_counts), handle)
        else:
            chunk_rows = list(rows.split(counts.sum(1).tolist()))
            run = functools.partial(pipelined_experts, self.dispatcher)
            back = torch.cat(self.experts(chunk_rows, counts, run=run))
        with record_function("smile.combine"):
            out = unpermute_combine(back, plan.gates.to(back.dtype), dest, src, backend)
        self.last_stats = LayerStats(counts.sum(0).detach(), plan.keep, plan.losses)
        return out.view(x.shape), plan.aux_loss


def _chunk_slots(expert_ids: torch.Tensor, chunks: int, num_experts: int) -> torch.Tensor:
    """Slot ``c * E + expert`` of every copy, for ``chunks`` consecutive near-equal token ranges.

    One dispatch index over these slots lays out each chunk's expert-grouped rows one chunk after
    the other: the same rows, in the same order, as one index per chunk, for one index and one
    permute per layer.
    """
    if chunks == 1:
        return expert_ids
    tokens = expert_ids.shape[0]
    starts = torch.tensor([tokens * c // chunks for c in range(1, chunks)], device=expert_ids.device)
    chunk_of = torch.bucketize(torch.arange(tokens, device=expert_ids.device), starts, right=True)
    return expert_ids + (chunk_of * num_experts).unsqueeze(1)


def _resolve_chunks(chunks: int | str, ep_size: int) -> int:
    if chunks == "auto":
        return AUTO_CHUNKS if ep_size > 1 else 1
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be 'auto' or an integer >= 1, got {chunks!r}")
    return chunks
