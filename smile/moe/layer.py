"""The MoE layer: router -> token dispatcher -> experts -> token dispatcher (combine).

A drop-in ``nn.Module`` for a transformer FFN, built from one :class:`~smile.moe.config.MoEConfig`.
Any router pairs with any dispatcher: SMILE is ``router="bilevel"`` (whose ``dispatcher="auto"``
is the two-hop exchange); the Switch baseline is ``router="switch"`` (flat).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from smile.moe.config import MoEConfig
from smile.moe.dispatcher import TokenDispatcher
from smile.moe.experts import ExpertFFN
from smile.moe.pipeline import pipelined_experts
from smile.moe.routing import build_router
from smile.moe.topology import Topology


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

    ``MoELayer(config, topology)``, or with keywords as a convenience:
    ``MoELayer(d_model, d_ff, num_experts, router="bilevel", ...)`` builds the ``MoEConfig``.
    Each rank holds ``num_experts / ep_size`` experts. A capacity only decides which copies are
    dropped: the All2Alls carry the kept rows alone (their counts travel first), never capacity
    padding. ``chunks`` > 1 pipelines the layer (:mod:`smile.moe.pipeline`): the tokens are
    split into that many chunks whose All2Alls overlap each other and the expert compute,
    bit-identically.
    Expert weights are initialised from ``(seed drawn from torch's RNG, global expert id)``,
    so the same seed gives the same model on any topology. ``forward`` returns
    ``(output, aux_loss)``; add ``aux_loss`` to the task loss (the runtime's Trainer does).
    """

    def __init__(
        self,
        config: MoEConfig | int,
        d_ff: int | None = None,
        num_experts: int | None = None,
        *,
        topology: Topology | None = None,
        **options,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            config = MoEConfig(d_model=config, d_ff=d_ff, num_experts=num_experts, **options)
        elif d_ff is not None or num_experts is not None or options:
            raise TypeError("MoELayer(config) takes no other layer options; put them in the MoEConfig")
        self.topology = topology or Topology(1, 1)
        config.validate()
        if config.d_model is None or config.d_ff is None:
            raise ValueError("MoELayer needs MoEConfig.d_model and d_ff")
        self.config = dataclasses.replace(config, activation=config.resolved_activation())
        self.d_model, self.num_experts = config.d_model, config.num_experts
        self.chunks = config.resolved_chunks(self.topology)
        self.dispatcher = TokenDispatcher(config, self.topology)
        self.router = build_router(config, config.d_model, num_nodes=self.topology.ep_nodes)
        seed = int(torch.randint(2**31 - 1, (1,)))
        first = self.topology.ep_rank * self.dispatcher.num_local
        self.experts = ExpertFFN(
            self.dispatcher.num_local,
            config.d_model,
            config.d_ff,
            self.config.activation,
            seed,
            first,
            config.gemm,
        )
        self.last_stats: LayerStats | None = None
        self.pending_aux_loss: torch.Tensor | None = None  # taken by collect_aux_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects hidden size d_model={self.d_model}, got {x.shape[-1]}")
        tokens = x.reshape(-1, self.d_model)
        plan = self.router(tokens)
        dispatch = self.dispatcher.permute(tokens, plan, self.chunks)
        if self.chunks == 1:
            expert_in, expert_counts = self.dispatcher.to_experts(dispatch)
            back = self.dispatcher.from_experts(self.experts(expert_in, expert_counts), dispatch)
        else:
            run = functools.partial(pipelined_experts, self.dispatcher, dispatch.routes)
            back = torch.cat(self.experts(dispatch.rows, dispatch.row_counts, run=run))
        out = self.dispatcher.combine(back, dispatch)
        self.last_stats = LayerStats(dispatch.row_counts.sum(0).detach(), plan.keep, plan.losses)
        self.pending_aux_loss = plan.aux_loss
        return out.view(x.shape), plan.aux_loss


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the aux losses of every MoE layer of ``model`` that ran since the last call, or None.

    Each is taken once (never counted twice). The runtime's Trainer adds it to the loss of every
    step, for any model, so a loss function returns the task loss alone.
    """
    total: torch.Tensor | None = None
    for module in model.modules():
        if isinstance(module, MoELayer) and module.pending_aux_loss is not None:
            aux, module.pending_aux_loss = module.pending_aux_loss, None
            total = aux if total is None else total + aux
    return total
