"""The token dispatcher: permute -> exchange (flat | two-hop) -> regroup, and back with the combine.

:class:`TokenDispatcher` owns a layer's whole token lifecycle, in four steps, so routers and
experts never touch a layout:

1. :meth:`~TokenDispatcher.permute`: one dispatch index over the routing plan's kept copies
   (rows grouped by chunk, then global expert; only kept rows, never capacity padding), the
   permuted rows, and the row counts exchanged with the peers (the routes of every chunk): one
   count call per layer call for every chunk and hop, started before the rows are permuted so
   the two overlap (see :mod:`smile.moe.exchange` for why counts cannot ride with the rows);
2. :meth:`~TokenDispatcher.to_experts`: every hop of the exchange toward this rank's experts;
3. :meth:`~TokenDispatcher.from_experts`: the hops back;
4. :meth:`~TokenDispatcher.combine`: un-permute and weight each token's copies by its gates.

Steps 2 and 3 are differentiable and synchronous; the pipelined layer (:mod:`smile.moe.pipeline`)
runs them per chunk instead, asynchronously, through :meth:`~TokenDispatcher.start` (a
:class:`~smile.moe.exchange.Transfer` whose ``finish`` waits). Any router pairs with any exchange.

The permute and combine ops run on a dispatch backend (:mod:`smile.moe.kernels`): the torch
reference, Triton or CUDA, all computing the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from smile.moe.config import MoEConfig
from smile.moe.exchange import EXCHANGES, Route, Transfer
from smile.moe.kernels import DispatchBackend, get_backend
from smile.moe.kernels.reference import accumulation_dtype
from smile.moe.payload import PayloadCodec, get_codec
from smile.moe.routing import RoutingPlan
from smile.moe.topology import Topology


@dataclass
class Dispatch:
    """One layer call's tokens on their way: the permutation and every chunk's route."""

    rows: list[torch.Tensor]  # each chunk's permuted rows (grouped by global expert)
    row_counts: torch.Tensor  # [chunks, E] rows of each chunk per global expert
    routes: list[Route]  # how each chunk reaches this rank's experts
    dest: torch.Tensor  # [T, k] permuted row of each copy, -1 if dropped
    src: torch.Tensor  # [R] token of each permuted row
    gates: torch.Tensor  # [T, k] combine weights
    backend: DispatchBackend


class TokenDispatcher:
    """Moves a layer's tokens to the experts that ``RoutingPlan`` chose and their outputs back."""

    def __init__(self, config: MoEConfig, topology: Topology) -> None:
        config.check_topology(topology)
        self.num_experts = config.num_experts
        self.kind = config.resolved_dispatcher(topology)
        self.exchange = EXCHANGES[self.kind](
            topology,
            config.num_experts,
            get_codec(config.dispatch_payload),
            get_codec(config.combine_payload),
            config.count_exchange,
            config.transport,
        )
        self.num_local = self.exchange.num_local
        self.backend_name = config.backend

    @property
    def dispatch_codec(self) -> PayloadCodec:
        return self.exchange.dispatch_codec

    @property
    def combine_codec(self) -> PayloadCodec:
        return self.exchange.combine_codec

    def permute(self, tokens: torch.Tensor, plan: RoutingPlan, chunks: int = 1) -> Dispatch:
        """Lay the kept copies out by chunk, then expert, and plan every chunk's route.

        Chunks are ``chunks`` consecutive near-equal token ranges; the keep mask enforces any
        capacity, so only kept rows travel and nothing is padded.
        """
        backend = get_backend(self.backend_name, tokens.device)
        with record_function("smile.dispatch"):
            slots = _chunk_slots(plan.expert_ids, chunks, self.num_experts)
            dest, src, slot_counts = backend.dispatch_index(
                slots, plan.keep, chunks * self.num_experts, kept_total=plan.kept_total
            )
            counts = slot_counts.view(chunks, self.num_experts)
            # The count exchange (one call for every chunk and hop) runs while the rows are copied.
            pending = self.exchange.start_routes(counts)
            rows = permute(tokens, src, dest, backend)
        chunk_rows = [rows] if chunks == 1 else list(rows.split(counts.sum(1).tolist()))
        return Dispatch(chunk_rows, counts, pending.wait(), dest, src, plan.gates, backend)

    def to_experts(self, dispatch: Dispatch) -> tuple[torch.Tensor, list[int] | torch.Tensor]:
        """(expert input rows, rows per local expert) of an unchunked dispatch."""
        (x,), (route,) = dispatch.rows, dispatch.routes
        for hop in route.hops:
            x = hop.to_experts(x)
        return x, route.expert_counts

    def from_experts(self, y: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """Expert outputs back in the permuted layout of an unchunked dispatch."""
        (route,) = dispatch.routes
        for hop in reversed(route.hops):
            y = hop.from_experts(y)
        return y

    def combine(self, rows: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """``out[t] = sum_j gates[t, j] * rows[dest[t, j]]`` in fp32 (dropped copies add 0)."""
        with record_function("smile.combine"):
            gates = dispatch.gates.to(rows.dtype)
            return unpermute_combine(rows, gates, dispatch.dest, dispatch.src, dispatch.backend)

    def start(
        self, route: Route, hop: int, x: torch.Tensor, toward_experts: bool, codec: PayloadCodec
    ) -> Transfer:
        """Start hop ``hop`` of ``route`` asynchronously (no autograd); ``finish()`` the result."""
        return route.hops[hop].start(x, toward_experts, codec)


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


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dest, backend):  # type: ignore[override]
        ctx.save_for_backward(dest)
        ctx.backend = backend
        return backend.gather_rows(x, src)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (dest,) = ctx.saved_tensors
        return ctx.backend.combine(grad_out.contiguous(), dest, None), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gates, dest, src, backend):  # type: ignore[override]
        ctx.save_for_backward(y, gates, dest, src)
        ctx.backend = backend
        return backend.combine(y, dest, gates)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        y, gates, dest, src = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:
            # Row r of y fed token src[r] with weight gates[t, j]: a gather, no atomics.
            row_gate = _row_gates(gates, dest, src)
            grad_y = ctx.backend.gather_rows(grad_out, src) * row_gate.unsqueeze(1).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            rows = ctx.backend.combine(y, dest.reshape(-1, 1), None).view(*dest.shape, y.shape[1])
            acc = accumulation_dtype(y.dtype)
            grad_gates = torch.einsum("tkh,th->tk", rows.to(acc), grad_out.to(acc)).to(gates.dtype)
        return grad_y, grad_gates, None, None, None


def _row_gates(gates: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gate of the copy held by each permuted row.

    A gather (row r holds the copy j of token src[r] with dest[src[r], j] == r): no boolean mask,
    whose size a GPU would have to send back to the host, and no duplicate scatter indices.
    """
    row = torch.arange(src.numel(), device=src.device).unsqueeze(1)
    return (gates.index_select(0, src) * (dest.index_select(0, src) == row)).sum(1)


def permute(x: torch.Tensor, src: torch.Tensor, dest: torch.Tensor, backend: DispatchBackend) -> torch.Tensor:
    """Rows of ``x`` laid out by expert (``src`` order); gradient sums each token's copies."""
    return _Permute.apply(x, src, dest, backend)


def unpermute_combine(
    y: torch.Tensor, gates: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, backend: DispatchBackend
) -> torch.Tensor:
    """``out[t] = sum_j gates[t, j] * y[dest[t, j]]`` in fp32 (dropped copies contribute 0)."""
    return _Combine.apply(y, gates, dest, src, backend)
