"""MoEConfig: every option of an MoE layer, its default, its allowed values and its validation.

The one place these live: ``MoELayer(config)``, ``smile.hf.moefy``, the pretraining job's ``moe``
section and the zoo all take an ``MoEConfig``; routers, dispatchers and experts import their
allowed names from here. ``validate`` raises :class:`MoEConfigError` naming the field and the
allowed values, before anything is built.

Defaults that depend on the run are resolved here too, by one rule each:

* ``dispatcher="auto"``: ``local`` on one expert-parallel rank; else ``hierarchical`` (two hops)
  for SMILE's ``bilevel`` router and ``flat`` (one All2All) for the others.
* ``capacity_factor="auto"``: dropless for ``bilevel``, 1.0 (Switch / GShard) for the others.
* ``chunks="auto"``: ``AUTO_CHUNKS`` under expert parallelism, 1 on one rank.
* ``activation="auto"``: the activation of the dense FFN an MoE layer replaces (``moefy``), gelu
  for a layer built on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from smile.moe.topology import Topology

ROUTERS = ("switch", "topk", "bilevel")
DISPATCHERS = ("auto", "flat", "hierarchical", "local")
COUNT_EXCHANGES = ("per_hop", "per_call")
TRANSPORTS = ("collective", "p2p")
ACTIVATIONS = ("gelu", "relu", "swiglu", "geglu")
BACKENDS = ("auto", "torch", "triton", "cuda")
GEMMS = ("auto", "grouped_mm", "bmm", "triton")
PAYLOADS = ("exact", "bf16", "fp8")
COMBINE_PAYLOADS = ("exact", "bf16")
AUTO_CHUNKS = 3  # pipeline depth of chunks="auto": the best of 2, 3, 4 measured (docs/benchmarks.md)


class MoEConfigError(ValueError):
    """An MoE option outside its allowed values."""


def check_choice(field: str, value: object, allowed: Sequence[str]) -> None:
    """The one error for a name outside its allowed set."""
    if value not in allowed:
        raise MoEConfigError(f"{field} {value!r} unknown; allowed: {', '.join(allowed)}")


@dataclass
class MoEConfig:
    """An MoE layer's options (see the module docstring for the "auto" rules).

    num_experts: experts per layer, a multiple of the expert-parallel size.
    d_model, d_ff: hidden and expert FFN widths; None where ``moefy`` takes them from the host FFN.
    router: "switch" (top-1), "topk" (GShard, ``k`` copies, 2 by default), "bilevel" (SMILE).
    k: copies per token for "switch" (1) / "topk"; "bilevel" uses ``k_node`` x ``k_gpu``.
    capacity_factor: per-expert buffer factor (> 0), None for dropless, or "auto".
    aux_loss_weight: load-balance weight (bilevel: the GPU level); node_loss_weight: bilevel's
        node level (None: aux_loss_weight); z_loss_weight: router z-loss; jitter_eps:
        multiplicative input jitter in [0, 1) while training; check_finite: stop on NaN/Inf
        router logits (checked on the device on GPUs).
    dispatcher: "auto", "flat", "hierarchical" or "local".
    count_exchange: how the two-hop dispatcher exchanges row counts: "per_hop" (each hop in its
        own group: the fewest messages, for clusters) or "per_call" (one call over the EP group:
        the fewest calls, for a few CPU ranks on gloo); see :mod:`smile.moe.exchange`.
    transport: how a hop moves its rows: "collective" (one ``all_to_all_single``) or "p2p"
        (point-to-point sends and receives, each peer's rows in pieces of at most 128 KiB: on
        gloo this keeps both directions of a pair's connection busy, where gloo's All2All between
        two nodes sends one direction after the other); bit-identical results either way.
    activation: "auto", "gelu", "relu", "swiglu" or "geglu".
    backend: dispatch kernels ("auto": cuda > triton > torch on GPU); gemm: expert GEMMs.
    dispatch_payload ("exact", "bf16", "fp8") / combine_payload ("exact", "bf16"): wire formats.
    chunks: pipeline depth, an integer >= 1 or "auto".
    every: for ``moefy``: block i of a host model is MoE when ``every == 1`` or ``i % every == 1``.
    """

    num_experts: int = 8
    d_model: int | None = None
    d_ff: int | None = None
    router: Literal["switch", "topk", "bilevel"] = "switch"
    k: int | None = None
    k_node: int = 1
    k_gpu: int = 1
    capacity_factor: float | Literal["auto"] | None = "auto"
    aux_loss_weight: float = 0.01
    node_loss_weight: float | None = None
    z_loss_weight: float = 0.0
    jitter_eps: float = 0.0
    check_finite: bool = True
    dispatcher: Literal["auto", "flat", "hierarchical", "local"] = "auto"
    count_exchange: Literal["per_hop", "per_call"] = "per_hop"
    transport: Literal["collective", "p2p"] = "collective"
    activation: Literal["auto", "gelu", "relu", "swiglu", "geglu"] = "auto"
    backend: Literal["auto", "torch", "triton", "cuda"] = "auto"
    gemm: Literal["auto", "grouped_mm", "bmm", "triton"] = "auto"
    dispatch_payload: Literal["exact", "bf16", "fp8"] = "exact"
    combine_payload: Literal["exact", "bf16"] = "exact"
    chunks: int | Literal["auto"] = "auto"
    every: int = 2

    def validate(self, where: str = "moe") -> MoEConfig:
        """Check every field; returns self so a call can be chained."""

        def positive_int(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoEConfigError(f"{where}.{name} must be an integer >= 1, got {value!r}")

        def weight(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MoEConfigError(f"{where}.{name} must be a finite number >= 0, got {value!r}")
            if value < 0:
                raise MoEConfigError(f"{where}.{name} must be >= 0, got {value!r}")

        for name in ("num_experts", "k_node", "k_gpu", "every"):
            positive_int(name)
        for name in ("d_model", "d_ff", "k"):
            positive_int(name, optional=True)
        for name, allowed in (
            ("router", ROUTERS),
            ("dispatcher", DISPATCHERS),
            ("count_exchange", COUNT_EXCHANGES),
            ("transport", TRANSPORTS),
            ("activation", ("auto", *ACTIVATIONS)),
            ("backend", BACKENDS),
            ("gemm", GEMMS),
            ("dispatch_payload", PAYLOADS),
            ("combine_payload", COMBINE_PAYLOADS),
        ):
            check_choice(f"{where}.{name}", getattr(self, name), allowed)
        if self.k is not None:
            if self.router == "bilevel":
                raise MoEConfigError(f"{where}.k applies to 'switch'/'topk'; bilevel uses k_node and k_gpu")
            if self.router == "switch" and self.k != 1:
                raise MoEConfigError(f"router 'switch' is top-1, got k={self.k}; use router 'topk' for k > 1")
            if self.k > self.num_experts:
                raise MoEConfigError(f"router k={self.k} must be in [1, num_experts={self.num_experts}]")
        cf = self.capacity_factor
        valid_cf = cf in ("auto", None) or (
            not isinstance(cf, (bool, str)) and isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0
        )
        if not valid_cf:
            raise MoEConfigError(
                f"{where}.capacity_factor must be > 0, 'auto' or null (dropless), got {cf!r}"
            )
        for name in ("aux_loss_weight", "z_loss_weight"):
            weight(name)
        weight("node_loss_weight", optional=True)
        if isinstance(self.jitter_eps, bool) or not 0.0 <= self.jitter_eps < 1.0:
            raise MoEConfigError(f"{where}.jitter_eps must be in [0, 1), got {self.jitter_eps!r}")
        if self.chunks != "auto" and (
            isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1
        ):
            raise MoEConfigError(f"{where}.chunks must be 'auto' or an integer >= 1, got {self.chunks!r}")
        return self

    def check_topology(self, topology: Topology, where: str = "moe") -> None:
        """Raise before any layer is built if the experts cannot be laid out over ``topology``."""
        if self.num_experts % topology.ep_size:
            raise MoEConfigError(
                f"{where}.num_experts={self.num_experts} must be a multiple of the expert-parallel size "
                f"{topology.ep_size} ({topology.ep_nodes} nodes x {topology.gpus_per_node} gpus_per_node)"
            )
        if self.dispatcher == "local" and topology.ep_size > 1:
            raise MoEConfigError(
                f"{where}.dispatcher 'local' needs an expert-parallel size of 1, got {topology.ep_size}"
            )
        self.check_levels(topology.ep_nodes, where)

    def check_levels(self, num_nodes: int, where: str = "moe") -> None:
        """bilevel only: ``k_node`` and ``k_gpu`` must fit ``num_nodes`` nodes of experts."""
        if self.router != "bilevel":
            return
        if self.num_experts % num_nodes:
            raise MoEConfigError(
                f"{where}.num_experts={self.num_experts} must divide evenly over num_nodes={num_nodes}"
            )
        per_node = self.num_experts // num_nodes
        if not 1 <= self.k_node <= num_nodes:
            raise MoEConfigError(f"{where}.k_node={self.k_node} must be in [1, num_nodes={num_nodes}]")
        if not 1 <= self.k_gpu <= per_node:
            raise MoEConfigError(f"{where}.k_gpu={self.k_gpu} must be in [1, experts per node={per_node}]")

    # ---- the "auto" rules -----------------------------------------------------------------
    def resolved_capacity_factor(self) -> float | None:
        if self.capacity_factor == "auto":
            return None if self.router == "bilevel" else 1.0
        return self.capacity_factor

    def resolved_dispatcher(self, topology: Topology) -> str:
        if topology.ep_size == 1:
            return "local"
        if self.dispatcher != "auto":
            return self.dispatcher
        return "hierarchical" if self.router == "bilevel" else "flat"

    def resolved_chunks(self, topology: Topology) -> int:
        if self.chunks == "auto":
            return AUTO_CHUNKS if topology.ep_size > 1 else 1
        return self.chunks

    def resolved_activation(self, host: str | None = None) -> str:
        if self.activation != "auto":
            return self.activation
        return host or "gelu"
