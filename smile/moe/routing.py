"""Routers: score tokens, choose experts, enforce capacity, and report aux losses.

Every router returns one :class:`RoutingPlan`; dispatchers consume plans and never care which
router made them, so any router runs with any dispatcher (SMILE = ``bilevel`` + hierarchical).

* ``switch``  top-1 over all E experts (Switch Transformer).
* ``topk``    top-k over all E experts (GShard top-2 and general k), gates renormalised.
* ``bilevel`` SMILE: a node gate over the N nodes of the expert-parallel domain, then a GPU
  gate over the ``G * e`` experts inside a node; gate = p_node * p_gpu; an additive two-level
  load-balance loss; capacity enforced per level.

Capacity: with ``capacity_factor`` c the per-expert buffer holds ``ceil(c * T * k / E)`` rows;
copies beyond it are dropped (their keep flag is False; the residual carries the token). Earlier
choices win (all first choices before any second choice), then earlier tokens. With
``capacity_factor=None`` routing is dropless.

The bilevel GPU gate is evaluated on the sending rank, before the first hop: its weights are
replicated, so the routing function is the same as evaluating it after the hop, the plan is
known before any communication, and the second hop's splits need no extra round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from smile.moe.config import MoEConfig


@dataclass
class RoutingPlan:
    """Where each token goes. Shapes: T tokens, k copies per token, E experts."""

    expert_ids: torch.Tensor  # [T, k] int64, global expert index
    gates: torch.Tensor  # [T, k] float, differentiable combine weights
    keep: torch.Tensor  # [T, k] bool, False where a copy was dropped for capacity; all True if dropless
    num_experts: int
    capacity: int | None  # rows per expert in a padded buffer; None = dropless
    aux_loss: torch.Tensor  # weighted load-balance + z-loss, add to the task loss
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted parts, for logs

    @property
    def kept_total(self) -> int | None:
        """Kept copies, when known without reading ``keep`` off the device: all of them if dropless."""
        return self.expert_ids.numel() if self.capacity is None else None


def capacity_for(capacity_factor: float | None, tokens: int, k: int, targets: int) -> int | None:
    """Rows per target: ``ceil(capacity_factor * tokens * k / targets)`` (None = dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * tokens * k / targets))


