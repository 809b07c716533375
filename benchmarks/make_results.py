"""Regenerate benchmarks/RESULTS.md: emulated-cluster measurements, the model fit, projections.

    python benchmarks/make_results.py          # refit and rewrite from benchmarks/results/*.json
    python benchmarks/make_results.py --run    # first measure again on the emulated cluster (root)
    python benchmarks/make_results.py --run --only sweep   # measure only the node-count sweep

``--run`` builds the emulated cluster of ``RUNS`` (network namespaces, tbf-shaped uplinks) once
per run, executes the benchmark under torchrun on every node, and tears it down. Every number in
RESULTS.md is computed here from the JSON files; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from smile.data.objectives import compute_input_and_target_lengths
from smile.moe.config import AUTO_CHUNKS
from smile.sim import cost_model as cm
from smile.sim.cluster import ClusterConfig, EmulatedCluster, raise_on_sigterm

HERE = Path(__file__).resolve().parent
RATE_MBIT = 200.0
MTU = ClusterConfig().mtu  # jumbo frames, as on the paper's cluster (AWS EFA/ENA links run at MTU 9001)
LAYER_CONFIG = (
    "--tokens 2048 --d-model 512 --d-ff 512 --experts-per-rank 1 --capacity-factor 1.0 --iters 10 --warmup 2"
)
# Like with like: each SMILE variant beside the Switch variant with the same levers (``switch``
# alone is the flat one-hop baseline; ``smile`` the bilevel router on the two hops), and DeepSpeed-MoE.
LAYER_VARIANTS = ",".join(
    [
        "switch+flat",
        "switch+hierarchical",
        "smile",
        "smile+flat",
        "deepspeed",
        "switch+dropless",
        "smile+dropless",
        "switch+pipelined",
        "smile+pipelined",
        "switch+fp8",
        "smile+fp8",
        "switch+p2p",
        "smile+p2p",
        "switch+pipelined+fp8",
        "smile+pipelined+fp8",
        "smile+flat+pipelined+fp8",
    ]
)
# name -> (cluster, benchmark argv): 200 Mbit/s per node; the MoE layers at d_model 512, FFN 512,
# one expert per rank, 2048 tokens per rank, top-1, capacity factor 1.0 on 4 nodes x 2 ranks, the
# pipelined variants at the layer's default depth (chunks="auto").
RUNS: dict[str, tuple[ClusterConfig, list[str]]] = {
    "all2all_emulated_4x2": (
        ClusterConfig(4, 2, RATE_MBIT, mtu=MTU),
        ["all2all_bench.py", "--budget-s", "20"],
    ),
    "all2all_emulated_2x4": (
        ClusterConfig(2, 4, RATE_MBIT, mtu=MTU),
        ["all2all_bench.py", "--budget-s", "12"],
    ),
    "pretrain_emulated_4x2": (
        ClusterConfig(4, 2, RATE_MBIT, mtu=MTU),
        ["pretrain_bench.py", "--steps", "10", "--warmup", "3", "--repeats", "2"],
    ),
    "moe_layer_emulated_4x2": (
        ClusterConfig(4, 2, RATE_MBIT, mtu=MTU),
        [
            "moe_layer_bench.py",
            *LAYER_CONFIG.split(),
            "--chunks",
            str(AUTO_CHUNKS),
            "--variants",
            LAYER_VARIANTS,
        ],
    ),
}
# The node-count sweep (``--only sweep``): 2, 4, 8 nodes x 2 ranks, small messages where the fixed
# cost of each message and collective dominates, as it does at scale; all2all_bench at three sizes and
# a small MoE layer (512 tokens x d_model 128 per rank = 256 KiB dispatched), chunks 1, capacity
# factor 1.0, the three layers that share every lever but the router or the dispatcher.
SWEEP = "sweep"
SWEEP_NODES = (2, 4, 8)
SWEEP_PROCS = 2
SWEEP_REPEATS = 5  # passes over the node counts, alternating their order; medians over the passes
SWEEP_SIZES = "16K,64K,256K"
SWEEP_A2A = ["--sizes", SWEEP_SIZES, "--iters", "15", "--min-iters", "7", "--budget-s", "6"]
SWEEP_LAYER = (
    "--tokens 512 --d-model 128 --d-ff 256 --experts-per-rank 1 --capacity-factor 1.0 --chunks 1 "
    "--iters 15 --warmup 3 --variants switch+flat,switch+hierarchical,smile"
).split()
# The two hops on one machine (``--only unshaped``): the layer run's config on 2 nodes x 2 ranks
# simulated by process groups over unshaped loopback, where no hop saves anything, so every cost of
# the second hop shows (the target: SMILE within 5% of switch+flat).
UNSHAPED = "unshaped"
UNSHAPED_ARGV = [
    *LAYER_CONFIG.replace("--iters 10", "--iters 30").replace("--warmup 2", "--warmup 3").split(),
    "--nodes", "2", "--gpus-per-node", "2",
    "--variants", "switch+flat,switch+hierarchical,smile,smile+flat,switch+p2p,smile+p2p",
]  # fmt: skip
# The link-utilisation runs (``--only links``): benchmarks/link_bench.py builds its own emulated
# cluster (TCP streams, then every All2All variant with both transports at 1, 4 and 16 MiB per rank).
LINKS = "links"
LINK_LAYOUTS = ((2, 2), (4, 2))
A2A_VARIANTS = ("flat", "hierarchical", "flat p2p", "hierarchical p2p")  # link_bench's dispatch rows
PAPER_CLAIM = 2.5
NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The paper's setting: Switch-Base-128 on 16 nodes x 8 GPUs, as the project's cluster job runs it.
PAPER_CONFIG = HERE.parent / "configs" / "switch_base_128e_16x8.yaml"
PAPER_NODES, PAPER_GPUS_PER_NODE = 16, 8


def run_sweep(results: Path) -> None:
    """The node-count sweep: per pass and node count one emulated cluster running the All2All and
    layer benchmarks; passes alternate the order of the node counts so load drift hits all alike."""
    for rep in range(SWEEP_REPEATS):
        for n in SWEEP_NODES if rep % 2 == 0 else SWEEP_NODES[::-1]:
            name = f"{n}x{SWEEP_PROCS}_r{rep}"
            runs = [
                ("all2all_bench.py", SWEEP_A2A, results / f"node_sweep_all2all_{name}.json"),
                ("moe_layer_bench.py", SWEEP_LAYER, results / f"node_sweep_layer_{name}.json"),
            ]
            print(f"== node sweep {name} at {RATE_MBIT:g} Mbit/s, MTU {MTU}", flush=True)
            with EmulatedCluster(ClusterConfig(n, SWEEP_PROCS, RATE_MBIT, mtu=MTU)) as cluster:
                for script, argv, out in runs:
                    code = cluster.run([str(HERE / script), *argv, "--out", str(out)], timeout=1800)
                    if code:
                        raise SystemExit(f"node sweep {name} {script} failed with exit code {code}")


def link_path(results: Path, nodes: int, procs: int) -> Path:
    return results / f"link_emulated_{nodes}x{procs}.json"


def run_links(results: Path) -> None:
    """link_bench.py on each of LINK_LAYOUTS, each file holding that one run."""
    for nodes, procs in LINK_LAYOUTS:
        out = link_path(results, nodes, procs)
        out.unlink(missing_ok=True)  # link_bench appends runs to its file
        argv = ["--nodes", str(nodes), "--procs-per-node", str(procs), "--rate-mbit", f"{RATE_MBIT:g}"]
        argv += ["--mtu", str(MTU), "--streams", "1,4", "--label", "make_results", "--out", str(out)]
        print(f"== link utilisation {nodes}x{procs} at {RATE_MBIT:g} Mbit/s, MTU {MTU}", flush=True)
        code = subprocess.run([sys.executable, str(HERE / "link_bench.py"), *argv]).returncode
        if code:
            raise SystemExit(f"link utilisation {nodes}x{procs} failed with exit code {code}")


def run_unshaped(results: Path) -> None:
    print("== MoE layers, 2 nodes x 2 ranks, unshaped loopback", flush=True)
    out = results / f"moe_layer_{UNSHAPED}_2x2.json"
    cmd = [sys.executable, str(HERE / "moe_layer_bench.py"), *UNSHAPED_ARGV, "--out", str(out)]
    code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode  # one thread a rank
    if code:
        raise SystemExit(f"the unshaped layer run failed with exit code {code}")


def run_all(results: Path, only: list[str] | None = None) -> None:
    """Measure the entries of RUNS (all, or ``only``), each on a freshly built emulated cluster;
    the node-count sweep too unless ``only`` leaves it out."""
    unknown = set(only or []) - set(RUNS) - {SWEEP, LINKS, UNSHAPED}
    if unknown:
        allowed = ", ".join([*RUNS, SWEEP, LINKS, UNSHAPED])
        raise SystemExit(f"--only: unknown {sorted(unknown)}; allowed: {allowed}")
    raise_on_sigterm()
    if not only or SWEEP in only:
        run_sweep(results)
    if not only or LINKS in only:
        run_links(results)
    if not only or UNSHAPED in only:
        run_unshaped(results)
    for name, (config, argv) in RUNS.items():
        if only and name not in only:
            continue
        out = results / f"{name}.json"
        out_flag = "--json" if argv[0] == "pretrain_bench.py" else "--out"
        cmd = [str(HERE / argv[0]), *argv[1:], out_flag, str(out)]
        if argv[0] == "all2all_bench.py":
            cmd += ["--plot", str(results / f"{name}.png")]
        print(
            f"== {name}: {config.nodes} nodes x {config.procs_per_node} at {config.rate_mbit:g} Mbit/s",
            flush=True,
        )
        with EmulatedCluster(config) as cluster:
            code = cluster.run(cmd, timeout=3600)
        if code:
            raise SystemExit(f"{name} failed with exit code {code}")


def load(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def count_exchange_of(reports: list[dict]) -> str:
    """The exchange the reports measured (``config.count_exchange``; runs from before the field
    existed used one count exchange per hop), so that the model is fitted to what ran."""
    modes = {r["config"].get("count_exchange", "per_hop") for r in reports}
    if len(modes) != 1:
        raise SystemExit(f"the reports mix count exchanges {sorted(modes)}: measure them again together")
    return modes.pop()


def measurements(reports: list[dict]) -> list[cm.Measurement]:
    out = []
    for rep in reports:
        c = rep["config"]
        for row in rep["results"]:
            for kind in cm.DISPATCH_KINDS:
                out.append(
                    cm.Measurement(
                        kind, c["nodes"], c["gpus_per_node"], row["size_bytes"], row[kind]["median_s"]
                    )
                )
    return out


def _mb(b: float) -> str:
    return f"{b / 2**20:g} MiB" if b >= 2**20 else f"{b / 2**10:g} KiB"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.0%}"


def _mtu(env: dict) -> str:
    """The emulated links' MTU recorded in a report (reports without one ran at the default, 1500)."""
    found = re.search(r"MTU (\d+)", env.get("network", ""))
    return found.group(1) if found else "1500"


