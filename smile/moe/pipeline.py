"""Chunked pipelining: a layer's All2Alls overlap each other and the expert compute.

The layer's tokens are split into chunks that move through a fixed sequence of stages: the
dispatch hops, the experts, the combine hops (and, in backward, the same in reverse). Each
process group carries one chunk at a time, asynchronously, so while the experts compute chunk
i the All2All of chunk i+1 is on the wire, and in the two-hop dispatcher the inter-node hop
of one chunk runs while the intra-node hop of another does.

Results are bit-identical to the unchunked layer: every expert row is computed by the same
row-wise GEMMs (whose per-row results do not depend on how many rows share the call), and the
expert weight gradients are computed once, after every chunk's expert step, over all rows put
back in the unchunked layer's canonical order, so they sum in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from smile.moe.exchange import Route, Transfer, regroup_index
from smile.moe.experts import ExpertFFN

if TYPE_CHECKING:
    from smile.moe.dispatcher import TokenDispatcher


@dataclass(frozen=True)
class Stage:
    """One step of a chunk: a transfer started on ``channel``, or a compute step (channel None)."""

    run: Callable[[int, torch.Tensor], Transfer | torch.Tensor]
    channel: object | None = None


def run_stages(
    stages: list[Stage], inputs: list[torch.Tensor], tail: Callable[[], None] | None = None
) -> list[torch.Tensor]:
    """Move every chunk through ``stages``; at most one transfer per channel is in flight.

    ``tail`` runs once every chunk is past its last compute stage, while the last transfers are
    still on the wire.

    Every rank must issue a channel's collectives in the same order, so each channel follows a
    fixed order: stage s of chunk c at time c + s, earlier chunks first on ties. Dependencies
    (stage s - 1 of the same chunk) always come earlier in that order, so nothing deadlocks.
    Within it the loop is greedy: start every transfer whose turn it is, collect finished ones,
    run one compute step; block on the oldest transfer only when nothing else can move.
    """
    n = len(inputs)
    values: list[torch.Tensor | None] = list(inputs)
    step = [0] * n
    queues: dict[int, list[tuple[int, int]]] = {}  # id(channel) -> [(chunk, stage)] in issue order
    for c, s in sorted(((c, s) for c in range(n) for s in range(len(stages))), key=lambda cs: (sum(cs), cs)):
        if stages[s].channel is not None:
            queues.setdefault(id(stages[s].channel), []).append((c, s))
    in_flight: dict[int, tuple[int, Transfer]] = {}  # id(channel) -> (chunk, transfer)
    last_compute = max((i for i, stage in enumerate(stages) if stage.channel is None), default=-1)

    def finish(key: int) -> None:
        chunk, transfer = in_flight.pop(key)
        values[chunk] = transfer.finish()
        step[chunk] += 1

    while any(s < len(stages) for s in step):
        moved = False
        for key in [k for k, (_, t) in in_flight.items() if t.done()]:
            finish(key)
            moved = True
        for key, queue in queues.items():
            if key not in in_flight and queue and step[queue[0][0]] == queue[0][1]:
                chunk, s = queue.pop(0)
                in_flight[key] = (chunk, stages[s].run(chunk, values[chunk]))
                values[chunk] = None
                moved = True
        busy = {chunk for chunk, _ in in_flight.values()}
        computable = (c for c in range(n) if c not in busy and step[c] < len(stages))
        chunk = next((c for c in computable if stages[step[c]].channel is None), None)
        if chunk is not None:
            values[chunk] = stages[step[chunk]].run(chunk, values[chunk])
            step[chunk] += 1
            moved = True
        elif tail is not None and all(s > last_compute for s in step):
            tail()
            tail, moved = None, True
        if not moved:
            if not in_flight:
                raise RuntimeError(f"pipeline stalled at stages {step}")
            finish(min(in_flight, key=lambda k: in_flight[k][0]))
    if tail is not None:  # nothing followed the last compute stage
        tail()
    return values  # type: ignore[return-value]


def _layer_stages(
    dispatcher: TokenDispatcher,
    routes: list[Route],
    compute: Callable[[int, torch.Tensor], torch.Tensor],
    codec_in,
    codec_out,
) -> list[Stage]:
    """Every hop toward the experts (payload ``codec_in``), ``compute``, every hop back (``codec_out``).

    Each hop's process group is its channel: one transfer at a time on each.
    """

    def hop(index: int, toward_experts: bool, codec) -> Stage:
        return Stage(
            lambda c, x: dispatcher.start(routes[c], index, x, toward_experts, codec),
            routes[0].hops[index].group,
        )

    hops = range(len(routes[0].hops))
    return [
        *(hop(h, True, codec_in) for h in hops),
        Stage(compute),
        *(hop(h, False, codec_out) for h in reversed(hops)),
    ]


def _canonical_order(routes: list[Route]) -> tuple[torch.Tensor, list[int]]:
    """Index putting the chunks' expert rows (chunk-major) into the unchunked layer's order.

    Each chunk's rows are grouped by (local expert, source rank); the unchunked layer's rows by
    (local expert, source rank, chunk), since chunks hold consecutive tokens.
    """
    sources = torch.stack([r.sources for r in routes])  # [chunk, local expert, source rank]
    return regroup_index(sources, (1, 2, 0)), sources.sum((0, 2)).tolist()


class _Pipelined(torch.autograd.Function):
    """Dispatch -> experts -> combine for all chunks; backward pipelines the reverse."""

    @staticmethod
    def forward(ctx, dispatcher, experts, routes, w_in, w_out, *rows):  # type: ignore[override]
        saved: list[tuple] = [()] * len(rows)

        def compute(c: int, x: torch.Tensor) -> torch.Tensor:
            y, saved[c] = experts.forward_rows(x, routes[c].expert_counts)
            return y

        stages = _layer_stages(
            dispatcher, routes, compute, dispatcher.dispatch_codec, dispatcher.combine_codec
        )
        outs = run_stages(stages, list(rows))
        ctx.dispatcher, ctx.experts, ctx.routes, ctx.saved = dispatcher, experts, routes, saved
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        routes, experts, codec = ctx.routes, ctx.experts, ctx.dispatcher.combine_codec
        weight_rows: list[tuple] = [()] * len(grads)

        def compute(c: int, dy: torch.Tensor) -> torch.Tensor:
            dx, weight_rows[c] = experts.backward_rows(dy, ctx.saved[c], routes[c].expert_counts)
            ctx.saved[c] = ()
            return dx

        stages = _layer_stages(
            ctx.dispatcher, routes, compute, codec, codec
        )  # gradients travel in the combine format
        weight_grads: list[torch.Tensor] = []

        def take_weight_grads() -> None:
            order, counts = _canonical_order(routes)
            full = tuple(torch.cat(parts).index_select(0, order) for parts in zip(*weight_rows))
            weight_grads.extend(experts.weight_grads(full, counts))

        grad_rows = run_stages(stages, [g.contiguous() for g in grads], tail=take_weight_grads)
        grad_w_in, grad_w_out = weight_grads
        return None, None, None, grad_w_in, grad_w_out, *grad_rows


def pipelined_experts(
    dispatcher: TokenDispatcher,
    routes: list[Route],
    experts: ExpertFFN,
    rows: list[torch.Tensor],
    row_counts: torch.Tensor,
) -> list[torch.Tensor]:
    """Expert outputs, back in each chunk's permuted layout, for chunk buffers ``rows``.

    ``routes`` are the chunks' routes from :meth:`TokenDispatcher.permute` (``row_counts[c, e]``
    rows of chunk c for global expert e, kept copies only). Call it as
    ``experts(rows, row_counts, run=functools.partial(pipelined_experts, dispatcher, routes))`` so
    the expert module's hooks fire.
    """
    return list(_Pipelined.apply(dispatcher, experts, routes, experts.w_in, experts.w_out, *rows))
