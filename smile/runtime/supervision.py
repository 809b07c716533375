"""Supervision of training workers under torchrun: progress heartbeats, dying with the agent, and
the rules that name the rank that failed first.

Worker side (no effect outside torchrun):

* :func:`install` (called by ``init_distributed``) ties the worker's life to its torchrun agent:
  the kernel SIGKILLs the worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and a daemon
  watchdog thread kills it as well when its parent pid changes or the agent pid (``SMILE_AGENT_PID``,
  set by ``smile train``'s launcher) is gone, in case the death signal was lost (the agent died
  before it was set, a wrapper process sits between them, not Linux). A worker whose agent died
  would otherwise go on training, and writing checkpoints, as an orphan.
* :func:`agent_alive` / :func:`ensure_agent_alive`: the Trainer checks it right before it commits a
  checkpoint, so an orphan never commits one.
* :func:`heartbeat` (the Trainer calls it after every step) writes ``<run_dir>/heartbeats/rank_R``:
  ``{"rank", "step", "time", "attempt", "pid"}`` (a small file replaced atomically, no fsync). The
  watchdog thread also bumps the file's mtime every :data:`BEAT_INTERVAL_S` while the process runs,
  so the mtime is the rank's last sign of life even while it waits in a collective.

Launcher side (pure functions on records, see :func:`stalled_rank` and :func:`first_failure`):
after a failed run the launcher reads the heartbeats and its failure records and names one rank.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_DIR = "heartbeats"
BEAT_INTERVAL_S = 0.25
"""How often the watchdog checks the agent and refreshes this rank's heartbeat mtime."""
STALL_MARGIN_S = 2.0
"""A rank "clearly lags" when its last sign of life is this much older than every other rank's."""
AGENT_PID_ENV = "SMILE_AGENT_PID"
_PR_SET_PDEATHSIG = 1
# Error messages of a rank that only noticed another rank's failure (gloo, NCCL, the store).
_PEER_ERRORS = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "read error",
    "distbackenderror",
    "watchdog caught collective",
    "communicator was aborted",
)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


# ---- worker side: die with the agent ---------------------------------------------------------------
@dataclass
class _Watch:
    parent: int
    agent: int
    beats: list[Path]
    thread: threading.Thread | None = None


_watch: _Watch | None = None
_lock = threading.Lock()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def install() -> bool:
    """Tie this worker to its torchrun agent (idempotent; no-op outside torchrun); True if active.

    The parent-death signal is SIGKILL: an orphan must not run another line of training code.
    """
    global _watch
    if not _under_torchrun():
        return False
    with _lock:
        if _watch is not None:
            return True
        parent = os.getppid()
        agent = int(os.environ.get(AGENT_PID_ENV, parent))
        _watch = _Watch(parent=parent, agent=agent, beats=[])
        set_parent_death_signal(signal.SIGKILL)
        if not agent_alive():  # the agent died before the death signal was set
            _die()
        _watch.thread = threading.Thread(target=_watchdog, name="smile-watchdog", daemon=True)
        _watch.thread.start()
    return True


def agent_alive() -> bool:
    """False when this worker's torchrun agent is gone (always True outside torchrun)."""
    watch = _watch
    if watch is None:
        if not _under_torchrun() or AGENT_PID_ENV not in os.environ:
            return True
        return pid_alive(int(os.environ[AGENT_PID_ENV]))
    return os.getppid() == watch.parent and pid_alive(watch.agent)


