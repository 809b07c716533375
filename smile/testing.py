"""The one harness that runs a function on W gloo processes presented as nodes x GPUs.

Tests, benchmarks and the demo all start simulated clusters through :func:`run_distributed`:
each rank gets a :class:`~smile.moe.topology.Topology`; the call returns every rank's result, or
raises with the traceback of the rank that failed first (its peers' broken-connection errors
come after it); a hung run is killed at ``timeout``.
"""

from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smile.moe.topology import Topology, free_port, start_process_group, stop_process_group

_GRACE_S = 3.0
_PRELOAD = ["smile.runtime", "transformers", "deepspeed"]
_SECONDARY = ("Connection reset", "Connection closed", "Read error", "Socket Timeout")


class DistributedFailure(RuntimeError):
    """A rank raised, died, or the run timed out."""


def _worker(
    rank: int,
    nodes: int,
    gpus_per_node: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    env: dict[str, str],
    results: Any,
    timeout: float,
) -> None:
    world = nodes * gpus_per_node
    os.environ.clear()  # the caller's environment now, not the fork server's from its start
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank % gpus_per_node),
        LOCAL_WORLD_SIZE=str(gpus_per_node),
    )
    try:
        torch.set_num_threads(1)
        start_process_group("gloo", timeout)
        topo = Topology.from_env(group_timeout_s=timeout)
        result = fn(topo, *args)
        dist.barrier()
        results.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the traceback is the report
        results.put((rank, False, traceback.format_exc()))
    finally:
        stop_process_group(barrier=False)


def _failure_report(failures: dict[int, str], world: int) -> str:
    """Root cause first: a rank whose error is not a peer's broken connection."""
    order = sorted(failures, key=lambda r: (any(s in failures[r] for s in _SECONDARY), r))
    return "\n".join(f"rank {r} of {world} failed:\n{failures[r]}" for r in order)


def _context():
    """How ranks start. Without CUDA they fork from one server process that imported torch,
    transformers and DeepSpeed once (per calling process) instead of each rank importing them
    again: seconds of CPU per rank. With CUDA they are spawned: a rank forked after the server
    touched CUDA (DeepSpeed's import probes it) could not use it."""
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    nodes: int,
    gpus_per_node: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(topology, *args)`` on ``nodes * gpus_per_node`` gloo ranks; return results by rank.

    ``fn`` must be importable by name (a module-level function). Results must be picklable.
    """
    world = nodes * gpus_per_node
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nodes, gpus_per_node, port, fn, args, {**os.environ, **(env or {})}, results, timeout),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) + len(failures) < world:
            if failures:
                # Peers of a failed rank fail a moment later with transport errors; a short
                # grace period lets the root cause be reported first.
                deadline = min(deadline, time.monotonic() + _GRACE_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failures:
                    break
                missing = sorted(set(range(world)) - set(collected))
                raise DistributedFailure(f"timed out after {timeout:.0f}s waiting for ranks {missing}")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in collected and r not in failures and p.exitcode not in (None, 0):
                        failures[r] = f"died with exit code {p.exitcode} and no report"
                continue
            if ok:
                collected[rank] = payload
            else:
                failures[rank] = payload
        if failures:
            raise DistributedFailure(_failure_report(failures, world))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [collected[r] for r in range(world)]


PROCESS_GROUP_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child ``smile`` command, without the variables of a
    process group this process may have started (the child would try to bind its port)."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}
    return env | overrides
