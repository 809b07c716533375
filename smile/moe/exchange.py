"""Moving rows between ranks: All2All with autograd, flat (one hop) and hierarchical (two hops).

The token dispatcher (:mod:`smile.moe.dispatcher`) owns one exchange. An exchange takes the
permuted buffer (rows grouped by global expert, ``row_counts[e]`` rows for expert e) and
returns the rows this rank's experts must process, in one canonical layout: grouped by local
expert, then by source EP rank, then in the sender's order. Flat and
hierarchical dispatch deliver the same rows in the same layout, so for the same routing plan
their results are bit-identical; the hops run in reverse to send expert outputs back.

* flat: one All2All over all W ranks of the EP group (W-1 peers per rank).
* hierarchical (SMILE): an inter-node All2All among the N ranks sharing a local rank, a local
  regroup by destination GPU, then an intra-node All2All among the G ranks of a node
  ((N-1) + (G-1) peers per rank, each inter-node message G times larger). A hop over a group of
  one rank (one node, or one rank per node) is no hop at all: the exchange is then the flat one
  over the other group, with flat's collectives and copies and nothing more.

Row counts: only real rows travel and ranks may hold different token counts, so no static
exchange size exists, and an All2All with uneven splits (gloo's included) needs both its send
and its receive splits before it starts. The counts therefore cannot ride in a header of the
payload they size (the receiver would have to know the header's payload size to post the
receive), and padding every message to a bound would send capacity padding (and dropless
routing has no bound). What is legal, and done here, is a small count All2All before the
dispatch, started asynchronously by :meth:`Exchange.start_routes` as soon as the counts exist so
it overlaps the permute copy, covering every chunk (combine and backward reuse its splits).
The two-hop exchange has two ways to count (``count_exchange``):

* ``per_hop`` (default): each hop counts within its own group, the inter-node counts first, then
  the intra-node ones derived from them, exchanged while hop 1 moves its rows (hop 2 waits for
  them when it starts): two calls, one on the critical path, (N-1) + (G-1) messages, the fewest
  messages, which is what matters at scale, where a message's latency dominates (SMILE's point);
* ``per_call``: one call over the EP group sends each peer this rank's counts for every expert on
  that peer's node, from which each rank derives both hops' splits: one call, (N-1)G + (G-1)
  messages, cheaper where the fixed cost of a call dominates (gloo on a few CPU ranks).

Each hop moves its rows by one of two transports (``transport``): ``collective``, one
``all_to_all_single``, then the regroup as a copy; or ``p2p``, every peer's rows as
point-to-point pieces of at most :data:`P2P_PIECE_BYTES`, sends and receives posted alternately
in one batch. On gloo a two-rank All2All can send one direction after the other (half a duplex
link); the pieces keep both directions busy (docs/benchmarks.md). The pieces are cut at the
boundaries of the blocks a regroup moves (both ends know every block's size from the counts), so
each block is received straight into its regrouped place and sent back from it: ``p2p`` makes
no regroup copy. Both deliver the same rows in the same layout.

The pipelined layer (:mod:`smile.moe.pipeline`) drives
the hops asynchronously through :meth:`Hop.start`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from smile.moe.config import COUNT_EXCHANGES, TRANSPORTS, check_choice
from smile.moe.payload import ExactCodec, PayloadCodec
from smile.moe.topology import Topology

EXACT = ExactCodec()
P2P_PIECE_BYTES = 128 * 1024  # the "p2p" transport's largest message


@dataclass
class Transfer:
    """An All2All in flight; :meth:`finish` waits for it, decodes and applies the regroup."""

    wire: torch.Tensor
    work: object | None  # torch.distributed Work, None when nothing travels
    codec: PayloadCodec
    dtype: torch.dtype
    index: torch.Tensor | None = None
    sent: torch.Tensor | None = None  # keeps the send buffer alive until the exchange ends

    def done(self) -> bool:
        return self.work is None or self.work.is_completed()

    def finish(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        out = self.codec.decode(self.wire, self.dtype)
        return out if self.index is None else out.index_select(0, self.index)


class _Works:
    """Point-to-point operations in flight, waited for as one."""

    def __init__(self, works: list) -> None:
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()


Segments = list[list[tuple[int, int]]]  # per peer, (first row, rows) of each block in travel order


@dataclass(frozen=True)
class P2PLayout:
    """Where the rows exchanged with each peer lie: ``send[p]`` in the input, ``recv[p]`` in the
    output, block by block. Peer p's ``send[me]`` blocks have the sizes of this rank's ``recv[p]``."""

    send: Segments
    recv: Segments

    def reversed(self) -> P2PLayout:
        """The way back: every block returns from where it arrived to where it came from."""
        return P2PLayout(self.recv, self.send)

    @staticmethod
    def contiguous(send_splits: list[int], recv_splits: list[int]) -> P2PLayout:
        """One block per peer, peers in rank order on both sides (a plain All2All)."""
        return P2PLayout(_in_order([[n] for n in send_splits]), _in_order([[n] for n in recv_splits]))

    @staticmethod
    def of_counts(send: torch.Tensor, recv: torch.Tensor, perm: tuple[int, ...]) -> P2PLayout:
        """Blocks of ``send`` / ``recv`` counts ([peer, ...], row-major) sent in order and received
        where the regroup ``perm`` of :func:`regroup_index` puts them."""
        sizes = recv.reshape(-1)
        block = torch.arange(sizes.numel(), device=recv.device).view(recv.shape).permute(perm).reshape(-1)
        moved = sizes[block]
        starts = torch.empty_like(sizes)
        starts[block] = torch.cumsum(moved, 0) - moved
        peers = recv.shape[0]
        placed = [list(zip(p_starts, p_sizes)) for p_starts, p_sizes in
                  zip(starts.view(peers, -1).tolist(), sizes.view(peers, -1).tolist())]  # fmt: skip
        return P2PLayout(_in_order(send.reshape(send.shape[0], -1).tolist()), placed)


def _in_order(blocks: list[list[int]]) -> Segments:
    """Segments of blocks laid out one after the other, peer by peer."""
    out, start = [], 0
    for peer in blocks:
        out.append([])
        for rows in peer:
            out[-1].append((start, rows))
            start += rows
    return out


def _pieces(t: torch.Tensor, segments: list[tuple[int, int]], per: int) -> list[torch.Tensor]:
    """Views of ``t``'s segments cut into pieces of at most ``per`` rows (empty blocks skipped)."""
    ends = [(start + rows, range(start, start + rows, per)) for start, rows in segments]
    return [t[at : min(at + per, end)] for end, starts in ends for at in starts]


