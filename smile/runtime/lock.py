"""Run-directory lock: one job at a time writes into a run directory.

``<run_dir>/run.lock`` is a JSON holder record (job id, host, pid, start time) created
atomically: the record is written to a private temp file and hard-linked into place, which fails
if the lock exists (the same guarantee as ``O_CREAT | O_EXCL``, and the lock file is never seen
half-written). Checking a holder and taking the lock over happen under an ``fcntl.flock`` on the
run directory, so two jobs cannot both take over the same stale lock. A daemon thread refreshes
the file's mtime (the heartbeat) while the lock is held.

The lock belongs to a *job*, not to a process: a torchrun restart starts new worker processes
that must re-take the lock of their own job. :func:`job_id` is ``SMILE_JOB_ID`` if set, else
torchrun's ``TORCHELASTIC_RUN_ID`` (the same for every attempt of one torchrun job), else the
Slurm job and step, else the torchrun agent on this host (``--rdzv-id`` left at ``none``), else
this process. A lock of another job is taken over, with a warning, when it is stale: its
process (and torchrun agent) is not alive on this host, or its heartbeat is older than
``stale_after`` seconds. Otherwise :class:`RunLockedError` names the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smile.runtime.supervision import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
STALE_AFTER_S = 600.0  # a heartbeat older than this marks a lock of another host's job stale
HEARTBEAT_S = 30.0


class RunLockedError(RuntimeError):
    """The run directory is locked by another job that is still alive."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def job_id() -> str:
    """The identity of the launching job; equal for every torchrun attempt of that job."""
    env = os.environ
    if env.get("SMILE_JOB_ID"):
        return env["SMILE_JOB_ID"]
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    if run_id is not None:  # torchrun without an rdzv id: its agent process survives restarts
        return f"torchrun-agent:{socket.gethostname()}:{os.getppid()}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int | None, start: str | None = None) -> bool:
    """``pid`` exists and, when ``start`` is known, is the same process (not a reused pid)."""
    if not pid or not pid_alive(pid):
        return False
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _record() -> dict[str, Any]:
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return {
        "job_id": job_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "agent_pid": os.getppid() if under_torchrun else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_unix": time.time(),
        "token": uuid.uuid4().hex,
    }


def describe(holder: dict[str, Any]) -> str:
    return (
        f"job {holder.get('job_id')!r} (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"started {holder.get('started')})"
    )


def read_holder(run_dir: str | Path) -> tuple[dict[str, Any] | None, float | None]:
    """The holder record and the heartbeat's age in seconds; ``(None, None)`` if unlocked.
    An unreadable lock file gives ``({}, age)``."""
    path = lock_path(run_dir)
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), age


def stale_reason(holder: dict[str, Any], age: float, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a holder is dead (its process is gone from this host, or its heartbeat is old)."""
    if holder.get("host") == socket.gethostname():
        alive = _pid_alive(holder.get("pid"), holder.get("pid_start")) or _pid_alive(holder.get("agent_pid"))
        if not alive:
            return f"pid {holder.get('pid')} is not running on {holder.get('host')}"
    if age > stale_after:
        return f"its heartbeat is {age:.0f}s old (stale after {stale_after:.0f}s)"
    return None


def _locked_message(run_dir: Path, holder: dict[str, Any], age: float) -> str:
    who = describe(holder) if holder else "an unreadable lock record"
    return (
        f"run dir {run_dir} is in use by {who}, last heartbeat {age:.0f}s ago; stop that job, "
        f"use another run_dir, or delete {lock_path(run_dir)} if that job is gone"
    )


def check(run_dir: str | Path, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """Read-only: raise :class:`RunLockedError` if another live job holds the lock; return the
    holder otherwise (None when unlocked). For a launcher's preflight."""
    run_dir = Path(run_dir)
    holder, age = read_holder(run_dir)
    if holder is None:
        return None
    if holder.get("job_id") != job_id() and stale_reason(holder, age, stale_after) is None:
        raise RunLockedError(_locked_message(run_dir, holder, age))
    return holder


@contextlib.contextmanager
def _guard(run_dir: Path):
    """Exclusive flock on the run directory around check-and-take (best effort where the file
    system refuses flock on a directory: the hard-link create stays atomic)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        yield
    finally:
        os.close(fd)  # releases the flock


def _write_temp(run_dir: Path, record: dict[str, Any]) -> Path:
    temp = run_dir / f".{LOCK_NAME}.{record['token']}.tmp"
    with open(temp, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return temp


@dataclass
class RunLock:
    """A held run-directory lock; :meth:`release` it (idempotent)."""

    run_dir: Path
    record: dict[str, Any]
    heartbeat_s: float = HEARTBEAT_S
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return lock_path(self.run_dir)

    def held(self) -> bool:
        holder, _ = read_holder(self.run_dir)
        return bool(holder) and holder.get("token") == self.record["token"]

    def start_heartbeat(self) -> None:
        if self.heartbeat_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="smile-run-lock", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.held():
                    log.warning("lost the run-dir lock %s to another job; heartbeat stopped", self.path)
                    return
                os.utime(self.path)
            except OSError:
                pass  # a transient file-system error: try again at the next beat

    def release(self) -> None:
        self._stop.set()
        try:
            with _guard(self.run_dir):
                if self.held():
                    self.path.unlink()
        except OSError:
            pass  # the run dir is gone


def acquire(
    run_dir: str | Path, *, stale_after: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S
) -> RunLock:
    """Take the lock of ``run_dir`` for this job (creating the directory), or raise
    :class:`RunLockedError` naming the live holder. Re-takes a lock of the same job (a torchrun
    restart) and takes over a stale one with a warning."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = _record()
    path = lock_path(run_dir)
    temp = _write_temp(run_dir, record)
    try:
        with _guard(run_dir):
            try:
                os.link(temp, path)  # atomic create-if-absent
            except FileExistsError:
                holder, age = read_holder(run_dir)
                if holder is None:  # released between link and read
                    os.link(temp, path)
                elif holder.get("job_id") == record["job_id"]:
                    log.info("re-taking the run-dir lock %s of this job (%s)", path, record["job_id"])
                    os.replace(temp, path)
                else:
                    reason = stale_reason(holder, age, stale_after)
                    if reason is None:
                        raise RunLockedError(_locked_message(run_dir, holder, age)) from None
                    who = describe(holder) if holder else "an unreadable lock record"
                    log.warning("taking over the stale run-dir lock %s of %s: %s", path, who, reason)
                    os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    lock = RunLock(run_dir, record, heartbeat_s)
    lock.start_heartbeat()
    return lock