def capacity_keep(
    target_ids: torch.Tensor, num_targets: int, capacity: int | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep mask [T, k]: the first ``capacity`` copies per target, choice-major then token order."""
    keep = torch.ones_like(target_ids, dtype=torch.bool) if valid is None else valid.clone()
    if capacity is None:
        return keep
    ids_cm = target_ids.t().reshape(-1)  # choice-major: all first choices, then second ...
    onehot = F.one_hot(ids_cm, num_targets) * keep.t().reshape(-1, 1)
    position = (torch.cumsum(onehot, 0) - 1).gather(1, ids_cm.unsqueeze(1)).squeeze(1)
    within = (position < capacity).view(target_ids.shape[1], -1).t()
    return keep & within


def load_balance_loss(probs: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Switch-style ``n * sum_i f_i * P_i``: f = fraction of copies sent to i, P = mean prob."""
    n = probs.shape[-1]
    if target_ids.numel() == 0:
        return probs.sum() * 0.0  # no tokens on this rank: nothing to balance, graph kept
    # A scatter, not bincount: bincount on a GPU reads the largest id back to the host.
    ids = target_ids.reshape(-1)
    counts = torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    counts = counts.to(probs.dtype)
    fraction = counts / target_ids.numel()
    return n * torch.sum(fraction * probs.mean(0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def _check_finite(logits: torch.Tensor, name: str) -> None:
    message = f"{name} router logits contain NaN or Inf; check the layer input and learning rate"
    if logits.is_cuda:  # checked on the device, without stalling the host every layer
        torch._assert_async(torch.isfinite(logits).all(), message)
    elif not torch.isfinite(logits).all():
        raise FloatingPointError(message)


class Router(nn.Module):
    """Common options: capacity, aux-loss weights, jitter and the finite-logits check.

    The options are validated by :class:`~smile.moe.config.MoEConfig`; build routers from one
    with :func:`build_router`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = 1.0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        jitter_eps: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.jitter_eps = jitter_eps
        self.check_finite = check_finite

    def _logits(self, proj: nn.Linear, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x = x * noise
        logits = proj(x.float()) if proj.weight.dtype == torch.float32 else proj(x).float()
        if self.check_finite:
            _check_finite(logits, name)
        return logits

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"router expects tokens of shape [T, d_model={self.d_model}], got {tuple(x.shape)}"
            )

    def _plan(self, ids, gates, keep, capacity, losses: dict[str, tuple[float, torch.Tensor]]) -> RoutingPlan:
        aux = sum(w * v for w, v in losses.values() if w)
        if not torch.is_tensor(aux):
            aux = gates.new_zeros(())
        return RoutingPlan(
            ids,
            gates,
            keep,
            self.num_experts,
            capacity,
            aux,
            {name: v.detach() for name, (_, v) in losses.items()},
        )


class SwitchRouter(Router):
    """Top-1 over all experts (Switch Transformer); ``TopKRouter`` with k=1."""

    def __init__(self, d_model: int, num_experts: int, **options) -> None:
        options.setdefault("k", 1)
        super().__init__(d_model, num_experts, **options)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def forward(self, x: torch.Tensor) -> RoutingPlan:
        self._check_input(x)
        logits = self._logits(self.proj, x, "expert")
        probs = logits.softmax(-1)
        gates, ids = probs.topk(self.k, dim=-1)
        if self.k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        capacity = capacity_for(self.capacity_factor, x.shape[0], self.k, self.num_experts)
        keep = capacity_keep(ids, self.num_experts, capacity)
        losses = {
            "load_balance": (self.aux_loss_weight, load_balance_loss(probs, ids)),
            "z": (self.z_loss_weight, z_loss(logits)),
        }
        return self._plan(ids, gates, keep, capacity, losses)


class TopKRouter(SwitchRouter):
    """GShard top-k (k=2 by default): gates renormalised over the chosen k."""

    def __init__(self, d_model: int, num_experts: int, **options) -> None:
        options.setdefault("k", 2)
        super().__init__(d_model, num_experts, **options)


class BilevelRouter(Router):
    """SMILE: node gate over ``num_nodes``, then GPU gate over the ``G * e`` experts of a node.

    ``k_node`` nodes are chosen, then ``k_gpu`` experts inside each chosen node, so a token
    has ``k = k_node * k_gpu`` copies. Capacity applies per level: first per node
    (``ceil(c * T * k_node / N)``), then per expert among the copies a node kept.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_nodes: int,
        k_node: int = 1,
        k_gpu: int = 1,
        node_loss_weight: float | None = None,
        **options,
    ) -> None:
        if num_nodes < 1 or num_experts % num_nodes:
            raise ValueError(f"num_experts={num_experts} must divide evenly over num_nodes={num_nodes}")
        per_node = num_experts // num_nodes
        options.pop("k", None)
        super().__init__(d_model, num_experts, k=k_node * k_gpu, **options)
        self.num_nodes, self.per_node = num_nodes, per_node
        self.k_node, self.k_gpu = k_node, k_gpu
        self.node_loss_weight = self.aux_loss_weight if node_loss_weight is None else node_loss_weight
        self.node_proj = nn.Linear(d_model, num_nodes, bias=False)
        self.gpu_proj = nn.Linear(d_model, per_node, bias=False)
        for proj in (self.node_proj, self.gpu_proj):
            nn.init.normal_(proj.weight, std=d_model**-0.5)

    def forward(self, x: torch.Tensor) -> RoutingPlan:
        self._check_input(x)
        tokens = x.shape[0]
        node_logits = self._logits(self.node_proj, x, "node")
        gpu_logits = self._logits(self.gpu_proj, x, "gpu")
        p_node, p_gpu = node_logits.softmax(-1), gpu_logits.softmax(-1)
        g_node, nodes = p_node.topk(self.k_node, dim=-1)  # [T, kn]
        g_gpu, slots = p_gpu.topk(self.k_gpu, dim=-1)  # [T, kg]
        ids = (nodes.unsqueeze(2) * self.per_node + slots.unsqueeze(1)).reshape(tokens, self.k)
        gates = (g_node.unsqueeze(2) * g_gpu.unsqueeze(1)).reshape(tokens, self.k)

        node_cap = capacity_for(self.capacity_factor, tokens, self.k_node, self.num_nodes)
        node_keep = capacity_keep(nodes, self.num_nodes, node_cap)
        node_keep = node_keep.unsqueeze(2).expand(-1, -1, self.k_gpu).reshape(tokens, self.k)
        capacity = capacity_for(self.capacity_factor, tokens, self.k, self.num_experts)
        keep = capacity_keep(ids, self.num_experts, capacity, valid=node_keep)
        losses = {
            "load_balance_node": (self.node_loss_weight, load_balance_loss(p_node, nodes)),
            "load_balance_gpu": (self.aux_loss_weight, load_balance_loss(p_gpu, slots)),
            "z": (self.z_loss_weight, z_loss(node_logits) + z_loss(gpu_logits)),
        }
        return self._plan(ids, gates, keep, capacity, losses)


def build_router(config: MoEConfig, d_model: int, num_nodes: int = 1) -> Router:
    """The router ``config`` names; ``num_nodes`` (the EP domain's node count) is used by ``bilevel``."""
    config.validate()
    config.check_levels(num_nodes)
    options = dict(
        capacity_factor=config.resolved_capacity_factor(),
        aux_loss_weight=config.aux_loss_weight,
        z_loss_weight=config.z_loss_weight,
        jitter_eps=config.jitter_eps,
        check_finite=config.check_finite,
    )
    if config.router == "bilevel":
        return BilevelRouter(
            d_model,
            config.num_experts,
            num_nodes,
            k_node=config.k_node,
            k_gpu=config.k_gpu,
            node_loss_weight=config.node_loss_weight,
            **options,
        )
    router = SwitchRouter if config.router == "switch" else TopKRouter
    if config.k is not None:
        options["k"] = config.k
    return router(d_model, config.num_experts, **options)