def _start_p2p(out: torch.Tensor, wire: torch.Tensor, layout: P2PLayout, group):
    """The All2All as sends and receives in pieces, all posted at once: both directions of every
    pair stay busy (sender and receiver cut each block into the same pieces)."""
    me, size = dist.get_rank(group), dist.get_world_size(group)
    row_bytes = math.prod(wire.shape[1:]) * wire.element_size()  # the same on every rank
    per = max(1, P2P_PIECE_BYTES // max(row_bytes, 1))
    for (src, rows), (dst, _) in zip(layout.send[me], layout.recv[me]):
        out[dst : dst + rows].copy_(wire[src : src + rows])
    ops = []
    for shift in range(1, size):
        dst, src = (me + shift) % size, (me - shift) % size
        dst_global, src_global = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
        out_pieces, in_pieces = _pieces(wire, layout.send[dst], per), _pieces(out, layout.recv[src], per)
        for out_piece, in_piece in itertools.zip_longest(out_pieces, in_pieces):
            if out_piece is not None:
                ops.append(dist.P2POp(dist.isend, out_piece, dst_global, group))
            if in_piece is not None:
                ops.append(dist.P2POp(dist.irecv, in_piece, src_global, group))
    return _Works(dist.batch_isend_irecv(ops)) if ops else None


def start_exchange(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group,
    codec: PayloadCodec = EXACT,
    index: torch.Tensor | None = None,
    transport: str = "collective",
    layout: P2PLayout | None = None,
) -> Transfer:
    """Start the All2All of ``x`` encoded by ``codec`` (``transport``: one ``all_to_all_single``
    or pieces of point-to-point messages, placed by ``layout``, by default each peer's rows in
    rank order); ``index`` regroups on arrival."""
    if group is None or dist.get_world_size(group) == 1:
        return Transfer(x.clone(), None, EXACT, x.dtype, index)
    wire = codec.encode(x).contiguous()
    out = wire.new_empty((sum(out_splits), *wire.shape[1:]))
    if transport == "p2p":
        work = _start_p2p(out, wire, layout or P2PLayout.contiguous(in_splits, out_splits), group)
    else:
        work = dist.all_to_all_single(out, wire, out_splits, in_splits, group=group, async_op=True)
    return Transfer(out, work, codec, x.dtype, index, wire)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; backward runs the reverse exchange.

    ``codec`` is the wire format of the forward payload and ``grad_codec`` of the gradient;
    quantisation is treated as the identity by autograd (straight-through).
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, codec, grad_codec, transport, layout):  # type: ignore[override]
        ctx.splits, ctx.group, ctx.grad_codec = (out_splits, in_splits), group, grad_codec
        ctx.transport, ctx.layout = transport, layout
        return start_exchange(x, out_splits, in_splits, group, codec, None, transport, layout).finish()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        back = None if ctx.layout is None else ctx.layout.reversed()
        codec, transport = ctx.grad_codec, ctx.transport
        grad = start_exchange(grad, in_splits, out_splits, ctx.group, codec, None, transport, back)
        return grad.finish(), None, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group,
    codec: PayloadCodec = EXACT,
    grad_codec: PayloadCodec = EXACT,
    transport: str = "collective",
    layout: P2PLayout | None = None,
) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group, codec, grad_codec, transport, layout)


