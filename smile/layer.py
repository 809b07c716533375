"""The MoE layer: router -> permute -> All2All -> experts -> All2All -> weighted combine.

A drop-in ``nn.Module`` for a transformer FFN. Any router pairs with any dispatcher:
SMILE is ``router="bilevel", dispatcher="hierarchical"``; the Switch baseline is
``router="switch", dispatcher="flat"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from smile.comm import build_dispatcher
from smile.dispatch import get_backend, permute, unpermute_combine
from smile.experts import ExpertFFN
from smile.routing import build_router
from smile.topology import Topology


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
    ``"auto"`` (the default) is dropless for SMILE's ``bilevel`` router (only real tokens travel)
    and 1.0 for the others, as in Switch/GShard. ``dispatch_payload`` (exact, bf16, fp8) and
    ``combine_payload`` (exact, bf16) set the All2All wire formats; exact by default.
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
            dest, src, counts = backend.dispatch_index(
                plan.expert_ids, plan.keep, self.num_experts, plan.capacity
            )
            rows = permute(tokens, src, dest, backend)
            if plan.capacity is None:
                row_counts = counts
            else:
                row_counts = torch.full_like(counts, plan.capacity)
        expert_in, expert_counts, handle = self.dispatcher.dispatch(rows, row_counts)
        expert_out = self.experts(expert_in, expert_counts)
        back = self.dispatcher.combine(expert_out, handle)
        with record_function("smile.combine"):
            out = unpermute_combine(back, plan.gates.to(back.dtype), dest, src, backend)
        self.last_stats = LayerStats(counts.detach(), plan.keep, plan.losses)
        return out.view(x.shape), plan.aux_loss
