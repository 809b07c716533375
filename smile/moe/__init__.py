"""The core of smile: routers, the token dispatcher, experts, the pipeline and the MoE layer.

Imports torch, triton and numpy only (a test enforces it). Build a layer from an
:class:`MoEConfig`; present any process group as ``nodes x gpus_per_node`` with :class:`Topology`.
"""

from smile.moe.config import MoEConfig, MoEConfigError
from smile.moe.dispatcher import TokenDispatcher
from smile.moe.layer import LayerStats, MoELayer, collect_aux_loss
from smile.moe.routing import RoutingPlan, build_router
from smile.moe.topology import Topology

__all__ = [
    "LayerStats",
    "MoEConfig",
    "MoEConfigError",
    "MoELayer",
    "RoutingPlan",
    "Topology",
    "TokenDispatcher",
    "build_router",
    "collect_aux_loss",
]