def _load(env: dict) -> str:
    start = env.get("loadavg_start", [math.nan])[0]
    return f"{start:.1f} at start, {env['loadavg'][0]:.1f} at end"


def all2all_section(reports: list[dict], fit: cm.FitResult) -> list[str]:
    errs = {
        (m.kind, m.nodes, m.gpus_per_node, m.size): (e, h)
        for m, e, h in zip(fit.measurements, fit.errors, fit.holdout_errors)
    }
    lines = []
    for rep in reports:
        c, env = rep["config"], rep["environment"]
        n, g = c["nodes"], c["gpus_per_node"]
        spec = cm.ClusterSpec.from_dict({**fit.spec.to_dict(), "nodes": n, "gpus_per_node": g})
        lines += [
            f"### {n} nodes x {g} ranks, {RATE_MBIT:g} Mbit/s per node, MTU {_mtu(env)} "
            f"({env['date_utc']}, load average {_load(env)})",
            "",
            "Link bound: the bytes leaving one node (G * m * (N-1)/N) at the tbf rate. Model: the fitted "
            "alpha-beta model; error = model / measured - 1; hold-out = the same from a fit that did not "
            "see this size.",
            "",
            "| bytes/rank | flat ms | hier ms | hier/flat | link bound ms | flat % of bound | model flat ms "
            "(err, hold-out) | model hier ms (err, hold-out) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rep["results"]:
            size = row["size_bytes"]
            f, h = row["flat"]["median_s"], row["hierarchical"]["median_s"]
            bound = g * size * (n - 1) / n / (RATE_MBIT * 1e6 / 8)
            cells = []
            for kind in cm.DISPATCH_KINDS:
                e, ho = errs[(kind, n, g, size)]
                cells.append(f"{1e3 * cm.all2all_time(spec, kind, size):.1f} ({_pct(e)}, {_pct(ho)})")
            lines.append(
                f"| {_mb(size)} | {1e3 * f:.1f} | {1e3 * h:.1f} | {h / f:.2f} | {1e3 * bound:.1f} | "
                f"{bound / f:.0%} | {cells[0]} | {cells[1]} |"
            )
        lines.append("")
        lines.append(f"![All2All {n}x{g}](results/all2all_emulated_{n}x{g}.png)")
        lines.append("")
    return lines


def fit_section(fit: cm.FitResult) -> list[str]:
    s = fit.spec
    lines = [
        "Fitted parameters (effective costs of gloo on this loaded 2-core machine, not hardware "
        "properties; the uplink bandwidth is capped at the tbf rate):",
        "",
        f"- collective overhead {1e3 * s.collective_overhead:.2f} ms per collective call",
        f"- inter-node latency {1e3 * s.inter_latency:.3f} ms per message, uplink "
        f"{s.inter_bandwidth / 1e6:.1f} MB/s per node (tbf rate {RATE_MBIT / 8:.1f} MB/s)",
        f"- intra-node latency {1e3 * s.intra_latency:.3f} ms per message, "
        f"{s.intra_bandwidth / 1e6:.1f} MB/s per rank "
        "(loopback TCP sharing 2 cores with every rank's compute and the other workloads)",
        f"- local regroup copy {s.copy_bandwidth / 1e6:.1f} MB/s",
        "",
        "| | worst error, all sizes | sizes within 25% (in-sample) | sizes within 25% (hold-out) |",
        "|---|---|---|---|",
    ]
    for kind in cm.DISPATCH_KINDS:
        within = fit.sizes_within(kind)
        held = fit.sizes_within(kind, holdout=True)
        lines.append(
            f"| {kind} | {fit.worst(kind):.0%} | {len(within)}: {', '.join(_mb(x) for x in within)} | "
            f"{len(held)}: {', '.join(_mb(x) for x in held)} |"
        )
    ok = all(len(fit.sizes_within(k, holdout=True)) >= 3 for k in cm.DISPATCH_KINDS)
    off = [
        f"{m.nodes}x{m.gpus_per_node} {m.kind} {_mb(m.size)} ({_pct(e)})"
        for m, e in zip(fit.measurements, fit.errors)
        if abs(e) > 0.25
    ]
    lines += [
        "",
        f"**Within 25% at 3 or more message sizes for both flat and hierarchical (hold-out): "
        f"{'yes' if ok else 'NO'}.** In-sample points off by more than 25%: {'; '.join(off) or 'none'}.",
        "",
        "![fit](results/cost_model_fit.png)",
        "",
    ]
    return lines


def _layer_shape(c: dict) -> str:
    """A moe_layer_bench config's layer, as the sections describe it."""
    return (
        f"d_model {c['d_model']}, FFN {c['d_model']}->{c['d_ff']}->{c['d_model']}, "
        f"{c['experts_per_rank']} expert per rank, {c['tokens']} tokens per rank, top-1, "
        f"capacity factor {c['capacity_factor']}"
    )


def moe_section(rep: dict) -> list[str]:
    c, env, rows = rep["config"], rep["environment"], rep["results"]
    lines = [
        f"{c['nodes']} nodes x {c['gpus_per_node']} ranks = EP {c['world']}, {RATE_MBIT:g} Mbit/s per node, "
        f"MTU {_mtu(env)}, "
        f"{_layer_shape(c)}, fp32, forward + backward, "
        f"median of {c['iters']} interleaved iterations after {c['warmup']} warm-up "
        f"({env['date_utc']}, load average {_load(env)}).",
        "",
        "| layer | median ms/iter | min | max | tokens/s | dropped | busiest uplink MB | link-bound ms "
        "| link / step | machine CPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        drop = "-" if r["dropped"] is None else f"{r['dropped']:.1%}"
        link = (
            f"{r['uplink_mb']:.1f} | {r['link_bound_ms']:.0f} | {r['link_bound_ms'] / r['median_ms']:.0%}"
            if r.get("link_bound_ms") is not None
            else "- | - | -"
        )
        busy = f"{r['cpu_busy']:.0%}" if r.get("cpu_busy") is not None else "-"
        lines.append(
            f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {drop} | {link} | {busy} |"
        )
    lines += ["", *like_for_like(rows, rep["ratios"])]
    per_node = c["gpus_per_node"] * c["tokens"] * c["d_model"] * 4 * (c["nodes"] - 1) / c["nodes"]
    bound = 4 * per_node / (RATE_MBIT * 1e6 / 8)
    lines += [
        "",
        f"Link bound of the four All2Alls alone: {1e3 * bound:.0f} ms per iteration "
        f"({per_node / 1e6:.1f} MB leave each node per All2All at {RATE_MBIT / 8:g} MB/s); the table's "
        "uplink column is measured (the node's transmit counter, headers included, busiest node).",
        "Variants named smile+<lever>... add SMILE's levers one at a time: dropless (nothing dropped), "
        "flat (bilevel routing over the one-hop All2All), pipelined (chunked overlap, bit-identical "
        f"results, {c.get('chunks', '?')} chunks), bf16 / fp8 (lossy wire formats, gradients pass "
        "straight through), p2p (each hop as point-to-point pieces, bit-identical); switch+<lever>... "
        "the same levers on Switch. Every smile layer sends only kept rows, never capacity padding.",
    ]
    spread = [(r["max_ms"] - r["min_ms"]) / r["median_ms"] for r in rows.values()]
    lines.append(
        f"Noise: each variant's slowest and fastest iterations lie {min(spread):.0%} to {max(spread):.0%} "
        "of its median apart, so ratios within about 10% of 1 are not a measured difference."
    )
    if "deepspeed" in rows:
        lines += _verdicts(rows, rep["ratios"])
    lines.append("")
    return lines


def switch_twins(ratios: dict[str, float]) -> dict[str, str]:
    """SMILE variant -> the Switch variant with the same levers, from the benchmark's ratio keys
    ``"<smile> / <switch>"`` (its ``"<variant> / deepspeed"`` keys left out)."""
    return {a: b for a, b in (key.split(" / ") for key in ratios) if b != "deepspeed"}


def like_for_like(rows: dict[str, dict], ratios: dict[str, float]) -> list[str]:
    """Each SMILE variant beside the Switch variant with the same levers, and both beside DeepSpeed-MoE."""
    ds = rows["deepspeed"]["tokens_per_s"] if "deepspeed" in rows else None
    pairs = list(switch_twins(ratios).items())
    if not pairs:
        return []
    lines = [
        "Like with like: every SMILE variant against the Switch variant with the same levers (Switch on "
        "its flat All2All, SMILE on its two hops, unless the lever names the dispatcher), and each "
        "against DeepSpeed-MoE separately.",
        "",
        "| levers | SMILE variant | Switch variant | SMILE / Switch | SMILE / DeepSpeed "
        "| Switch / DeepSpeed |",
        "|---|---|---|---|---|---|",
    ]
    for smile, switch in pairs:
        levers = "+".join(smile.split("+")[1:]) or "(none)"
        a, b = rows[smile]["tokens_per_s"], rows[switch]["tokens_per_s"]
        vs_ds = f"{a / ds:.2f}x | {b / ds:.2f}x" if ds else "- | -"
        lines.append(f"| {levers} | {smile} | {switch} | **{a / b:.2f}x** | {vs_ds} |")
    if ds:
        lines += [
            "",
            "Every layer against DeepSpeed-MoE: "
            + ", ".join(f"{n} {r['tokens_per_s'] / ds:.2f}x" for n, r in rows.items() if n != "deepspeed")
            + ".",
        ]
    ratios = [rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"] for a, b in pairs]
    ahead = sum(r > 1.1 for r in ratios)
    behind = sum(r < 1 / 1.1 for r in ratios)
    lines += [
        "",
        f"SMILE / Switch under the same levers: {min(ratios):.2f}x to {max(ratios):.2f}x; ahead by more "
        f"than 10% in {ahead} of {len(ratios)} pairs, behind by more than 10% in {behind}.",
    ]
    return lines


def _verdicts(rows: dict[str, dict], ratios: dict[str, float] | None = None) -> list[str]:
    """SMILE against DeepSpeed-MoE: the paper's pairing, the best exact variant, the best overall;
    each beside Switch with the same levers where that ran (``ratios``' like-for-like pairs), so a
    lever's gain is not read as SMILE's."""
    ds = rows["deepspeed"]["tokens_per_s"]
    smile = {name: r["tokens_per_s"] / ds for name, r in rows.items() if name.startswith("smile")}
    twins = switch_twins(ratios or {})

    def beside_switch(name: str) -> str:
        twin = twins.get(name)
        if twin is None:
            return ""
        return f"; Switch with the same levers ({twin}): {rows[twin]['tokens_per_s'] / ds:.2f}x"

    lines = []
    if "smile+pipelined" in smile:
        ratio = smile["smile+pipelined"]
        verdict = "beats" if ratio > 1 else "does NOT beat"
        lines.append(
            f"On this run SMILE's layer as the library builds it (bilevel routing, the two-hop All2All, "
            f"chunks='auto') {verdict} DeepSpeed-MoE: **{ratio:.2f}x** (smile+pipelined"
            f"{beside_switch('smile+pipelined')})."
        )
    if "smile" in smile:
        verdict = "beats" if smile["smile"] > 1 else "does NOT beat"
        lines.append(
            f"Unpipelined (chunks=1), the two-hop layer {verdict} DeepSpeed-MoE ({smile['smile']:.2f}x"
            f"{beside_switch('smile')})."
        )
    exact = {n: v for n, v in smile.items() if "bf16" not in n and "fp8" not in n}
    for label, pool in (("exact-payload", exact), ("", smile)):
        if pool:
            name = max(pool, key=pool.get)
            target = "" if label else f", {'meets' if pool[name] >= 2 else 'short of'} the 2x target"
            kind = label or "overall"
            lines.append(
                f"Best {kind} SMILE variant: {name}, {pool[name]:.2f}x DeepSpeed-MoE{target}"
                f"{beside_switch(name)}."
            )
    return lines


def unshaped_section(rep: dict) -> list[str]:
    """The second hop's cost where it buys nothing: the layer on one machine, unshaped."""
    c, env, rows = rep["config"], rep["environment"], rep["results"]
    lines = [
        f"`python benchmarks/make_results.py --run --only {UNSHAPED}`: the layer run's config "
        f"({_layer_shape(c)}) on {c['nodes']} nodes x {c['gpus_per_node']} "
        "ranks simulated by process groups on one machine, over unshaped loopback: the inter-node hop "
        "is as cheap as the intra-node one, so the two-hop exchange can only cost more than the flat "
        f"one. Median of {c['iters']} interleaved iterations ({env['date_utc']}, load average "
        f"{_load(env)}). Rank CPU: the ranks' CPU time per step, summed (all their threads), which "
        "other jobs on the machine inflate less than the wall time. Reading the pairs: "
        "switch+hierarchical / switch+flat differ only in the exchange, smile+flat / switch+flat only "
        "in the router; the p2p pair makes no regroup copy (each block lands in place), so what the "
        "second hop still costs there is its transfers: at one expert per rank on 2 x 2 the two hops "
        "put 4/3 of flat's bytes through the host's TCP stack (each hop sends half of a rank's rows, "
        "flat three quarters) in twice as many calls.",
        "",
        "| layer | median ms | min | max | rank CPU ms | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} | "
            f"{r['rank_cpu_ms']:.0f} | {r['tokens_per_s']:.0f} |"
        )
    lines.append("")
    pairs = (("smile", "switch+flat"), ("switch+hierarchical", "switch+flat"), ("smile+p2p", "switch+p2p"))
    for smile, switch in pairs:
        if smile in rows and switch in rows:
            wall = rows[smile]["tokens_per_s"] / rows[switch]["tokens_per_s"]
            cpu = rows[switch]["rank_cpu_ms"] / rows[smile]["rank_cpu_ms"]
            lines.append(
                f"- {smile} / {switch}: tokens/s **{wall:.2f}x**, rank CPU per step {1 / cpu:.2f}x "
                f"({'within' if wall >= 0.95 else 'NOT within'} 5% of {switch})"
            )
    return [*lines, ""]


def link_section(runs: list[dict]) -> list[str]:
    """What share of the shaped rate the emulated links deliver: TCP streams and every All2All."""
    lines = [
        f"`python benchmarks/make_results.py --run --only {LINKS}` (root) runs `benchmarks/link_bench.py` "
        "on a freshly built emulated cluster per layout: TCP streams from one node to another (one way, "
        "then both ways at once), then each All2All as the MoE layer runs it (counts and regroups "
        "included), with the collective transport (one All2All call per hop) and `p2p` (each hop as "
        "point-to-point pieces). Share of shaped rate = the bytes leaving a node (G * m * (N-1)/N) at "
        "the tbf rate / the median time of 5 dispatches; for the two-hop dispatch the inter-node hop "
        "alone is given too. Waiting cores: how many cores' worth of the ranks' threads sat runnable "
        "without a CPU (well above 0: the row was held back by the host, not the link). Why the "
        "rows differ: docs/benchmarks.md, \"Link utilisation of the emulated cluster\".",
        "",
    ]
    for run in runs:
        c, env = run["config"], run["environment"]
        lines += [
            f"**{c['nodes']} nodes x {c['procs_per_node']} ranks**, {c['rate_mbit']:g} Mbit/s, "
            f"MTU {c['mtu']} ({env['date_utc']}, load average {env['loadavg_start'][0]:.1f} at start, "
            f"{env['loadavg'][0]:.1f} at end; tbf drops on the downlinks: {run['downlink_drops']})",
            "",
            "| what | MiB per rank | ms | share of shaped rate | inter-node hop alone | tbf drops "
            "| TCP retransmits | machine CPU busy | waiting cores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            per_rank = "bytes_per_rank" in r
            size = (r["bytes_per_rank"] if per_rank else r["bytes"]) / 2**20
            hop = f"{r['inter_hop_pct_of_shaped']:.0f}%" if "inter_hop_pct_of_shaped" in r else "-"
            waiting = r.get("runnable_waiting_cores")
            lines.append(
                f"| {r['kind']} | {size:g}{'' if per_rank else ' in all'} | {1e3 * r['seconds']:.1f} | "
                f"{r['pct_of_shaped']:.0f}% | {hop} | {r['dropped']} | {r['retrans']} | "
                f"{r['machine_busy_pct']:.0f}% | {'-' if waiting is None else f'{waiting:.2f}'} |"
            )
        lines += ["", _link_verdict(run["rows"]), ""]
    return lines


def _link_verdict(rows: list[dict]) -> str:
    """Each All2All variant's range of shares at >= 1 MiB per rank, against the 90% target."""
    shares: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] in A2A_VARIANTS and r["bytes_per_rank"] >= 2**20:
            shares.setdefault(r["kind"], []).append(r["pct_of_shaped"])
    parts = [
        f"{kind} {min(v):.0f}-{max(v):.0f}%{'' if min(v) >= 90 else ' (below 90%)'}"
        for kind, v in shares.items()
    ]
    return "Share of the shaped rate at >= 1 MiB per rank: " + "; ".join(parts) + "."


def pretrain_section(rep: dict) -> list[str]:
    """End-to-end training throughput, Switch vs SMILE, from ``pretrain_bench.py``."""
    args, env, rows = rep["args"], rep["environment"], rep["results"]
    lines = [
        f"`benchmarks/pretrain_bench.py` on {rep['topology']}, {RATE_MBIT:g} Mbit/s per node, "
        f"MTU {_mtu(env)}: "
        "the tiny embedded T5-MoE job trained through `smile train`'s code path, both variants with "
        f"capacity factor {args['capacity_factor']} and the default pipelining, {args['steps']} steps "
        f"after {args['warmup']} warm-up, runs alternating, median of {args['repeats']} "
        f"({env['date_utc']}, load average {env['loadavg'][0]:.1f} at end).",
        "",
        "| variant | tokens/s (median) | tokens/s per run | step ms | forward ms | backward ms | final ce "
        "| dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {"switch": "Switch (switch + flat)", "smile": "SMILE (bilevel + hierarchical)"}
    for name, r in rows.items():
        runs = ", ".join(f"{v:.0f}" for v in r["tokens_per_s_runs"])
        lines.append(
            f"| {labels.get(name, name)} | {r['tokens_per_s']:.0f} | {runs} | {r['step_ms']:.0f} | "
            f"{r['forward_ms']:.0f} | {r['backward_ms']:.0f} | {r['ce']:.3f} | {r['dropped']:.1%} |"
        )
    lines += ["", f"- tokens/s SMILE / Switch: **{rep['smile_over_switch']:.2f}x**", ""]
    return lines


# benchmark layer -> (cost model layer kind, dispatch)
LAYER_MODELS = {
    "switch+flat": ("switch", "flat"),
    "switch+hierarchical": ("switch", "hierarchical"),
    "smile": ("smile", "hierarchical"),
}


def layer_workload(c: dict) -> cm.MoEWorkload:
    """The cost model's workload of a moe_layer_bench config (fp32 payloads, top-1)."""
    return cm.MoEWorkload(
        tokens_per_gpu=c["tokens"],
        d_model=c["d_model"],
        d_ff=c["d_ff"],
        experts_per_gpu=c["experts_per_rank"],
        k=1,
        capacity_factor=c["capacity_factor"],
        bytes_per_element=4,
    )


def layer_check(rep: dict, fit: cm.FitResult) -> tuple[cm.ClusterSpec, list[str]]:
    """Calibrate the one free parameter (FLOP/s) on switch+flat, predict the other layers."""
    c, rows = rep["config"], rep["results"]
    workload = layer_workload(c)
    spec = replace(fit.spec, nodes=c["nodes"], gpus_per_node=c["gpus_per_node"])
    try:
        spec = cm.calibrate_flops(spec, workload, "switch", rows["switch+flat"]["median_ms"] / 1e3)
    except ValueError as err:
        note = (
            f"Layer model check: not possible on this run ({err}); the All2All fit, made on dedicated "
            "All2All runs, over-predicts the All2Alls inside the layer, so no matmul rate can be "
            "calibrated on switch+flat."
        )
        return spec, [note, ""]
    models = {**LAYER_MODELS, "deepspeed": ("switch", "flat")}
    lines = [
        "Layer model check: the All2All fit plus one free parameter, the matmul rate, calibrated on "
        f"switch+flat ({spec.flops / 1e9:.2f} GFLOP/s per rank); the other layers are predictions "
        "(DeepSpeed-MoE modelled as a Switch layer: full router, flat All2All).",
        "",
        "| layer | measured ms | model ms | error | model All2All share |",
        "|---|---|---|---|---|",
    ]
    for name, (kind, dispatch) in models.items():
        if name not in rows:
            continue
        terms = cm.layer_step(spec, workload, kind, dispatch)
        measured, model = rows[name]["median_ms"], 1e3 * terms["total"]
        share = terms["all2all"] / terms["total"]
        lines.append(f"| {name} | {measured:.0f} | {model:.0f} | {model / measured - 1:+.0%} | {share:.0%} |")
    return spec, [*lines, ""]


# ---- node-count sweep ----------------------------------------------------------------------------
# (nodes, measured ratio: median over passes, model's ratio, the ratio in each pass) per node count
Curve = list[tuple[int, float, float, list[float]]]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def sweep_all2all_points(reports: list[dict]) -> dict[tuple[int, int], dict[str, list[float]]]:
    """(nodes, bytes per rank) -> each dispatch kind's per-run medians (seconds), one per pass."""
    points: dict[tuple[int, int], dict[str, list[float]]] = {}
    for rep in reports:
        for row in rep["results"]:
            point = points.setdefault(
                (rep["config"]["nodes"], row["size_bytes"]), {k: [] for k in cm.DISPATCH_KINDS}
            )
            for kind in cm.DISPATCH_KINDS:
                point[kind].append(row[kind]["median_s"])
    return points


def sweep_measurements(
    points: dict[tuple[int, int], dict[str, list[float]]], gpus: int
) -> list[cm.Measurement]:
    """One cost-model measurement per point and kind: the median over passes."""
    return [
        cm.Measurement(kind, n, gpus, size, _median(runs[kind]))
        for (n, size), runs in sorted(points.items())
        for kind in cm.DISPATCH_KINDS
    ]


def holdout_specs(measurements: list[cm.Measurement], base: cm.ClusterSpec) -> dict[int, cm.ClusterSpec]:
    """Per node count, the All2All fit to the other node counts' points only (leave one node count out):
    what the model predicts for a node count it has not seen."""
    counts = sorted({m.nodes for m in measurements})
    return {n: cm.fit_all2all([m for m in measurements if m.nodes != n], base).spec for n in counts}


def _comm_compute(spec: cm.ClusterSpec, workload: cm.MoEWorkload, layer: str) -> np.ndarray:
    """A layer step's modelled (communication + copies, matmuls) seconds."""
    kind, dispatch = LAYER_MODELS[layer]
    terms = cm.layer_step(spec, workload, kind, dispatch)
    compute = terms["router"] + terms["experts"]
    return np.array([terms["total"] - compute, compute])


def predicted_layers(
    spec: cm.ClusterSpec, workload: cm.MoEWorkload, nodes: int, switch_flat_s: dict[int, float]
) -> dict[str, float]:
    """Each layer's predicted seconds at ``nodes``, from the All2All fit ``spec`` and two factors
    calibrated on switch+flat at the other node counts only (non-negative, relative least squares):
    one on the modelled communication and copies (a layer's All2Alls are not the benchmark's
    stand-alone dispatches: no barrier before each, one count call per layer call) and one on the
    matmul time (the matmul rate). Nothing measured at ``nodes`` enters; NaN without another node
    count to calibrate on."""
    rows = [
        _comm_compute(replace(spec, nodes=other), workload, "switch+flat") / seconds
        for other, seconds in sorted(switch_flat_s.items())
        if other != nodes
    ]
    if not rows:
        return {name: math.nan for name in LAYER_MODELS}
    factors = cm.nnls(np.array(rows), np.ones(len(rows)))
    at = replace(spec, nodes=nodes)
    return {name: float(factors @ _comm_compute(at, workload, name)) for name in LAYER_MODELS}


def cpu_bound(machine_busy: float, threshold: float = 0.9) -> bool:
    """A step is CPU-bound when the machine's cores were (nearly) all busy during it: the ranks waited
    for CPU, so a faster link would not have shortened it."""
    return machine_busy >= threshold


def _cores(env: dict) -> int:
    found = re.search(r"(\d+) logical CPUs", env["machine"])
    return int(found.group(1)) if found else 1


def _loads(reports: list[dict]) -> str:
    return ", ".join(
        f"{r['environment']['loadavg_start'][0]:.1f}-{r['environment']['loadavg'][0]:.1f}" for r in reports
    )


def sweep_section(a2a: list[dict], layers: list[dict], plot_path: Path) -> list[str]:
    """Hierarchical vs flat and SMILE vs Switch against node count, beside leave-one-node-count-out
    predictions of the fitted cost model."""
    gpus = a2a[0]["config"]["gpus_per_node"]
    points = sweep_all2all_points(a2a)
    measured = sweep_measurements(points, gpus)
    base = replace(cm.emulated_spec(2, gpus, RATE_MBIT), count_exchange=count_exchange_of(a2a))
    specs = holdout_specs(measured, base)
    nodes = sorted(specs)
    c, env = layers[0]["config"], a2a[0]["environment"]
    passes = max(len(v["flat"]) for v in points.values())
    dates = sorted({r["environment"]["date_utc"] for r in [*a2a, *layers]})
    lines = [
        f"`python benchmarks/make_results.py --run --only {SWEEP}` (root): "
        f"{', '.join(map(str, nodes))} nodes x {gpus} ranks, {RATE_MBIT:g} Mbit/s per node, MTU {_mtu(env)}, "
        f"{passes} passes over the node counts (the order alternating), each pass and node count on a "
        "freshly built emulated cluster running `all2all_bench.py` then `moe_layer_bench.py`; within a "
        "run the compared variants are interleaved iteration by iteration. Figures are medians over "
        f"the passes of each run's median ({dates[0]} to {dates[-1]}).",
        "",
        "Model: the cost model fitted to the All2All points of the other node counts only (leave one "
        "node count out), so every model figure is a prediction for a node count the fit did not see. "
        f"The model prices the count exchange as the runs made it (`count_exchange: {base.count_exchange}`). "
        "Layer model: the layer step of the same fit, with a factor "
        "on its communication and one on its matmul time calibrated on switch+flat at the other node "
        "counts; switch+hierarchical and smile are then predicted.",
        "",
        f"**All2All** ({_mb(min(s for _, s in points))} to {_mb(max(s for _, s in points))} per rank; "
        f"load average at start-end of each run: "
        + "; ".join(f"{n} nodes {_loads([r for r in a2a if r['config']['nodes'] == n])}" for n in nodes)
        + ")",
        "",
        "| nodes | bytes/rank | flat ms | hier ms | hier/flat (per pass) | model flat ms | model hier ms "
        "| model hier/flat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    a2a_curves: dict[int, Curve] = {}
    for (n, size), runs in sorted(points.items(), key=lambda item: (item[0][1], item[0][0])):
        f, h = _median(runs["flat"]), _median(runs["hierarchical"])
        spec = replace(specs[n], nodes=n)
        mf, mh = cm.all2all_time(spec, "flat", size), cm.all2all_time(spec, "hierarchical", size)
        passes = [b / a for a, b in zip(runs["flat"], runs["hierarchical"])]
        per_pass = ", ".join(f"{r:.2f}" for r in passes)
        lines.append(
            f"| {n} | {_mb(size)} | {1e3 * f:.1f} | {1e3 * h:.1f} | **{h / f:.2f}** ({per_pass}) | "
            f"{1e3 * mf:.1f} ({_pct(mf / f - 1)}) | {1e3 * mh:.1f} ({_pct(mh / h - 1)}) | {mh / mf:.2f} |"
        )
        a2a_curves.setdefault(size, []).append((n, h / f, mh / mf, passes))
    workload = layer_workload(c)
    by_nodes = {n: [r for r in layers if r["config"]["nodes"] == n] for n in nodes}
    med = {
        n: {
            name: {
                key: _median([r["results"][name][key] for r in reps])
                for key in ("median_ms", "rank_cpu_ms", "cpu_busy", "link_bound_ms", "dropped")
            }
            for name in LAYER_MODELS
        }
        for n, reps in by_nodes.items()
        if reps
    }
    switch_flat = {n: m["switch+flat"]["median_ms"] / 1e3 for n, m in med.items()}
    sizes = {workload.rows(workload.experts_per_gpu * gpus * n) * workload.d_model * 4 for n in med}
    cores = _cores(env)
    lines += [
        "",
        f"**MoE layers** (d_model {c['d_model']}, FFN {c['d_model']}->{c['d_ff']}->{c['d_model']}, "
        f"{c['experts_per_rank']} expert per rank, {c['tokens']} tokens per rank = "
        f"{' / '.join(_mb(x) for x in sorted(sizes))} per capacity-padded dispatch, "
        f"top-1, capacity factor {c['capacity_factor']}, chunks {c['chunks']}, fp32, forward + backward, "
        f"median of {c['iters']} interleaved iterations after {c['warmup']} warm-up per run; the three "
        "layers share every lever but the router (smile vs switch+hierarchical) or router and dispatcher "
        "(smile vs switch+flat); tokens/s ratios, > 1 = SMILE faster; load average at start-end of each run: "
        + "; ".join(f"{n} nodes {_loads(by_nodes[n])}" for n in med)
        + ")",
        "",
        "| nodes | switch+flat ms | switch+hier ms | smile ms | smile / switch+flat (per pass; model) "
        "| smile / switch+hier (per pass; model) | dropped (flat, hier, smile) | rank CPU ms "
        "| ranks' share of the cores | machine CPU busy | link-bound share of the step | bound by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    layer_curves: dict[str, Curve] = {
        "smile / switch+flat": [],
        "smile / switch+hier": [],
    }
    bound_by = {}
    for n, m in med.items():
        pred = predicted_layers(replace(specs[n], nodes=n), workload, n, switch_flat)
        ms = {name: m[name]["median_ms"] for name in LAYER_MODELS}
        vs_flat, vs_hier = ms["switch+flat"] / ms["smile"], ms["switch+hierarchical"] / ms["smile"]
        runs_flat, runs_hier = (
            [r["results"][twin]["median_ms"] / r["results"]["smile"]["median_ms"] for r in by_nodes[n]]
            for twin in ("switch+flat", "switch+hierarchical")
        )
        passes_flat, passes_hier = (", ".join(f"{r:.2f}" for r in runs) for runs in (runs_flat, runs_hier))
        p_flat, p_hier = pred["switch+flat"] / pred["smile"], pred["switch+hierarchical"] / pred["smile"]
        layer_curves["smile / switch+flat"].append((n, vs_flat, p_flat, runs_flat))
        layer_curves["smile / switch+hier"].append((n, vs_hier, p_hier, runs_hier))
        cpu = ", ".join(f"{m[name]['rank_cpu_ms']:.0f}" for name in LAYER_MODELS)
        share = ", ".join(f"{m[name]['rank_cpu_ms'] / (cores * ms[name]):.0%}" for name in LAYER_MODELS)
        busy = ", ".join(f"{m[name]['cpu_busy']:.0%}" for name in LAYER_MODELS)
        drop = ", ".join(f"{m[name]['dropped']:.1%}" for name in LAYER_MODELS)
        link = ", ".join(f"{m[name]['link_bound_ms'] / ms[name]:.0%}" for name in LAYER_MODELS)
        bound_by[n] = all(cpu_bound(m[name]["cpu_busy"]) for name in LAYER_MODELS)
        lines.append(
            f"| {n} | {ms['switch+flat']:.1f} | {ms['switch+hierarchical']:.1f} | {ms['smile']:.1f} | "
            f"**{vs_flat:.2f}** ({passes_flat}; {p_flat:.2f}) | "
            f"**{vs_hier:.2f}** ({passes_hier}; {p_hier:.2f}) | {drop} | {cpu} | {share} | {busy} | "
            f"{link} | {'CPU' if bound_by[n] else 'not only CPU'} |"
        )
    lines += ["", *_sweep_verdicts(a2a_curves, layer_curves)]
    cpu_points = [n for n, b in bound_by.items() if b]
    everywhere = "; so every layer point here measures the shared cores as much as the network"
    lines += [
        "",
        f"Rank CPU ms: CPU time of all {gpus} x nodes ranks in the median step, summed; their share of the "
        f"cores = that / ({cores} cores x step time). Machine CPU busy: every job on the machine during the "
        "step (`/proc/stat`). A point is marked CPU-bound when the machine was at least 90% busy in the "
        f"median step of every layer: the ranks waited for a core, not for the link. CPU-bound: "
        f"{', '.join(f'{n} nodes' for n in cpu_points) or 'none'}"
        f"{everywhere if len(cpu_points) == len(bound_by) else ''}. "
        "The All2All runs have no CPU column; they ran on the same machine at the load shown.",
        "",
        f"![node-count sweep](results/{plot_path.name})",
        "",
    ]
    plot_sweep(a2a_curves, layer_curves, plot_path)
    return lines


def _sweep_verdicts(a2a_curves: dict[int, Curve], layer_curves: dict[str, Curve]) -> list[str]:
    """Where the measurements and the hold-out model put hierarchical ahead of flat and SMILE ahead of
    Switch, and how far the model's ratios were off. A measured point counts only when its median is
    more than 2% past 1 and every pass lies past 1 on the same side."""

    def where(pts: list[tuple[str, float, list[float]]], sign: int) -> str:
        found = [
            label for label, r, runs in pts if sign * (r - 1) > 0.02 and all(sign * (x - 1) > 0 for x in runs)
        ]
        return ", ".join(found) or "nowhere"

    def verdict(pts: list[tuple[str, float, float, list[float]]], sign: int) -> str:
        errs = [abs(p / m - 1) for _, m, p, _ in pts if not math.isnan(p)]
        return (
            f"measured {where([(lb, m, runs) for lb, m, _, runs in pts], sign)}; hold-out model "
            f"{where([(lb, p, [p]) for lb, _, p, _ in pts], sign)}; the other way round, measured "
            f"{where([(lb, m, runs) for lb, m, _, runs in pts], -sign)}, hold-out model "
            f"{where([(lb, p, [p]) for lb, _, p, _ in pts], -sign)}; the model's ratio is off by "
            f"{min(errs):.0%} to {max(errs):.0%}"
        )

    a2a = [(f"{n}x{_mb(size)}", m, p, runs) for size, pts in a2a_curves.items() for n, m, p, runs in pts]
    lines = [f"- Hierarchical faster than flat (nodes x bytes/rank): {verdict(a2a, -1)}."]
    for label, pts in layer_curves.items():
        named = [(f"{n} nodes", m, p, runs) for n, m, p, runs in pts]
        lines.append(f"- {label} > 1 (SMILE faster): {verdict(named, 1)}.")
    lines.append(
        "  (A measured point counts when its median is more than 2% past 1 and every pass agrees; a "
        "model point when it is more than 2% past 1.)"
    )
    return lines


def plot_sweep(
    a2a_curves: dict[int, Curve],
    layer_curves: dict[str, Curve],
    path: Path,
) -> None:
    """hier/flat and smile/switch against node count: measured solid, the hold-out model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    panels = [(left, {_mb(k): v for k, v in a2a_curves.items()}), (right, layer_curves)]
    for ax, curves in panels:
        for i, (label, pts) in enumerate(curves.items()):
            colour = f"C{i}"
            n = [p[0] for p in pts]
            ax.plot(n, [p[1] for p in pts], "o-", color=colour, label=f"{label} measured")
            ax.plot(n, [p[2] for p in pts], "x--", color=colour, label=f"{label} model (hold-out)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p[0] for pts in curves.values() for p in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("nodes (2 ranks each)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("hier / flat All2All time (> 1: flat faster)")
    left.set_title("All2All, per bytes per rank", fontsize=9)
    right.set_ylabel("SMILE / Switch tokens/s (> 1: SMILE faster)")
    right.set_title("MoE layer, forward + backward", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stage_lines(reports: list[dict], size: int) -> list[str]:
    """Each dispatch split into its stages at ``size`` bytes per rank (reports that recorded them)."""
    lines = []
    for rep in reports:
        row = next((r for r in rep["results"] if r["size_bytes"] == size), None)
        if row is None or "stages_median_s" not in row["flat"]:
            continue
        flat, hier = row["flat"]["stages_median_s"], row["hierarchical"]["stages_median_s"]
        c = rep["config"]
        lines.append(
            f"Measured by stage at {_mb(size)} per rank on {c['nodes']}x{c['gpus_per_node']} (critical "
            f"path, medians): flat = counts {1e3 * flat['counts']:.1f} + All2All "
            f"{1e3 * flat['all2all']:.1f} ms; "
            f"hierarchical = counts {1e3 * hier['counts']:.1f} + inter-node hop {1e3 * hier['inter']:.1f} "
            f"+ intra-node hop {1e3 * hier['intra']:.1f} ms (hops with their regroup copies): the "
            f"inter-node hop alone, with {c['nodes'] - 1} larger message{'s' * (c['nodes'] > 2)} per rank "
            "instead of "
            f"{(c['nodes'] - 1) * c['gpus_per_node']}, takes {hier['inter'] / flat['all2all']:.2f}x "
            "flat's whole All2All."
        )
    return lines


def _nodes(n: int | None) -> str:
    return "no node count up to 4096" if n is None or n > 4096 else f"{n} nodes"


def crossover_section(
    reports: list[dict], fit: cm.FitResult, base: cm.ClusterSpec, curves: dict[str, list[dict]]
) -> list[str]:
    lines = ["Measured on the emulated cluster:", ""]
    for rep in reports:
        c = rep["config"]
        wins = [
            r["size_bytes"] for r in rep["results"] if r["hierarchical"]["median_s"] < r["flat"]["median_s"]
        ]
        ratio = [r["hierarchical"]["median_s"] / r["flat"]["median_s"] for r in rep["results"]]
        lines.append(
            f"- {c['nodes']}x{c['gpus_per_node']}: hierarchical faster at "
            f"{', '.join(_mb(w) for w in wins) if wins else 'no size'}; hier/flat from {min(ratio):.2f} to "
            f"{max(ratio):.2f}."
        )
    size = 2048 * 512 * 4  # the MoE layer's dispatch, 4 MiB per rank
    lines += [
        "",
        "Why hierarchical does not win at this scale (a ratio within a few percent of 1 is noise): both "
        "dispatchers push the same bytes through each node's uplink; the "
        "hierarchical one adds a second collective, a loopback hop of m*(G-1)/G bytes and a second "
        "regroup copy, all paid on the same 2 CPU cores, and saves only (N-1)*(G-1) inter-node "
        "messages (3 at 4x2, 4 at 2x4).",
        *_stage_lines(reports, size),
        "The fitted model says what it would take:",
        "",
    ]
    sizes = sorted({m.size for m in fit.measurements})
    variants = [fit.spec] + [
        cm.fit_all2all([m for m in fit.measurements if m.size != left_out], base).spec for left_out in sizes
    ]
    for g in (2, 8):
        found = [cm.crossover_nodes(replace(s, gpus_per_node=g), size) for s in variants]
        spread = sorted(4097 if n is None else n for n in found[1:])
        lines.append(
            f"- emulated network as fitted, {g} ranks per node, 4 MiB per rank: hierarchical beats flat from "
            f"{_nodes(found[0])} (fits leaving one size out: {_nodes(spread[0])} to {_nodes(spread[-1])})."
        )
    lines += [
        "",
        "That extrapolation hangs on the fitted per-message and per-collective costs, which a handful of "
        "noisy small-message points determine: read it as an order of magnitude.",
    ]
    lines += ["", "Projected with the presets (MoE layer, see the workload below):", ""]
    for label, rows in curves.items():
        faster = next((r["nodes"] for r in rows if r["speedup"] > 1), None)
        hier = next((r["nodes"] for r in rows if r["hierarchical_ms"] < r["flat_ms"]), None)
        claim = next((r["nodes"] for r in rows if r["speedup"] >= PAPER_CLAIM), None)
        last = rows[-1]
        lines.append(
            f"- {label}: hierarchical All2All beats flat from {hier} nodes; the SMILE layer is faster from "
            f"{faster} nodes; {PAPER_CLAIM}x is reached at {claim if claim else 'no node count up to 256'}"
            f"{' nodes' if claim else ''}; {last['speedup']:.2f}x at {last['nodes']} nodes."
        )
    lines.append("")
    return lines


def paper_model(path: Path = PAPER_CONFIG, gpus: int = PAPER_NODES * PAPER_GPUS_PER_NODE) -> cm.MoEModel:
    """Switch-Base-128 per GPU and step, read from the cluster job's config (shape, batch, span lengths)."""
    cfg = yaml.safe_load(path.read_text())
    model, moe, data = cfg["model"], cfg["moe"], cfg["data"]
    _, targets = compute_input_and_target_lengths(
        data["seq_len"], data["noise_density"], data["mean_span_length"]
    )
    return cm.encoder_decoder_moe(
        path.stem,
        d_model=model["d_model"],
        d_ff=model["d_ff"],
        d_kv=model["d_kv"],
        num_heads=model["num_heads"],
        num_layers=model["num_layers"],
        num_decoder_layers=model["num_decoder_layers"],
        vocab_size=model["vocab_size"],
        every=moe["every"],
        experts_per_gpu=moe["num_experts"] // gpus,
        batch_per_gpu=data["batch_size"],
        inputs_length=data["seq_len"],
        targets_length=targets,
        capacity_factor=moe["capacity_factor"],
    )


def paper_section(model: cm.MoEModel) -> list[str]:
    """SMILE vs Switch on Switch-Base-128 at 16 x 8 with each preset, against the paper's 2.5x."""
    enc, dec = model.moe_layers
    w = enc[0]
    lines = [
        f"`{PAPER_CONFIG.relative_to(HERE.parent)}` (Switch-Base-128: T5 1.0 Base, d_model {w.d_model}, "
        f"d_ff {w.d_ff}, {w.experts_per_gpu * PAPER_NODES * PAPER_GPUS_PER_NODE} experts, an MoE in every "
        f"other FFN = {enc[1]} encoder + {dec[1]} decoder MoE layers, capacity factor {w.capacity_factor}, "
        f"top-1) on {PAPER_NODES} nodes x {PAPER_GPUS_PER_NODE} GPUs, one expert per GPU; per GPU and step "
        f"{enc[0].tokens_per_gpu} encoder and {dec[0].tokens_per_gpu} decoder tokens (span corruption), "
        f"{model.dense_flops / 1e12:.3f} TFLOP of dense forward work (attention, dense FFNs, logits), "
        "bf16 payloads. Switch = top-1 router over all experts + flat All2All; SMILE = bi-level router + "
        "two-hop All2All. `cm.compare_model` in smile/sim/cost_model.py; the presets cite their sources "
        "there.",
        "",
        "| cluster | Switch step ms (All2All) | SMILE step ms (All2All) | dense ms | MoE layers speedup "
        "| step speedup | step bound (All2All free) | vs the paper's 2.5x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in cm.PRESETS.values():
        spec = replace(spec, nodes=PAPER_NODES, gpus_per_node=PAPER_GPUS_PER_NODE)
        r = cm.compare_model(spec, model)
        lines.append(
            f"| {spec.name} | {r['switch_step_ms']:.1f} ({r['switch_all2all_ms']:.1f}) | "
            f"{r['smile_step_ms']:.1f} ({r['smile_all2all_ms']:.1f}) | {r['dense_ms']:.1f} | "
            f"{r['moe_speedup']:.2f}x | **{r['step_speedup']:.2f}x** | {r['step_bound']:.1f}x | "
            f"{r['step_speedup'] / PAPER_CLAIM:.2f} of it |"
        )
    lines += [
        "",
        "Sensitivity (end-to-end speedup with one preset parameter halved / doubled, the others kept):",
        "",
        "| cluster | " + " | ".join(p.replace("_", " ") for p in cm.SENSITIVITY_PARAMS) + " |",
        "|---" * (len(cm.SENSITIVITY_PARAMS) + 1) + "|",
    ]
    widest = {}
    for spec in cm.PRESETS.values():
        spec = replace(spec, nodes=PAPER_NODES, gpus_per_node=PAPER_GPUS_PER_NODE)
        sens = cm.sensitivity(spec, model)
        widest[spec.name] = max(sens.items(), key=lambda item: abs(item[1][1] - item[1][0]))[0]
        cells = " | ".join(
            f"{lo:.2f}-{hi:.2f}" if lo <= hi else f"{hi:.2f}-{lo:.2f}" for lo, hi in sens.values()
        )
        lines.append(f"| {spec.name} | {cells} |")
    g, n = PAPER_GPUS_PER_NODE, PAPER_NODES
    lines += [
        "",
        "The model counts every All2All message's latency (alpha per peer, added up): Switch's flat "
        f"All2All pays {(n - 1) * g} inter-node messages per rank and collective, SMILE's inter-node hop "
        f"{n - 1}. Parameter with the widest spread above: "
        + "; ".join(f"{name}: {param.replace('_', ' ')}" for name, param in widest.items())
        + ". The inter-node latencies are derived from latency-bound alltoall excerpts or assumed, not "
        "measured on such a cluster.",
        "",
        "What the projection assumes and leaves out:",
        "",
        *[f"- {item}" for item in cm.PROJECTION_ASSUMPTIONS],
        "",
    ]
    return lines


def projection_section(workload: cm.MoEWorkload, curves: dict[str, list[dict]]) -> list[str]:
    lines = [
        f"Workload per GPU: {workload.tokens_per_gpu} tokens, d_model {workload.d_model}, "
        f"d_ff {workload.d_ff}, {workload.experts_per_gpu} expert per GPU (E = GPUs), top-{workload.k}, "
        "capacity factor "
        f"{workload.capacity_factor}, {workload.bytes_per_element}-byte payload; one MoE layer, forward + "
        "backward, nothing overlapped. Reproduce with `smile simulate`.",
        "",
    ]
    for label, rows in curves.items():
        lines += [
            f"**{label}**",
            "",
            "| nodes | GPUs | flat All2All ms | hier All2All ms | Switch layer ms | SMILE layer ms "
            "| speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['nodes']} | {r['gpus']} | {r['flat_ms']:.2f} | {r['hierarchical_ms']:.2f} | "
                f"{r['switch_step_ms']:.2f} | {r['smile_step_ms']:.2f} | {r['speedup']:.2f}x |"
            )
        lines.append("")
    lines += ["![projection](results/projection.png)", ""]
    return lines


_LINK = ClusterConfig(rate_mbit=RATE_MBIT, mtu=MTU)


def caveats(envs: list[dict], moe: dict | None) -> list[str]:
    loads = [e["loadavg"][0] for e in envs] + [e.get("loadavg_start", [math.nan])[0] for e in envs]
    items = [
        f"The machine has {envs[0]['machine'].split(', ')[1]} shared with other jobs: load averages "
        f"between {min(loads):.0f} and {max(loads):.0f} during the runs. 8 gloo processes (+ 4 torchrun "
        "agents) share those cores, so compute, loopback traffic and the TCP stack compete; absolute "
        "times are inflated and noisy (medians of 3-10 iterations, each variant interleaved with the "
        "others).",
        "Emulated network: one Linux network namespace per node on a bridge, each node's veth shaped to "
        f"{RATE_MBIT:g} Mbit/s in each direction with tc tbf (bucket {_LINK.tbf_burst_bytes} B: one 64 KiB "
        f"GSO packet and a frame; queue {_LINK.tbf_latency_ms / 1e3:g} s of line rate, so it pauses "
        "rather than drops, as a lossless training fabric does; runs before 2026-12-06 used a 50 kB "
        "bucket and a 100 ms queue, which dropped frames); no latency is "
        "injected (netem is not available), so the inter-node alpha is the software stack's, not a "
        "switch's. Intra-node traffic is loopback TCP on the same cores, not NVLink.",
        f"Links at MTU {' / '.join(sorted({_mtu(e) for e in envs}))} in these runs; `--run` uses {MTU} "
        "(jumbo frames, as the paper's AWS cluster's EFA/ENA links at 9001). At 1500 the kernel's "
        "per-packet work on the same 2 cores about doubles the ranks' system time and every layer's "
        "step becomes CPU-bound, leaving pipelining no idle link time to fill: SMILE's layers then do "
        "not beat DeepSpeed-MoE (figures in docs/benchmarks.md; `smile cluster --mtu 1500` reproduces it).",
        "gloo/CPU, fp32 tensors and payloads (except the smile+bf16/fp8 layer variants); the NCCL/GPU "
        "path of the same scripts was not measured here (no GPU on this machine, and a single GPU "
        "cannot run a multi-rank All2All).",
        "Dispatch times include this library's count exchanges (one small All2All per hop) and regroup "
        "copies, as the MoE layer runs them; flat and hierarchical outputs were checked identical.",
        "The fitted parameters are effective costs of this setup; the fit uses the same points it is "
        "judged on (in-sample) and a leave-one-size-out hold-out, both reported.",
        "Preset clusters are effective bandwidths, latencies and FLOP/s anchored in published "
        "nccl-tests / DeepEP figures, vendor specs and ANCHORS.md, each parameter citing its source in "
        "smile/sim/cost_model.py (some derived from latency-bound excerpts, some assumed, marked so); "
        "none was measured on such a cluster here. The model ignores congestion, incast, protocol "
        "switches and overlap of communication with compute. The 1-256 node projection is for one MoE "
        "layer; the paper's 2.5x is end-to-end pretraining throughput, which the Switch-Base-128 section "
        "models with the dense work included.",
    ]
    if moe is not None:
        items.append(
            "DeepSpeed-MoE is deepspeed.moe.layer.MoE with its defaults except ep_size = world, k = 1 and "
            "the capacity factor (so random token selection and min_capacity 4 are on), an expert "
            "Linear-GELU-Linear without biases like smile's; set_deepspeed_parallelism() is called "
            "directly, without deepspeed.initialize."
        )
    return [f"- {item}" for item in items] + [""]


def gpu_sections(results: Path) -> list[str]:
    """Stored single-GPU results (measured on a lent GPU; this script cannot re-run them)."""
    lines: list[str] = []
    for table in sorted(results.glob("dispatch_*.md")):
        card, date = table.stem.split("_")[1:3]
        env = table.with_name(table.stem + ".env.txt")
        lines += [
            f"## Fused dispatch kernels on one GPU ({card.upper()}, {date})",
            "",
            "`bash benchmarks/gpu_check.sh` on a CUDA machine (builds `smile._C`, runs the GPU kernel tests, "
            "then `benchmarks/dispatch_bench.py`). Median of `triton.testing.do_bench`; every result "
            "checked against the torch reference on fresh random inputs. `% copy` is effective bandwidth "
            "over the measured device-to-device copy; bytes counted as in ANCHORS (permute reads and writes "
            "T*k*H, combine reads T*k*H and writes T*H), so k=8 permute exceeds 100% "
            "(rows re-read from cache). "
            "`index` (destination offsets, including its host sync) is timed separately from permute.",
            "",
        ]
        if env.exists():
            lines += ["```", env.read_text().strip(), "```", ""]
        lines += [table.read_text().strip(), ""]
    for path in sorted(results.glob("moe_layer_h*.json")):
        lines += gpu_layer_section(load(path))
    return lines


GPU_LAYER_COLUMNS = {"torch_loop": "torch loop", "smile_bmm": "smile (bmm)", "smile_triton": "smile (triton)"}


def gpu_layer_section(rep: dict) -> list[str]:
    """One ``moe_layer_gpu_bench.py`` report: the side-by-side table, then with ``--profile`` where
    smile's step goes (kernel categories) and each expert stage alone per GEMM strategy."""
    rows = rep["rows"]
    backend = rows[0].get("dispatch_backend")
    backend_text = (
        f"smile's dispatch ran on its {backend} backend"
        if backend
        else "smile's dispatch ran on its Triton backend (the CUDA extension was not built in that run)"
    )
    ds = next(k[:-3] for k in rows[0] if k.startswith("deepspeed") and k.endswith("_ms"))
    columns = [c for c in ("torch_loop", ds, "smile_bmm", "smile_triton") if c + "_ms" in rows[0]]
    names = [GPU_LAYER_COLUMNS.get(c, "DeepSpeed-MoE") for c in columns]
    names.append(f"smile ({rows[0]['gemm']}, auto)")
    lines = [
        f"## One MoE layer on one GPU ({rep['device']}, {rep['date']})",
        "",
        f"`python benchmarks/moe_layer_gpu_bench.py`, {rep['dtype']}, forward + backward, dropless "
        f"smile layer (router, fused dispatch, grouped GEMM, fused combine) vs the torch loop and "
        f"DeepSpeed-MoE (ep 1, cf 1.0, which drops overflow tokens while smile computes all) in the same "
        f"run; torch {rep['torch']}; {backend_text}. Dense bf16 matmul ceiling measured in the same run: "
        f"{rep['ceiling_tflops']:.0f} TFLOP/s. Expert TFLOP/s = 12 T k d ff / time.",
        "",
        "| T, d, ff, E, k | " + " | ".join(names) + " | smile vs loop | smile vs DeepSpeed |",
        "|---" * (len(names) + 3) + "|",
    ]
    for r in rows:
        cells = [f"{r[c + '_ms']:.2f} ms, {r[c + '_tflops']:.0f}" for c in [*columns, "smile"]]
        lines.append(
            f"| {_shape(r)} | "
            + " | ".join(cells)
            + f" | {r['torch_loop_ms'] / r['smile_ms']:.2f}x | {r[ds + '_ms'] / r['smile_ms']:.2f}x |"
        )
    lines.append("")
    for r in rows:
        if "profile_smile" in r:
            prof = r["profile_smile"]
            total = prof["total_ms"]
            parts = ", ".join(f"{name} {ms:.2f} ms ({ms / total:.0%})" for name, ms in prof["ms"].items())
            lines.append(
                f"- {_shape(r)}, smile's step by kernel (torch.profiler): {total:.2f} ms = {parts}; "
                f"{prof['gemm_tflops']:.0f} TFLOP/s inside the GEMM kernels."
            )
        for name, stages in r.get("expert_stages", {}).items():
            parts = ", ".join(
                f"{stage.replace('_', ' ')} {v['ms']:.2f} ms ({v['tflops']:.0f})"
                for stage, v in stages.items()
            )
            lines.append(f"- {_shape(r)}, expert stages alone, {name}: {parts} (ms, TFLOP/s).")
    if lines[-1]:
        lines.append("")
    return lines


def _shape(r: dict) -> str:
    return f"{r['T']}, {r['d_model']}, {r['d_ff']}, {r['E']}, {r['k']}"


def render(results: Path) -> tuple[str, cm.FitResult, dict]:
    a2a = [load(p) for p in sorted(results.glob("all2all_emulated_*.json"))]
    if not a2a:
        raise SystemExit(f"no all2all_emulated_*.json in {results}: run with --run first (as root)")
    moe_path = results / "moe_layer_emulated_4x2.json"
    moe = load(moe_path) if moe_path.exists() else None
    base = cm.emulated_spec(a2a[0]["config"]["nodes"], a2a[0]["config"]["gpus_per_node"], RATE_MBIT)
    base = replace(base, count_exchange=count_exchange_of(a2a))
    fit = cm.fit_all2all(measurements(a2a), base)
    cm.plot_fit(fit, str(results / "cost_model_fit.png"))
    workload = cm.MoEWorkload()
    curves = {spec.name: cm.projection(spec, workload, NODE_COUNTS) for spec in cm.PRESETS.values()}
    cm.plot_projection(curves, str(results / "projection.png"), claim=PAPER_CLAIM)
    envs = [r["environment"] for r in a2a] + ([moe["environment"]] if moe else [])
    dates = sorted({e["date_utc"][:10] for e in envs})
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/make_results.py` (add `--run`, as root, to measure again). "
        f"Measured {', '.join(dates)} on `{envs[0]['host']}`: {envs[0]['machine']}; Python "
        f"{envs[0]['python']}, torch {envs[0]['torch']}, backend {envs[0]['backend']}.",
        "",
        "## Caveats",
        "",
        *caveats(envs, moe),
        "## All2All: flat vs hierarchical on the emulated cluster",
        "",
        *all2all_section(a2a, fit),
        "## Cost model fit",
        "",
        *fit_section(fit),
    ]
    fitted = fit.spec
    if moe is not None:
        fitted, check = layer_check(moe, fit)
        lines += ["## MoE layers on the emulated cluster", "", *moe_section(moe), *check]
    unshaped = results / f"moe_layer_{UNSHAPED}_2x2.json"
    if unshaped.exists():
        lines += ["## The two hops on one machine", "", *unshaped_section(load(unshaped))]
    links = [load(path)["runs"][-1] for n, g in LINK_LAYOUTS if (path := link_path(results, n, g)).exists()]
    if links:
        lines += ["## Link utilisation of the emulated cluster", "", *link_section(links)]
    pretrain_path = results / "pretrain_emulated_4x2.json"
    if pretrain_path.exists():
        pretrain = pretrain_section(load(pretrain_path))
        lines += ["## End-to-end pretraining on the emulated cluster", "", *pretrain]
    sweep_a2a = [load(p) for p in sorted(results.glob("node_sweep_all2all_*.json"))]
    sweep_layers = [load(p) for p in sorted(results.glob("node_sweep_layer_*.json"))]
    if sweep_a2a and sweep_layers:
        lines += [
            "## Node-count sweep: hierarchical vs flat, SMILE vs Switch",
            "",
            *sweep_section(sweep_a2a, sweep_layers, results / "node_sweep.png"),
        ]
    lines += [
        "## Crossover",
        "",
        *crossover_section(a2a, fit, base, curves),
        "## Projection: SMILE vs Switch from 1 to 256 nodes",
        "",
        *projection_section(workload, curves),
        "## Projection: the paper's setting, Switch-Base-128 on 16 x 8 GPUs",
        "",
        *paper_section(paper_model()),
        *gpu_sections(results),
    ]
    summary = {
        "spec": fitted.to_dict(),
        "measurements": [vars(m) for m in fit.measurements],
        "errors": fit.errors,
        "holdout_errors": fit.holdout_errors,
        "projections": curves,
    }
    return "\n".join(lines), fit, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", action="store_true", help="measure again on the emulated cluster first (root)"
    )
    parser.add_argument(
        "--only",
        action="append",
        help=f"with --run: measure only this entry ({', '.join([*RUNS, SWEEP, LINKS, UNSHAPED])})",
    )
    parser.add_argument("--results", default=str(HERE / "results"), help="directory of the JSON reports")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_all(results, args.only)
    text, fit, summary = render(results)
    with open(results / "cost_model_fit.json", "w") as fh:
        json.dump(summary, fh, indent=1)
    Path(args.out).write_text(text)
    worst = ", ".join(f"{k} {fit.worst(k):.0%}" for k in cm.DISPATCH_KINDS)
    print(f"wrote {args.out}; worst fit error: {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