def ensure_agent_alive(action: str) -> None:
    """Raise instead of doing ``action`` (e.g. committing a checkpoint) when the agent is gone."""
    if not agent_alive():
        raise RuntimeError(f"the torchrun agent of this worker is gone; refusing to {action}")


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die() -> None:
    rank = os.environ.get("RANK", "?")
    print(f"smile: rank {rank}: its torchrun agent is gone; exiting", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _watchdog() -> None:
    while True:
        time.sleep(BEAT_INTERVAL_S)
        if not agent_alive():
            _die()
        watch = _watch
        for path in list(watch.beats if watch is not None else ()):
            try:
                os.utime(path)
            except OSError:
                pass


# ---- worker side: heartbeats -----------------------------------------------------------------------
def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank_{rank}"


_written: dict[Path, Path] = {}


def heartbeat(run_dir: str | Path, rank: int, step: int) -> None:
    """Record that ``rank`` finished ``step`` (under torchrun only; cheap: one small file, no fsync)."""
    if not _under_torchrun():
        return
    path = heartbeat_path(run_dir, rank)
    tmp = _written.get(path)
    if tmp is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _written[path] = path.with_name(f".{path.name}.tmp")
    record = {
        "rank": rank,
        "step": step,
        "time": time.time(),
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "pid": os.getpid(),
    }
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    watch = _watch
    if watch is not None and path not in watch.beats:
        watch.beats.append(path)


# ---- launcher side: reading the records and naming a rank ------------------------------------------
@dataclass(frozen=True)
class Beat:
    """A rank's last heartbeat: ``step`` finished at ``step_time``; alive until ``alive_time``."""

    rank: int
    step: int
    step_time: float
    alive_time: float
    attempt: int = 0


@dataclass(frozen=True)
class Failure:
    """One failed worker as the launcher saw it.

    ``time``: when it failed; exact (``exact=True``) when the worker recorded its own error, else
    the agent's detection time (an upper bound: a signal leaves no record). ``exitcode`` < 0 is
    the number of the signal that ended it. ``message``: its error, if it recorded one.
    """

    rank: int
    exitcode: int
    time: float
    exact: bool = False
    message: str = ""

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"


def read_heartbeats(run_dir: str | Path) -> dict[int, Beat]:
    """Every rank's last heartbeat of the latest attempt found under ``run_dir``."""
    beats: dict[int, Beat] = {}
    folder = Path(run_dir) / HEARTBEAT_DIR
    for path in folder.glob("rank_*") if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
            beat = Beat(
                rank=int(record["rank"]),
                step=int(record["step"]),
                step_time=float(record["time"]),
                alive_time=max(path.stat().st_mtime, float(record["time"])),
                attempt=int(record.get("attempt", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        beats[beat.rank] = beat
    latest = max((b.attempt for b in beats.values()), default=0)
    return {r: b for r, b in beats.items() if b.attempt == latest}


def stalled_rank(
    beats: Mapping[int, Beat], among: set[int] | None = None, margin_s: float = STALL_MARGIN_S
) -> int | None:
    """The rank that stopped making progress first, when it clearly lags every other rank; else None.

    The rule, over the ranks with a heartbeat (restricted to ``among``, the failed ranks, when
    given; a rank that finished cleanly is not a suspect), needing at least two of them:

    * the suspect is the rank with the oldest last sign of life (heartbeat mtime, kept fresh by the
      watchdog thread even while the rank waits in a collective), ties broken by the lower step;
    * it clearly lags when its last sign of life is more than ``margin_s`` older than every other
      rank's (it froze or died while its peers kept waiting for it, e.g. until their collective
      timeout), or when it finished fewer steps than every other rank and was seen alive no later
      than any of them (its peers completed a step it never finished).

    A rank that merely noticed a frozen peer (its collective timed out) was alive until then, so it
    never lags the frozen rank: the frozen one is named, not the one that reported the timeout.
    """
    pool = [b for r, b in beats.items() if among is None or r in among]
    if len(pool) < 2:
        return None
    suspect = min(pool, key=lambda b: (b.alive_time, b.step, b.rank))
    others = [b for b in pool if b.rank != suspect.rank]
    silent = all(suspect.alive_time + margin_s < b.alive_time for b in others)
    behind = all(suspect.step < b.step and suspect.alive_time <= b.alive_time for b in others)
    return suspect.rank if silent or behind else None


def is_consequence(failure: Failure, failures: Mapping[int, Failure]) -> bool:
    """True for a failure that follows another rank's: killed by SIGTERM while other ranks failed
    (the agent tears the group down with SIGTERM), or an error saying a peer went away or a
    collective timed out."""
    if failure.exitcode == -signal.SIGTERM and len(failures) > 1:
        return True
    message = failure.message.lower()
    return any(pattern in message for pattern in _PEER_ERRORS)


def failure_time(failure: Failure, beat: Beat | None) -> float:
    """Best estimate of when a rank failed: its own error record's time when it wrote one; for a
    death without a record (a signal), its last sign of life when known (it died within one
    :data:`BEAT_INTERVAL_S` after), otherwise the agent's detection time (torchrun's whole seconds)."""
    if failure.exact or beat is None:
        return failure.time
    return beat.alive_time


def first_failure(failures: Mapping[int, Failure], beats: Mapping[int, Beat] | None = None) -> int:
    """The rank that failed first: the earliest :func:`failure_time` among the failures that are not
    consequences of another (:func:`is_consequence`; all of them if every one is), ties to the lower
    rank. Timestamps alone mislead: torchrun stamps a death without an error file with the time the
    agent noticed it, often later than the error of a peer that noticed first."""
    if not failures:
        raise ValueError("no failures")
    beats = beats or {}
    pool = [f for f in failures.values() if not is_consequence(f, failures)] or list(failures.values())
    return min(pool, key=lambda f: (failure_time(f, beats.get(f.rank)), f.rank)).rank


def root_cause(failures: Mapping[int, Failure], beats: Mapping[int, Beat] | None = None) -> tuple[int, bool]:
    """``(rank, stalled)``: the stalled rank when one clearly lags (:func:`stalled_rank`), else
    the first failure (:func:`first_failure`)."""
    stalled = stalled_rank(beats or {}, among=set(failures))
    if stalled is not None:
        return stalled, True
    return first_failure(failures, beats), False
