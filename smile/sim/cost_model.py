"""Alpha-beta cost model of flat vs hierarchical All2All and of one MoE layer step.

Why: SMILE's claim is about clusters of hundreds of GPUs; this model extrapolates from what can
be measured (the emulated cluster of :mod:`smile.sim.cluster`) to such clusters, and is only as
credible as its fit to those measurements, which :func:`fit_all2all` reports.

It follows :mod:`smile.moe.exchange` exactly, per rank sending ``m`` bytes spread evenly over all ranks:

* flat: one All2All over W = N*G ranks: (N-1)*G inter-node peers and G-1 intra-node peers; a
  node's uplink carries ``G * m * (N-1)/N`` bytes; one regroup copy.
* hierarchical: hop 1 among the N ranks sharing a local rank (N-1 inter-node peers, the same
  uplink bytes), a regroup copy, hop 2 among the G ranks of a node (G-1 intra-node peers,
  ``m*(G-1)/G`` bytes), another copy. With N=1 or G=1 one hop is free and left out: flat.
* counts (``ClusterSpec.count_exchange``, ``MoEConfig.count_exchange``), exchanged once per layer
  call before the dispatch (combine and backward reuse the splits): "per_hop" (the default) makes
  one count call per hop in that hop's group ((N-1) + (G-1) messages for two hops), hop 2's while
  hop 1 moves its rows, so only hop 1's is on the critical path (runs before 2026-12-06 09:00 UTC
  made them one after the other; the model prices what the code does now); "per_call"
  makes one call over all W ranks ((N-1)G + G-1 messages). Flat makes one call either way. Runs
  from before 2026-12-06 (RESULTS.md's first emulated runs) used per_hop but also cloned the
  buffer for a hop over a one-rank group, which the exchange now leaves out; they are modelled as
  per_hop. Benchmark JSON records the mode (``config.count_exchange``; absent: per_hop).

A hop costs ``collective_overhead + peers * latency + bytes / bandwidth`` per tier; the two tiers
of one flat collective overlap when ``overlap_tiers`` (NCCL on NVLink + NIC) and add up
otherwise (gloo on one CPU, where every byte costs the same cores). A copy of ``b`` bytes costs
``b / copy_bandwidth``. A hop with no peer (N=1 or G=1) is a local copy. Not modelled: network
congestion and incast, message-size dependent protocols, overlap of communication with compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

DISPATCH_KINDS = ("flat", "hierarchical")
COUNT_EXCHANGES = ("per_hop", "per_call")  # the choices of smile.moe.MoEConfig.count_exchange
LAYER_KINDS = ("switch", "smile")
GB = 1e9


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of ``nodes`` x ``gpus_per_node``: per-tier bandwidth (bytes/s) and latency (s)."""

    name: str
    nodes: int
    gpus_per_node: int
    inter_bandwidth: float  # bytes/s into and out of one node, all its NICs together
    inter_latency: float  # s per inter-node message
    intra_bandwidth: float  # bytes/s from one GPU to its node peers
    intra_latency: float  # s per intra-node message
    collective_overhead: float  # s per collective call (launch, synchronisation)
    copy_bandwidth: float  # bytes/s of output of a local row gather (regroup, permute)
    flops: float  # achieved FLOP/s per GPU on the layer's matmuls
    overlap_tiers: bool = True
    count_exchange: str = "per_hop"  # how two hops exchange row counts (module docstring)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClusterSpec.{name} must be a positive int, got {value!r}")
        for name in ("inter_bandwidth", "intra_bandwidth", "copy_bandwidth", "flops"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"ClusterSpec.{name} must be > 0 (math.inf allowed), got {getattr(self, name)!r}"
                )
        for name in ("inter_latency", "intra_latency", "collective_overhead"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ClusterSpec.{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.count_exchange not in COUNT_EXCHANGES:
            allowed = ", ".join(COUNT_EXCHANGES)
            raise ValueError(
                f"ClusterSpec.count_exchange must be one of {allowed}, got {self.count_exchange!r}"
            )

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def with_nodes(self, nodes: int) -> ClusterSpec:
        return replace(self, nodes=nodes)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ClusterSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ClusterSpec fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**{k: (math.inf if v is None else v) for k, v in data.items()})


# Effective (not nominal) figures, each anchored in what was read or measured (one comment per
# parameter; "assumed" where no published figure was found). p4d = the AWS instance type of
# 8x A100-SXM4-40GB; the SMILE paper's own cluster description was not available here (only its
# abstract and front matter: authors at AWS AI), so "the paper ran on p4d" is itself unverified.
PRESETS: dict[str, ClusterSpec] = {
    "a100-efa": ClusterSpec(
        name="8xA100 NVLink + 4x100Gb/s EFA",
        nodes=16,
        gpus_per_node=8,
        # 400 Gb/s EFA per p4d node = 50 GB/s nominal (AWS blog "Amazon EC2 P4d instances deep
        # dive"). Measured: all_reduce_perf 1 GiB on 4 x p4dn, busbw 29.6 GB/s (NCCL 2.9.9, a thread
        # about slow EFA runs, NVIDIA/nccl#527). No bandwidth-bound alltoall figure for p4d was
        # found: assumed 80% of nominal, between that slow measurement and the line rate.
        inter_bandwidth=40 * GB,
        # alltoall_perf on A100-SXM4-40GB nodes over EFA (bottlerocket-kernel-kit PR #313 / #424):
        # ~105-115 us from 2 to 32 KiB, i.e. latency-bound. Taking the excerpt's rank layout as
        # 2 x 8 (not shown) and the 20 us overhead below: (105 - 20) / 8 remote peers ~ 10 us.
        inter_latency=10e-6,
        # all_reduce_perf 1 GiB inside one p4dn (NVSwitch, NVLink3): busbw 230.8 GB/s (NVIDIA/nccl#527);
        # nominal 300 GB/s per direction per GPU (A100 SXM4 spec).
        intra_bandwidth=230 * GB,
        # No A100 small-message alltoall found: assumed equal to the NVSwitch figure of h100-ib.
        intra_latency=1e-6,
        # Assumed: the fixed part of one NCCL collective over EFA (launch, proxy, sync); with the
        # latency above it reproduces the ~105 us latency-bound alltoall.
        collective_overhead=20e-6,
        # ANCHORS: torch permute reaches 47% of device-copy bandwidth (H100); applied to A100-40GB's
        # 1.555 TB/s HBM2 (spec), read + write counted: 0.47 * 1.555 / 2 = 0.365 TB/s of output.
        copy_bandwidth=0.365e12,
        # ANCHORS: the per-expert torch loop reached 56% of the matmul ceiling (H200, large shapes);
        # applied to A100's 312 TFLOP/s dense bf16 (spec): an upper figure for Switch-Base's shapes.
        flops=175e12,
    ),
    "h100-ib": ClusterSpec(
        name="8xH100 NVLink + 8x400Gb/s InfiniBand",
        nodes=16,
        gpus_per_node=8,
        # NDR 400 Gb/s ConnectX-7: "46-48 GB/s per NIC" in nccl-tests (NVIDIA, nccl-tests#290), and
        # alltoall cannot aggregate NICs, so each GPU gets its own NIC's rate (nccl-tests#267);
        # DeepEP measured 43-58 GB/s per rank over CX7 at EP16-64 (deepseek-ai/DeepEP docs/legacy.md).
        # 8 GPUs x 46 GB/s.
        inter_bandwidth=368 * GB,
        # No per-message InfiniBand figure for NCCL was found: assumed (IB verbs small messages take
        # a few us; NCCL's proxy adds to it).
        inter_latency=5e-6,
        # NVLink4: 450 GB/s line rate per direction, "NCCL can get an effective NVLink bandwidth of
        # 370GB/s", seen as busbw of non-allreduce collectives (NVIDIA, nccl-tests#212).
        intra_bandwidth=370 * GB,
        # alltoall_perf on 8 x H20 (NVSwitch, NVLink4; deepseek-ai/DeepEP#303): 3.1 us at 0 bytes,
        # 10.3-11.1 us at 128 B-4 KiB: (10.6 - 3.1) / 7 peers ~ 1 us per peer.
        intra_latency=1e-6,
        # The same table's 0-byte alltoall: 3.1 us per collective call.
        collective_overhead=3e-6,
        # ANCHORS (H100): torch permute 1.41 TB/s with read + write counted, i.e. 0.7 TB/s of output.
        copy_bandwidth=0.7e12,
        # ANCHORS (H200, the H100's compute die): the torch loop's expert matmuls at 437 TFLOP/s
        # (56% of the 786 TFLOP/s measured ceiling; spec 989 TFLOP/s dense bf16).
        flops=437e12,
    ),
}


def preset(name: str) -> ClusterSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown cluster preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def emulated_spec(nodes: int, gpus_per_node: int, rate_mbit: float) -> ClusterSpec:
    """Nominal description of an emulated cluster (tbf uplinks, loopback, gloo on shared CPUs).

    Only the uplink rate is known; the other figures are rough starting points that
    :func:`fit_all2all` replaces with fitted ones.
    """
    return ClusterSpec(
        name=f"emulated {nodes}x{gpus_per_node} @ {rate_mbit:g} Mbit/s",
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        inter_bandwidth=rate_mbit * 1e6 / 8,
        inter_latency=200e-6,
        intra_bandwidth=1 * GB,
        intra_latency=100e-6,
        collective_overhead=1e-3,
        copy_bandwidth=2 * GB,
        flops=10e9,
        overlap_tiers=False,
    )


# ---- All2All -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hop:
    """One collective: peers and bytes per tier (uplink bytes are per node, intra per rank)."""

    inter_peers: int
    intra_peers: int
    inter_bytes: float
    intra_bytes: float


def plan_hops(
    kind: str, nodes: int, gpus: int, size: float, count_exchange: str = "per_hop", counts: bool = True
) -> tuple[list[Hop], float]:
    """Collectives and local copy bytes of one dispatch of ``size`` bytes/rank; ``counts=False``
    leaves the count exchange out (a combine, or a backward, reuses the dispatch's splits)."""
    n, g = nodes, gpus
    if kind not in DISPATCH_KINDS:
        raise ValueError(f"dispatch kind {kind!r} unknown; allowed: {', '.join(DISPATCH_KINDS)}")
    if count_exchange not in COUNT_EXCHANGES:
        raise ValueError(f"count_exchange {count_exchange!r} unknown; allowed: {', '.join(COUNT_EXCHANGES)}")
    if n * g == 1:
        return [], size  # one EP rank: a local copy, no collective
    flat = ((n - 1) * g, g - 1, g * size * (n - 1) / n, size * (g - 1) / (n * g))
    if kind == "flat" or n == 1 or g == 1:  # a hop over a one-rank group is left out: flat
        hops = [flat]
    else:
        hops = [(n - 1, 0, g * size * (n - 1) / n, 0.0), (0, g - 1, 0.0, size * (g - 1) / g)]
    plan = []
    if counts and (count_exchange == "per_call" or len(hops) == 1):
        plan.append(Hop(flat[0], flat[1], 0.0, 0.0))  # one count call over the EP group
    elif counts:
        plan.append(Hop(hops[0][0], hops[0][1], 0.0, 0.0))  # hop 1's count call; hop 2's overlaps hop 1
    for inter_peers, intra_peers, inter_bytes, intra_bytes in hops:
        plan.append(Hop(inter_peers, intra_peers, inter_bytes, intra_bytes))
    return plan, size * len(hops)  # a regroup copy after every hop


def _hop_time(spec: ClusterSpec, hop: Hop) -> float:
    inter = hop.inter_peers * spec.inter_latency + hop.inter_bytes / spec.inter_bandwidth
    intra = hop.intra_peers * spec.intra_latency + hop.intra_bytes / spec.intra_bandwidth
    return spec.collective_overhead + (max(inter, intra) if spec.overlap_tiers else inter + intra)


def all2all_time(spec: ClusterSpec, kind: str, size: float, counts: bool = True) -> float:
    """Seconds for one dispatch of ``size`` bytes per rank over the whole cluster (``counts=False``:
    a combine or a backward, which reuse the dispatch's splits)."""
    hops, copy_bytes = plan_hops(kind, spec.nodes, spec.gpus_per_node, size, spec.count_exchange, counts)
    return sum(_hop_time(spec, hop) for hop in hops) + copy_bytes / spec.copy_bandwidth


# ---- one MoE layer step -------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEWorkload:
    """One MoE layer per GPU: tokens, sizes, routing, and the payload's element size."""

    tokens_per_gpu: int = 8192
    d_model: int = 1024
    d_ff: int = 4096
    experts_per_gpu: int = 1
    k: int = 1
    capacity_factor: float = 1.0
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        for name in ("tokens_per_gpu", "d_model", "d_ff", "experts_per_gpu", "k", "bytes_per_element"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEWorkload.{name} must be a positive int, got {value!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoEWorkload.capacity_factor must be > 0, got {self.capacity_factor!r}")

    def rows(self, num_experts: int) -> int:
        """Rows a rank sends: a capacity-padded buffer, ``ceil(cf * T * k / E)`` per expert."""
        return math.ceil(self.capacity_factor * self.tokens_per_gpu * self.k / num_experts) * num_experts


def layer_step(
    spec: ClusterSpec, workload: MoEWorkload, kind: str, dispatch: str | None = None
) -> dict[str, float]:
    """Seconds per forward+backward of one layer on every GPU, by term, and ``total``.

    switch = top-1 router over all E experts + flat dispatch; smile = bi-level router over N
    nodes and G*e experts per node + hierarchical dispatch (``dispatch`` overrides the pairing).
    Four All2Alls per step (dispatch and combine, forward and backward), counts exchanged once;
    matmuls cost 3x their forward FLOPs; nothing overlaps.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind {kind!r} unknown; allowed: {', '.join(LAYER_KINDS)}")
    w = workload
    experts = w.experts_per_gpu * spec.world
    rows = w.rows(experts)
    size = rows * w.d_model * w.bytes_per_element
    router_outputs = experts if kind == "switch" else spec.nodes + spec.gpus_per_node * w.experts_per_gpu
    dispatch = dispatch or ("flat" if kind == "switch" else "hierarchical")
    terms = {
        "router": 3 * 2 * w.tokens_per_gpu * w.d_model * router_outputs / spec.flops,
        "experts": 3 * 2 * 2 * rows * w.d_model * w.d_ff / spec.flops,
        "permute": 4 * size / spec.copy_bandwidth,
        "all2all": all2all_time(spec, dispatch, size) + 3 * all2all_time(spec, dispatch, size, counts=False),
    }
    terms["total"] = sum(terms.values())
    return terms


def calibrate_flops(spec: ClusterSpec, workload: MoEWorkload, kind: str, seconds: float) -> ClusterSpec:
    """``spec`` with the FLOP/s that makes ``layer_step(kind)`` take the measured ``seconds``.

    Communication and copies come from ``spec`` (e.g. fitted to All2All measurements); the one
    free parameter is the matmul rate, so predicting the other layer kinds is a real check.
    """
    terms = layer_step(spec, workload, kind)
    matmul_seconds = terms["router"] + terms["experts"]
    rest = terms["total"] - matmul_seconds
    if not seconds > rest:
        raise ValueError(
            f"measured {seconds:.4g}s per {kind} step is not above the model's communication and copies "
            f"({rest:.4g}s): the All2All fit over-predicts this layer"
        )
    return replace(spec, flops=spec.flops * matmul_seconds / (seconds - rest))


def projection(
    spec: ClusterSpec, workload: MoEWorkload, node_counts: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
) -> list[dict[str, float]]:
    """SMILE vs Switch per node count: All2All times, step times and the speedup."""
    rows = []
    for n in node_counts:
        s = spec.with_nodes(n)
        size = (
            workload.rows(workload.experts_per_gpu * s.world) * workload.d_model * workload.bytes_per_element
        )
        switch, smile = layer_step(s, workload, "switch"), layer_step(s, workload, "smile")
        rows.append(
            {
                "nodes": n,
                "gpus": s.world,
                "bytes_per_rank": size,
                "flat_ms": 1e3 * all2all_time(s, "flat", size),
                "hierarchical_ms": 1e3 * all2all_time(s, "hierarchical", size),
                "switch_step_ms": 1e3 * switch["total"],
                "smile_step_ms": 1e3 * smile["total"],
                "speedup": switch["total"] / smile["total"],
            }
        )
    return rows


def crossover_nodes(spec: ClusterSpec, size: float, max_nodes: int = 4096) -> int | None:
    """Smallest node count (>= 2) where hierarchical dispatch of ``size`` bytes/rank beats flat."""
    for n in range(2, max_nodes + 1):
        s = spec.with_nodes(n)
        if all2all_time(s, "hierarchical", size) < all2all_time(s, "flat", size):
            return n
    return None


# ---- a whole model: the paper's setting ---------------------------------------------------------
@dataclass(frozen=True)
class MoEModel:
    """One training step of a model on every GPU: its MoE layers and the dense FLOPs around them.

    Why: the paper's 2.5x is end-to-end pretraining throughput. Attention, the dense FFNs and the
    logits cost SMILE and Switch the same, so they dilute whatever the MoE layers gain.
    """

    name: str
    moe_layers: tuple[tuple[MoEWorkload, int], ...]  # (per-GPU workload, layers of that workload)
    dense_flops: float  # forward FLOPs per GPU per step outside the MoE layers

    def __post_init__(self) -> None:
        if not self.moe_layers or any(count < 1 for _, count in self.moe_layers):
            raise ValueError(f"MoEModel.moe_layers needs at least one layer, got {self.moe_layers!r}")
        if not self.dense_flops >= 0:
            raise ValueError(f"MoEModel.dense_flops must be >= 0, got {self.dense_flops!r}")


def sparse_blocks(num_layers: int, every: int) -> int:
    """MoE blocks of a stack: block i is sparse when ``every == 1`` or ``i % every == 1``.

    The rule of transformers' SwitchTransformers (``i % sparse_step == 1``) and of ``smile.hf.moefy``.
    """
    return sum(1 for i in range(num_layers) if every == 1 or i % every == 1)


def encoder_decoder_moe(
    name: str,
    *,
    d_model: int,
    d_ff: int,
    d_kv: int,
    num_heads: int,
    num_layers: int,
    num_decoder_layers: int,
    vocab_size: int,
    every: int,
    experts_per_gpu: int,
    batch_per_gpu: int,
    inputs_length: int,
    targets_length: int,
    capacity_factor: float,
    bytes_per_element: int = 2,
) -> MoEModel:
    """A T5-style encoder-decoder with an MoE in every ``every``-th FFN, per GPU and step.

    Dense forward FLOPs (2 per multiply-add): attention projections and scores of every block
    (the decoder's self- and cross-attention, K/V of the cross-attention over encoder tokens),
    the FFNs that stay dense, and the output logits. Layer norms, softmax and embeddings are left out.
    """
    inner = num_heads * d_kv
    enc, dec = batch_per_gpu * inputs_length, batch_per_gpu * targets_length
    enc_moe, dec_moe = sparse_blocks(num_layers, every), sparse_blocks(num_decoder_layers, every)
    macs = enc * num_layers * (4 * d_model * inner + 2 * inputs_length * inner)
    macs += dec * num_decoder_layers * (4 * d_model * inner + 2 * targets_length * inner)  # self
    macs += num_decoder_layers * (dec * (2 * d_model * inner + 2 * inputs_length * inner)  # cross
                                  + enc * 2 * d_model * inner)  # fmt: skip
    macs += (enc * (num_layers - enc_moe) + dec * (num_decoder_layers - dec_moe)) * 2 * d_model * d_ff
    macs += dec * d_model * vocab_size
    layers = []
    for tokens, count in ((enc, enc_moe), (dec, dec_moe)):
        if count:
            workload = MoEWorkload(
                tokens, d_model, d_ff, experts_per_gpu, 1, capacity_factor, bytes_per_element
            )
            layers.append((workload, count))
    return MoEModel(name, tuple(layers), 2.0 * macs)


def model_step(spec: ClusterSpec, model: MoEModel, kind: str) -> dict[str, float]:
    """Seconds per training step on every GPU: ``moe`` (``layer_step`` of every MoE layer), its
    ``all2all`` part, ``dense`` (3x the forward FLOPs at ``spec.flops``) and ``total``."""
    steps = [(layer_step(spec, w, kind), count) for w, count in model.moe_layers]
    moe = sum(count * terms["total"] for terms, count in steps)
    all2all = sum(count * terms["all2all"] for terms, count in steps)
    dense = 3 * model.dense_flops / spec.flops
    return {"moe": moe, "all2all": all2all, "dense": dense, "total": moe + dense}


def compare_model(spec: ClusterSpec, model: MoEModel) -> dict[str, float]:
    """SMILE vs Switch on ``model``: step times (ms), the speedup of the MoE layers alone and of the
    whole step, and ``step_bound``: Switch's step over Switch's step without any All2All, the most
    any dispatch scheme could gain end to end under this model."""
    switch, smile = model_step(spec, model, "switch"), model_step(spec, model, "smile")
    return {
        "switch_moe_ms": 1e3 * switch["moe"],
        "smile_moe_ms": 1e3 * smile["moe"],
        "switch_all2all_ms": 1e3 * switch["all2all"],
        "smile_all2all_ms": 1e3 * smile["all2all"],
        "dense_ms": 1e3 * switch["dense"],
        "switch_step_ms": 1e3 * switch["total"],
        "smile_step_ms": 1e3 * smile["total"],
        "moe_speedup": switch["moe"] / smile["moe"],
        "step_speedup": switch["total"] / smile["total"],
        "step_bound": switch["total"] / (switch["total"] - switch["all2all"]),
    }


SENSITIVITY_PARAMS = ("inter_bandwidth", "inter_latency", "intra_bandwidth", "intra_latency",
                      "collective_overhead", "copy_bandwidth", "flops")  # fmt: skip


def sensitivity(spec: ClusterSpec, model: MoEModel, factor: float = 2.0) -> dict[str, tuple[float, float]]:
    """End-to-end SMILE/Switch speedup with each preset parameter divided and multiplied by ``factor``.

    Why: the presets mix measured and assumed figures; this says which of them the verdict hangs on.
    """
    if not factor > 1:
        raise ValueError(f"sensitivity factor must be > 1, got {factor!r}")
    return {
        name: tuple(
            compare_model(replace(spec, **{name: getattr(spec, name) * f}), model)["step_speedup"]
            for f in (1 / factor, factor)
        )
        for name in SENSITIVITY_PARAMS
    }


# What the projection of a model (``compare_model``) assumes and leaves out; RESULTS.md lists it.
PROJECTION_ASSUMPTIONS: tuple[str, ...] = (
    "Nothing overlaps but the two tiers of one collective (the slower one counts): no All2All with "
    "expert compute (SMILE's pipelined layer does that), no layer with the next.",
    "Routing is perfectly balanced and both layers send capacity-padded buffers of "
    "ceil(cf * T / E) rows per expert; smile's layer sends only kept rows, a real router is imbalanced "
    "(the busiest expert sets the step).",
    "Bandwidths are one per-node figure at every message size: no congestion, incast, adaptive "
    "routing or NCCL protocol switch (LL / LL128 / Simple); latencies are per message and add up.",
    "The dense part (attention, dense FFNs, logits) runs at the experts' FLOP/s; layer norms, "
    "softmax, embeddings, the loss, the optimizer step and data loading are left out.",
    "No data-parallel traffic: the gradient reduce-scatter / all-gather of the replicated dense "
    "weights (ZeRO-1) costs both variants the same and would dilute the speedup further.",
    "Same convergence per step (the paper's claim): only step time is compared, not time to a loss.",
)


# ---- fitting to measurements --------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """A measured dispatch: kind, layout, bytes per rank, seconds (slowest rank, median)."""

    kind: str
    nodes: int
    gpus_per_node: int
    size: float
    seconds: float


FIT_PARAMS = ("collective_overhead", "inter_latency", "intra_latency", "1/inter_bandwidth",
              "1/intra_bandwidth", "1/copy_bandwidth")  # fmt: skip


def features(m: Measurement, count_exchange: str = "per_hop") -> np.ndarray:
    """Coefficients of FIT_PARAMS in the time of ``m`` (tiers added, as with overlap_tiers=False)."""
    hops, copy_bytes = plan_hops(m.kind, m.nodes, m.gpus_per_node, m.size, count_exchange)
    row = np.array([0, 0, 0, 0, 0, copy_bytes], dtype=float)
    for hop in hops:
        row += [1, hop.inter_peers, hop.intra_peers, hop.inter_bytes, hop.intra_bytes, 0]
    return row


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set): argmin |a x - b|, x >= 0."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iters):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max(initial=0) <= 1e-12 * max(1.0, np.abs(grad).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            step = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + step * (z - x)
            passive &= x > 1e-15
    return x


@dataclass(frozen=True)
class FitResult:
    """The fitted cluster and how well it predicts: relative errors (pred - meas) / meas."""

    spec: ClusterSpec
    measurements: list[Measurement]
    errors: list[float]  # in-sample
    holdout_errors: list[float]  # each size predicted by a fit that did not see that size

    def worst(self, kind: str | None = None, holdout: bool = False) -> float:
        errs = self.holdout_errors if holdout else self.errors
        picked = [abs(e) for e, m in zip(errs, self.measurements) if kind in (None, m.kind)]
        return max(picked) if picked else math.nan

    def sizes_within(self, kind: str, tolerance: float = 0.25, holdout: bool = False) -> list[float]:
        """Sizes at which every measurement of ``kind`` (all layouts) is predicted within ``tolerance``."""
        errs = self.holdout_errors if holdout else self.errors
        points = [(m.size, abs(e)) for e, m in zip(errs, self.measurements) if m.kind == kind]
        return sorted({s for s, _ in points} - {s for s, e in points if not e <= tolerance})


def _solve(measurements: Sequence[Measurement], inter_cap: float | None, count_exchange: str) -> np.ndarray:
    a = np.stack([features(m, count_exchange) for m in measurements])
    t = np.array([m.seconds for m in measurements])
    floor = np.zeros(len(FIT_PARAMS))
    if inter_cap is not None:  # 1/inter_bandwidth = 1/cap + q with q >= 0
        floor[FIT_PARAMS.index("1/inter_bandwidth")] = 1.0 / inter_cap
    a, b = a / t[:, None], 1.0 - (a @ floor) / t  # relative error: every point weighs the same
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    return floor + nnls(a / scale, b) / scale


def _to_spec(base: ClusterSpec, p: np.ndarray) -> ClusterSpec:
    def inv(v: float) -> float:
        return math.inf if v <= 0 else float(1.0 / v)

    return replace(
        base,
        name=f"{base.name} (fitted)",
        collective_overhead=float(p[0]),
        inter_latency=float(p[1]),
        intra_latency=float(p[2]),
        inter_bandwidth=inv(p[3]),
        intra_bandwidth=inv(p[4]),
        copy_bandwidth=inv(p[5]),
        overlap_tiers=False,
    )


def _relative_error(spec: ClusterSpec, m: Measurement) -> float:
    predicted = all2all_time(replace(spec, nodes=m.nodes, gpus_per_node=m.gpus_per_node), m.kind, m.size)
    return predicted / m.seconds - 1


def fit_all2all(
    measurements: Sequence[Measurement], base: ClusterSpec, cap_inter_bandwidth: bool = True
) -> FitResult:
    """Fit latencies, overheads and inverse bandwidths (non-negative, relative least squares).

    ``base`` supplies what All2All timings cannot (name, FLOP/s, the ``count_exchange`` the
    measurements were taken with) and, with
    ``cap_inter_bandwidth``, the uplink rate the fit may not exceed (a shaped link cannot go
    faster than its shaper; without the cap, collinear byte terms can trade against each other).
    Hold-out errors refit without each message size in turn and predict it: the honest measure
    of the model's form.
    """
    measurements = list(measurements)
    if len(measurements) < 2:
        raise ValueError(f"fit_all2all needs at least 2 measurements, got {len(measurements)}")
    for m in measurements:
        if m.kind not in DISPATCH_KINDS:
            raise ValueError(f"Measurement.kind {m.kind!r} unknown; allowed: {', '.join(DISPATCH_KINDS)}")
        if not (m.seconds > 0 and m.size > 0):
            raise ValueError(f"Measurement needs seconds > 0 and size > 0, got {m}")
    cap = base.inter_bandwidth if cap_inter_bandwidth else None
    spec = _to_spec(base, _solve(measurements, cap, base.count_exchange))
    errors = [_relative_error(spec, m) for m in measurements]
    holdout = []
    for m in measurements:
        rest = [o for o in measurements if o.size != m.size]
        fitted = _to_spec(base, _solve(rest, cap, base.count_exchange)) if len(rest) >= 2 else None
        holdout.append(_relative_error(fitted, m) if fitted else math.nan)
    return FitResult(spec, measurements, errors, holdout)


# ---- plots --------------------------------------------------------------------------------------
def plot_fit(fit: FitResult, path: str) -> None:
    """Measured (markers) vs fitted model (lines) All2All time against message size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    layouts = sorted({(m.nodes, m.gpus_per_node) for m in fit.measurements})
    for (n, g), color in zip(layouts, ("C0", "C1", "C2", "C3")):
        for kind, marker, style in (("flat", "o", "-"), ("hierarchical", "s", "--")):
            pts = sorted(
                (m.size, m.seconds)
                for m in fit.measurements
                if (m.nodes, m.gpus_per_node, m.kind) == (n, g, kind)
            )
            if not pts:
                continue
            sizes = np.geomspace(pts[0][0], pts[-1][0], 50)
            s = replace(fit.spec, nodes=n, gpus_per_node=g)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker, color=color, mfc="none")
            ax.plot(sizes, [all2all_time(s, kind, x) * 1e3 for x in sizes], style, color=color,
                    label=f"{n}x{g} {kind}")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="bytes per rank", ylabel="ms per dispatch",
           title="All2All on the emulated cluster: measured (markers) vs model (lines)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_projection(curves: dict[str, list[dict[str, float]]], path: str, claim: float = 2.5) -> None:
    """SMILE / Switch layer speedup against node count, one curve per cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in curves.items():
        ax.plot([r["nodes"] for r in rows], [r["speedup"] for r in rows], "o-", label=label)
    ax.axhline(claim, color="gray", ls=":", label=f"paper's claim ({claim}x, end to end)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="nodes", ylabel="SMILE / Switch MoE-layer throughput",
           title="Projected MoE layer speedup (alpha-beta model)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