@dataclass
class PendingRoutes:
    """A count exchange in flight; :meth:`wait` finishes it and plans every chunk's route."""

    received: torch.Tensor
    work: object | None  # torch.distributed Work, None when no collective runs
    plan: Callable[[torch.Tensor], list[Route]]
    sent: torch.Tensor  # keeps the send buffer alive until the exchange ends

    def wait(self) -> list[Route]:
        if self.work is not None:
            self.work.wait()
        return self.plan(self.received)


def start_counts(counts: torch.Tensor, group, plan: Callable[[torch.Tensor], list[Route]]) -> PendingRoutes:
    """Start sending ``counts[p]`` (any trailing shape) to peer p; ``plan`` gets what each peer sent us."""
    counts = counts.contiguous()
    if group is None or dist.get_world_size(group) == 1:
        return PendingRoutes(counts, None, plan, counts)
    received = torch.empty_like(counts)
    work = dist.all_to_all_single(received.view(-1), counts.view(-1), group=group, async_op=True)
    return PendingRoutes(received, work, plan, counts)


def regroup_index(counts: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """Row index that reorders variable-size blocks from ``counts``'s axis order to ``perm``'s.

    Rows are laid out as blocks in row-major order of ``counts`` (block b has counts[b] rows);
    the result gathers them so blocks follow ``counts.permute(perm)`` in row-major order.
    """
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(counts.shape).permute(perm).reshape(-1)
    sizes = counts.permute(perm).reshape(-1)
    block = torch.repeat_interleave(torch.arange(sizes.numel(), device=counts.device), sizes)
    new_starts = torch.cumsum(sizes, 0) - sizes
    return starts[block] + torch.arange(block.numel(), device=counts.device) - new_starts[block]


class _Regroup(torch.autograd.Function):
    """Rows reordered by the permutation ``index``; the gradient is the gather by ``inverse``.

    Autograd's ``index_select`` backward would scatter-add into a zeroed buffer; a permutation
    needs only the inverse gather, which moves the same values.
    """

    @staticmethod
    def forward(ctx, x, index, inverse):  # type: ignore[override]
        ctx.inverse = inverse
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.index_select(0, ctx.inverse), None, None


def _inverse(index: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


@dataclass
class Hop:
    """One All2All hop and the regroup of the rows that arrive, remembered for the way back.

    ``send_counts`` [dest peer, ...] are the blocks of rows this rank sends, one after the other in
    its buffer; ``recv_counts`` [src peer, ...] the blocks it receives, in arrival order; the
    regroup puts them in the order of ``recv_counts.permute(perm)``. The collective transport
    regroups with a copy (none when the blocks already arrive in order); ``p2p`` receives each
    block in its place. ``recv_counts`` may be a callable that waits for counts still on their
    way (hop 2's, exchanged while hop 1 moves its rows): the hop needs them only when it runs.
    """

    group: object
    send_counts: torch.Tensor
    recv_counts: torch.Tensor | Callable[[], torch.Tensor]
    perm: tuple[int, ...]
    label: str  # profiler region: smile.a2a.<label>
    dispatch_codec: PayloadCodec = EXACT
    combine_codec: PayloadCodec = EXACT
    transport: str = "collective"

    def __post_init__(self) -> None:
        self.send_splits = _per_peer(self.send_counts)

    @functools.cached_property
    def recv_splits(self) -> list[int]:
        return _per_peer(self._arrivals)

    @functools.cached_property
    def _arrivals(self) -> torch.Tensor:
        return self.recv_counts() if callable(self.recv_counts) else self.recv_counts

    @functools.cached_property
    def layout(self) -> P2PLayout | None:
        """Where ``p2p`` sends and receives each block (None for the collective transport)."""
        if self.transport != "p2p":
            return None
        return P2PLayout.of_counts(self.send_counts, self._arrivals, self.perm)

    @functools.cached_property
    def back(self) -> P2PLayout | None:
        return None if self.layout is None else self.layout.reversed()

    @functools.cached_property
    def index(self) -> torch.Tensor | None:
        """The collective transport's regroup copy after arrival (None: the blocks arrive in order)."""
        if self.transport == "p2p":
            return None
        index = regroup_index(self._arrivals, self.perm)
        return None if torch.equal(index, torch.arange(index.numel(), device=index.device)) else index

    @functools.cached_property
    def inverse(self) -> torch.Tensor | None:
        return None if self.index is None else _inverse(self.index)

    def to_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Send ``x`` toward the experts and regroup it (differentiable)."""
        with record_function(f"smile.a2a.{self.label}"):
            out = all_to_all(
                x,
                self.recv_splits,
                self.send_splits,
                self.group,
                self.dispatch_codec,
                self.combine_codec,
                self.transport,
                self.layout,
            )
            return out if self.index is None else _Regroup.apply(out, self.index, self.inverse)

    def from_experts(self, y: torch.Tensor) -> torch.Tensor:
        """Undo the regroup and send ``y`` back toward its senders (differentiable)."""
        with record_function(f"smile.a2a.{self.label}"):
            if self.inverse is not None:
                y = _Regroup.apply(y, self.inverse, self.index)
            return all_to_all(
                y,
                self.send_splits,
                self.recv_splits,
                self.group,
                self.combine_codec,
                self.combine_codec,
                self.transport,
                self.back,
            )

    def start(self, x: torch.Tensor, toward_experts: bool, codec: PayloadCodec) -> Transfer:
        """Asynchronous, autograd-free :meth:`to_experts` (``toward_experts``) or :meth:`from_experts`."""
        with record_function(f"smile.a2a.{self.label}"):
            if toward_experts:
                splits = (self.recv_splits, self.send_splits)
                return start_exchange(x, *splits, self.group, codec, self.index, self.transport, self.layout)
            if self.inverse is not None:
                x = x.index_select(0, self.inverse)
            return start_exchange(
                x, self.send_splits, self.recv_splits, self.group, codec, None, self.transport, self.back
            )


def _per_peer(counts: torch.Tensor) -> list[int]:
    """Rows to or from each peer of counts shaped ``[peer, ...]``."""
    return counts.reshape(counts.shape[0], -1).sum(1).tolist()


class Route:
    """How one chunk of rows reaches this rank's experts.

    ``sources[i, s]`` rows arrive for local expert i from source EP rank s; the experts' input
    is grouped by local expert, then source rank, then the sender's order. Given as a callable,
    ``sources`` is waited for when first read (counts still on their way, as in :class:`Hop`).
    """

    def __init__(self, hops: list[Hop], sources: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        self.hops = hops
        self._sources = sources

    @functools.cached_property
    def sources(self) -> torch.Tensor:  # [num_local, ep_size]
        return self._sources() if callable(self._sources) else self._sources

    @functools.cached_property
    def expert_counts(self) -> list[int] | torch.Tensor:
        """Rows per local expert: on the host when rows travel (their splits are on the host
        anyway), else left on the device so a single-GPU layer never waits for them."""
        counts = self.sources.sum(1)
        return counts.tolist() if self.hops else counts


class Exchange:
    """Moves rows between the permuted buffer and this rank's experts, in one or two hops."""

    def __init__(
        self,
        topology: Topology,
        num_experts: int,
        dispatch_codec: PayloadCodec = EXACT,
        combine_codec: PayloadCodec = EXACT,
        count_exchange: str = "per_hop",
        transport: str = "collective",
    ) -> None:
        check_choice("count_exchange", count_exchange, COUNT_EXCHANGES)
        check_choice("transport", transport, TRANSPORTS)
        self.dispatch_codec, self.combine_codec = dispatch_codec, combine_codec
        self.count_exchange, self.transport = count_exchange, transport
        self.topology = topology
        self.num_experts = num_experts
        self.num_local = num_experts // topology.ep_size

    def start_routes(self, row_counts: torch.Tensor) -> PendingRoutes:
        """Start planning the routes of chunks whose permuted buffers hold ``row_counts[c, e]``
        rows per expert: the count exchange for all chunks, started asynchronously, so the caller
        can permute the rows meanwhile; ``wait()`` returns the routes."""
        raise NotImplementedError

    def routes(self, row_counts: torch.Tensor) -> list[Route]:
        """:meth:`start_routes`, waited for."""
        return self.start_routes(row_counts).wait()

    def _hop(self, label: str, group, send: torch.Tensor, recv, perm: tuple[int, ...]) -> Hop:
        return Hop(group, send, recv, perm, label, self.dispatch_codec, self.combine_codec, self.transport)

    def _one_hop(self, label: str, group, row_counts: torch.Tensor) -> PendingRoutes:
        """One All2All over ``group``, whose i-th rank is EP rank i (the flat exchange)."""
        send = row_counts.view(-1, self.topology.ep_size, self.num_local).transpose(0, 1)
        return start_counts(send, group, functools.partial(self._one_hop_routes, label, group, send))

    def _one_hop_routes(self, label: str, group, send: torch.Tensor, recv: torch.Tensor) -> list[Route]:
        """``send`` / ``recv``: [dest / src rank, chunk, local expert]."""
        return [
            Route([self._hop(label, group, send[:, c], recv[:, c], (1, 0))], recv[:, c].t())
            for c in range(send.shape[1])
        ]


def hop2_sends(recv1: torch.Tensor) -> torch.Tensor:
    """What hop 2 sends, [dest gpu, chunk, src node, local expert], from what hop 1 brought,
    [src node, chunk, dest gpu, local expert]: a view, so both count modes share one layout."""
    return recv1.permute(2, 1, 0, 3)


class FlatExchange(Exchange):
    """One All2All over the whole EP group (Switch / GShard / DeepSpeed-MoE)."""

    def start_routes(self, row_counts):
        return self._one_hop("flat", self.topology.group("ep"), row_counts)


class HierarchicalExchange(Exchange):
    """SMILE's two hops: inter-node (same local rank), then intra-node.

    With one node, or one rank per node, one of the two hops is over a group of one rank: it is
    left out, and the other hop alone is the flat exchange (no extra collective, no copy).
    """

    def start_routes(self, row_counts):
        topo = self.topology
        n, g, e = topo.ep_nodes, topo.gpus_per_node, self.num_local
        if g == 1:
            return self._one_hop("inter", topo.group("inter"), row_counts)
        if n == 1:
            return self._one_hop("intra", topo.group("intra"), row_counts)
        if self.count_exchange == "per_hop":
            send1 = row_counts.view(-1, n, g, e).transpose(0, 1)  # [dest node, chunk, dest gpu, local expert]
            return start_counts(
                send1, topo.group("inter"), functools.partial(self._per_hop_routes, row_counts)
            )
        chunks = row_counts.shape[0]
        # To EP rank (node m, gpu j): this rank's counts for every expert of node m.
        node_counts = row_counts.view(chunks, n, 1, g, e).expand(chunks, n, g, g, e)
        send = node_counts.permute(1, 2, 0, 3, 4).reshape(n * g, chunks, g, e)
        return start_counts(send, topo.group("ep"), functools.partial(self._one_call_routes, row_counts))

    def _per_hop_routes(self, row_counts: torch.Tensor, recv1: torch.Tensor) -> list[Route]:
        """Hop 2's counts from hop 1's (``recv1``: [src node, chunk, dest gpu, local expert]),
        exchanged while hop 1 moves its rows: hop 2 waits for them when it starts."""
        pending = start_counts(hop2_sends(recv1), self.topology.group("intra"), lambda counts: counts)
        return self._two_hop_routes(row_counts, recv1, functools.cache(pending.wait))

    def _one_call_routes(self, row_counts: torch.Tensor, received: torch.Tensor) -> list[Route]:
        """Both hops' counts from ``received[s]``: EP rank s's counts for this node's experts."""
        n, g, e, me = (
            self.topology.ep_nodes,
            self.topology.gpus_per_node,
            self.num_local,
            self.topology.local_rank,
        )
        counts = received.view(n, g, -1, g, e)  # [src node, src gpu, chunk, dest gpu, local expert]
        # Hop 1 brings this rank what the ranks of its local rank on every node send to this node.
        recv1 = counts[:, me]  # [src node, chunk, dest gpu, local expert]
        # Hop 2 brings this rank what every EP rank sends to its own experts, via node-mate src gpu.
        recv2 = counts[:, :, :, me].permute(1, 2, 0, 3)  # [src gpu, chunk, src node, local expert]
        return self._two_hop_routes(row_counts, recv1, lambda: recv2)

    def _two_hop_routes(
        self, row_counts: torch.Tensor, recv1: torch.Tensor, recv2: Callable[[], torch.Tensor]
    ) -> list[Route]:
        """Routes of both hops: ``recv1`` [src node, chunk, dest gpu, local expert] arrive by hop 1,
        ``recv2()`` [src gpu, chunk, src node, local expert] by hop 2 (waited for when hop 2 runs)."""
        topo = self.topology
        n, g, e = topo.ep_nodes, topo.gpus_per_node, self.num_local
        inter, intra = topo.group("inter"), topo.group("intra")
        send1 = row_counts.view(-1, n, g, e).transpose(0, 1)  # [dest node, chunk, dest gpu, local expert]
        send2 = hop2_sends(recv1)
        routes = []
        for c in range(send1.shape[1]):
            arrivals = functools.partial(_chunk, recv2, c)  # [src gpu, src node, local expert]
            hop1 = self._hop("inter", inter, send1[:, c], recv1[:, c], (1, 0, 2))
            hop2 = self._hop("intra", intra, send2[:, c], arrivals, (2, 1, 0))
            # Source EP rank = node * g + gpu: [local expert, src node, src gpu] -> [local expert, src rank].
            sources = functools.partial(_sources, arrivals, e)
            routes.append(Route([hop1, hop2], sources))
        return routes


def _chunk(counts: Callable[[], torch.Tensor], c: int) -> torch.Tensor:
    return counts()[:, c]


def _sources(arrivals: Callable[[], torch.Tensor], experts: int) -> torch.Tensor:
    """[local expert, source EP rank] from hop 2's arrivals [src gpu, src node, local expert]."""
    return arrivals().permute(2, 1, 0).reshape(experts, -1)


class LocalExchange(Exchange):
    """Single process: every expert is local, nothing moves."""

    def start_routes(self, row_counts):
        return start_counts(row_counts, None, lambda counts: [Route([], c.view(-1, 1)) for c in counts])


EXCHANGES: dict[str, type[Exchange]] = {
    "flat": FlatExchange,
    "hierarchical": HierarchicalExchange,
    "local": LocalExchange,
}
