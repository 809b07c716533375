"""An emulated multi-node cluster on one Linux machine: one network namespace per node.

Why: SMILE's gains come from the inter-node network, which a single machine does not have.
Each node is a network namespace whose only link is a veth pair to a shared bridge; both
directions of that link are shaped with ``tc tbf`` (a full-duplex NIC of ``rate_mbit``).
Ranks of the same node talk over the namespace's loopback (its own address routes through
``lo``), so intra-node traffic is fast and inter-node traffic crosses the shaped uplinks, as on
a real cluster. ``netem`` is not assumed (many kernels lack it), so no latency is injected.

The bridge has no address: traffic stays between the namespaces this object created. Every
interface and namespace carries the creator's pid in its name, all of them are removed on exit,
on an exception and on Ctrl-C, and :func:`cleanup_stale` removes those left by a killed run.
Creating namespaces needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from smile.moe.topology import under_torchrun

IFACE = "smilenet"  # the node's uplink inside every namespace (GLOO_SOCKET_IFNAME)
GSO_MAX_BYTES = 65536  # the largest packet TCP hands a veth (the kernel's default gso_max_size)
_NS_RE = re.compile(r"^smile-(\d+)-(\d+)$")


class ClusterError(RuntimeError):
    """The emulated cluster could not be built or run."""


@dataclass(frozen=True)
class ClusterConfig:
    """``nodes`` namespaces x ``procs_per_node`` processes, each node's uplink at ``rate_mbit``."""

    nodes: int = 4
    procs_per_node: int = 2
    rate_mbit: float = 200.0
    subnet: str = "10.77.0"  # the nodes get <subnet>.1 .. <subnet>.<nodes> (/24)
    master_port: int = 29500
    # queueing a tbf allows before it drops: deep enough that it does not (see tbf_limit_bytes)
    tbf_latency_ms: float = 1000.0
    mtu: int = 9000  # of every link: jumbo frames, as training clusters use (EFA 9001); 1500 = office LAN

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= 250:
            raise ValueError(f"ClusterConfig.nodes must be an int in [1, 250], got {self.nodes!r}")
        if not isinstance(self.procs_per_node, int) or self.procs_per_node < 1:
            raise ValueError(
                f"ClusterConfig.procs_per_node must be a positive int, got {self.procs_per_node!r}"
            )
        if not self.rate_mbit > 0:
            raise ValueError(f"ClusterConfig.rate_mbit must be > 0, got {self.rate_mbit!r}")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", self.subnet):
            raise ValueError(f"ClusterConfig.subnet must be three octets like '10.77.0', got {self.subnet!r}")
        if not 1024 <= self.master_port <= 65535:
            raise ValueError(f"ClusterConfig.master_port must be in [1024, 65535], got {self.master_port!r}")
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not 576 <= self.mtu <= 65535:
            raise ValueError(f"ClusterConfig.mtu must be an int in [576, 65535], got {self.mtu!r}")
        if not self.tbf_latency_ms > 0:
            raise ValueError(f"ClusterConfig.tbf_latency_ms must be > 0, got {self.tbf_latency_ms!r}")

    @property
    def rate_bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8

    @property
    def tbf_burst_bytes(self) -> int:
        """Bucket size: 2 ms of line rate, at least 32 KiB (below that tbf under-runs its timer), two
        frames, and one whole GSO packet plus a frame.

        A packet larger than the bucket is cut into frames by tbf in software (``tbf_segment``),
        work a NIC does in hardware (TSO): on a 2-core machine that CPU is taken from the ranks.
        """
        return max(32 * 1024, 2 * self.mtu, GSO_MAX_BYTES + self.mtu, int(self.rate_bytes_per_s * 2e-3))

    @property
    def tbf_limit_bytes(self) -> int:
        """Bytes a tbf queues before it drops: ``tbf_latency_ms`` of line rate.

        Why this deep: the uplink's tbf stands for the host's transmit queue, which TCP's
        small-queue limit keeps far from its 1000 packets, so a host does not drop its own
        packets; the downlink's tbf stands for the switch port of a lossless training fabric
        (InfiniBand credits, RoCE PFC), which pauses senders instead of dropping. At 100 ms
        (2.5 MB at 200 Mbit/s) the emulation dropped where neither would: All2Alls of 16 MiB per
        rank on 4 x 2 lost 549 frames (flat) and 7664 (the inter-node hop on four connections)
        in five dispatches, in both queues, and TCP retransmitted them; at 1 s nothing was
        dropped (benchmarks/link_bench.py, docs/benchmarks.md).
        """
        limit = int(self.rate_bytes_per_s * self.tbf_latency_ms / 1e3) + self.tbf_burst_bytes
        return min(limit, 2**32 - 1)  # tc keeps it in a u32


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {err.stderr.strip()}") from None
    return done.stdout


def check_privileges() -> None:
    """Raise :class:`ClusterError` saying exactly what is missing to build namespaces."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(
            f"the emulated cluster needs iproute2 ({', '.join(missing)} not found on PATH); "
            "install it (apt-get install iproute2)"
        )
    if os.geteuid() != 0:
        raise ClusterError(
            "the emulated cluster creates network namespaces, veth pairs, a bridge and tc qdiscs, which "
            "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); rerun as root, e.g. "
            f"`sudo {shutil.which('smile') or 'smile'} cluster ...`"
        )


def namespaces() -> list[str]:
    """Names of the network namespaces on this machine."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove namespaces and bridges of emulated clusters whose creating process is gone."""
    removed = []
    for ns in namespaces():
        match = _NS_RE.match(ns)
        if match and not _pid_alive(int(match.group(1))):
            _ip("netns", "delete", ns)
            removed.append(ns)
    for line in _ip("-o", "link", "show", "type", "bridge").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = re.fullmatch(r"smb(\d+)", name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "delete", name)
            removed.append(name)
    return removed


@dataclass
class EmulatedCluster:
    """Context manager: builds the namespaces on enter, removes everything on exit."""

    config: ClusterConfig
    _created_ns: list[str] = field(default_factory=list, init=False)
    _bridge: str | None = field(default=None, init=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False)

    @property
    def tag(self) -> str:
        return str(os.getpid())

    def namespace(self, node: int) -> str:
        return f"smile-{self.tag}-{node}"

    def address(self, node: int) -> str:
        return f"{self.config.subnet}.{node + 1}"

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        check_privileges()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _build(self) -> None:
        cfg = self.config
        self._bridge = f"smb{self.tag}"
        _ip("link", "add", self._bridge, "type", "bridge")
        _ip("link", "set", self._bridge, "mtu", str(cfg.mtu), "up")
        for node in range(cfg.nodes):
            ns, host_end, ns_end = self.namespace(node), f"smv{self.tag}h{node}", f"smv{self.tag}n{node}"
            _ip("netns", "add", ns)
            self._created_ns.append(ns)
            mtu = ("mtu", str(cfg.mtu))
            _ip("link", "add", host_end, *mtu, "type", "veth", "peer", "name", ns_end, *mtu)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("-n", ns, "link", "set", ns_end, "name", IFACE)
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("link", "set", host_end, "master", self._bridge)
            _ip("link", "set", host_end, "up")
            self._shape(ns, IFACE)  # node -> network
            self._shape(None, host_end)  # network -> node

    def _shape(self, ns: str | None, dev: str) -> None:
        cfg = self.config
        cmd = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{cfg.rate_mbit}mbit",
               "burst", str(cfg.tbf_burst_bytes), "limit", str(cfg.tbf_limit_bytes)]  # fmt: skip
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ClusterError(
                f"`{' '.join(cmd)}` failed: {done.stderr.strip()} (the kernel needs the sch_tbf qdisc)"
            )

    def teardown(self) -> None:
        """Stop our processes, then delete our namespaces (and their veths) and the bridge."""
        self.terminate()
        errors = []
        for ns in reversed(self._created_ns):
            try:
                _ip("netns", "delete", ns)
            except ClusterError as err:
                errors.append(str(err))
        self._created_ns.clear()
        for line in _ip("-o", "link", "show").splitlines():  # a veth whose namespace was never made
            name = line.split(":")[1].strip().split("@")[0]
            if re.fullmatch(rf"smv{self.tag}[hn]\d+", name):
                try:
                    _ip("link", "delete", name)
                except ClusterError as err:
                    if "Cannot find device" not in str(err):  # its namespace's deletion took it
                        errors.append(str(err))
        if self._bridge is not None:
            try:
                _ip("link", "delete", self._bridge)
            except ClusterError as err:
                errors.append(str(err))
            self._bridge = None
        if errors:
            raise ClusterError("teardown incomplete:\n" + "\n".join(errors))

    # ---- running -----------------------------------------------------------------------------
    def node_env(self, node: int) -> dict[str, str]:
        """Environment of a process on ``node``: gloo's interface and where node 0 listens."""
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(
            GLOO_SOCKET_IFNAME=IFACE,
            NODE_RANK=str(node),
            NNODES=str(self.config.nodes),
            MASTER_ADDR=self.address(0),
            MASTER_PORT=str(self.config.master_port),
            SMILE_CLUSTER_RATE_MBIT=str(self.config.rate_mbit),
            SMILE_CLUSTER_MTU=str(self.config.mtu),
        )
        return env

    def torchrun_argv(self, node: int, argv: Sequence[str]) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(cfg.nodes), "--nproc-per-node", str(cfg.procs_per_node),
                "--node-rank", str(node), "--master-addr", self.address(0),
                "--master-port", str(cfg.master_port), "--max-restarts", "0", *argv]  # fmt: skip

    def popen(self, node: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace, in its own session (so Ctrl-C is ours)."""
        if not self._created_ns:
            raise ClusterError("the cluster is not up: use it as `with EmulatedCluster(config) as cluster:`")
        kwargs.setdefault("env", self.node_env(node))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(node), *argv], start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        torchrun: bool = True,
        timeout: float | None = None,
        out: TextIO | None = None,
    ) -> int:
        """Run ``argv`` on every node (under torchrun unless ``torchrun=False``); return the worst exit code.

        Output lines are prefixed with the node. If a node fails, the others get a grace period
        and are then stopped; on ``timeout`` or Ctrl-C every process is stopped.
        """
        out = out or sys.stdout
        procs, pumps = [], []
        lock = threading.Lock()
        for node in range(self.config.nodes):
            cmd = self.torchrun_argv(node, argv) if torchrun else list(argv)
            proc = self.popen(
                node, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(proc, f"[node {node}] ", out, lock), daemon=True)
            pump.start()
            pumps.append(pump)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if any(p.returncode not in (None, 0) for p in procs):
                    deadline = min(deadline or now + 30.0, now + 30.0)
                if deadline is not None and now > deadline:
                    self.terminate()
                    break
                time.sleep(0.2)
        finally:
            if any(p.poll() is None for p in procs):
                self.terminate()
            for pump in pumps:
                pump.join(timeout=5)
        codes = [p.returncode for p in procs]
        return max(codes, key=lambda c: (c != 0, abs(c)))

    def terminate(self, grace: float = 10.0) -> None:
        """SIGTERM then SIGKILL the process group of every process this cluster started."""
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self._procs = [p for p in self._procs if p.poll() is None]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session
    except ProcessLookupError:
        pass


def _pump(proc: subprocess.Popen, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            out.write(prefix + line)
            out.flush()


def raise_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``with EmulatedCluster`` blocks tear down."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_ranks(
    fn: Callable[..., Any], nodes: int, gpus_per_node: int, *args: Any, timeout: float = 600.0
) -> list[Any] | None:
    """Run ``fn(topology, *args)`` on every rank; return all ranks' results on rank 0.

    Under torchrun the layout comes from its environment (``nodes``/``gpus_per_node`` are
    ignored), the backend is NCCL when CUDA is available and gloo otherwise, and ranks other than
    0 get None. Outside torchrun it simulates ``nodes x gpus_per_node`` with
    :func:`smile.testing.run_distributed` (gloo, unshaped loopback).
    """
    if not under_torchrun():
        from smile.testing import run_distributed

        return run_distributed(fn, nodes, gpus_per_node, *args, timeout=timeout)
    import torch
    import torch.distributed as dist

    from smile.moe.topology import Topology, start_process_group

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start_process_group("auto", timeout)
    try:
        result = fn(Topology.from_env(), *args)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(result, gathered if dist.get_rank() == 0 else None, dst=0)
        return gathered if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def report_layout(world: int, gpus_per_node: int, load_start: tuple[float, ...]) -> tuple[dict, dict]:
    """The layout (nodes, gpus_per_node, world) and environment of a finished benchmark run."""
    import torch

    from smile.moe.topology import Topology

    local = Topology.from_env().gpus_per_node if under_torchrun() else gpus_per_node
    backend = "nccl" if under_torchrun() and torch.cuda.is_available() else "gloo"
    env = {
        **describe_environment(backend),
        "layout": f"{world // local} nodes x {local} ranks",
        "loadavg_start": list(load_start),
    }
    return {"nodes": world // local, "gpus_per_node": local, "world": world}, env


def describe_environment(backend: str) -> dict[str, Any]:
    """Machine, date, load, software and network of this run, for benchmark reports."""
    import platform
    from datetime import datetime, timezone

    import torch

    rate = os.environ.get("SMILE_CLUSTER_RATE_MBIT")
    if rate:
        mtu = os.environ.get("SMILE_CLUSTER_MTU", "1500")
        network = f"emulated: tc tbf {rate} Mbit/s per node uplink, MTU {mtu}, loopback inside a node"
    elif under_torchrun():
        network = "torchrun cluster (real network)"
    else:
        network = "one machine, unshaped loopback (nodes simulated by process groups)"
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "loadavg": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "backend": backend,
        "network": network,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()
