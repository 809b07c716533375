"""Supervision of `smile train` workers under torchrun: the one-line report names the rank that
failed (or stalled) first and its log, and workers die with their agent.

The rules are unit-tested on fake records; four end-to-end runs of `smile train --nproc 2` on the
tiny job (each a few seconds of training, stopped from outside with signals) check the whole path:
a SIGKILLed rank, two ranks failing at different times, a SIGSTOPped rank, a SIGKILLed agent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smile.runtime import supervision
from smile.runtime.supervision import Beat, Failure, first_failure, root_cause, stalled_rank
from tests.pretrain.test_pretrain import SMALL as PRETRAIN_SMALL

ROOT = Path(__file__).resolve().parents[2]
SMALL = [*PRETRAIN_SMALL, "train.log.plot=false", "train.max_steps=100000"]
KILL, TERM = -int(signal.SIGKILL), -int(signal.SIGTERM)


# ---- the rules, on fake records --------------------------------------------------------------------
def test_first_failure_is_the_earliest_not_the_first_listed_nor_the_lowest_rank():
    failures = {
        0: Failure(0, 1, time=105.0, exact=True, message="RuntimeError: bad batch"),
        3: Failure(3, 1, time=102.5, exact=True, message="ValueError: nan loss"),
        2: Failure(2, TERM, time=106.0),  # the agent's teardown
    }
    assert first_failure(failures) == 3
    # A peer that only noticed the failure is a consequence, even when its record is earlier than
    # the agent's detection time of a death that left no record (torchrun's timestamp for it).
    failures = {
        0: Failure(0, 1, time=100.2, exact=True, message="RuntimeError: [gloo] Connection closed by peer"),
        1: Failure(1, KILL, time=101.0),
    }
    assert first_failure(failures) == 1
    # A death without a record is dated by its last sign of life when heartbeats are known.
    failures = {0: Failure(0, KILL, time=101.0), 1: Failure(1, KILL, time=101.0)}
    beats = {0: Beat(0, 7, 100.4, 100.9), 1: Beat(1, 7, 100.4, 100.5)}
    assert first_failure(failures, beats) == 1
    assert first_failure({0: Failure(0, KILL, 5.0), 1: Failure(1, KILL, 5.0)}) == 0  # tie: lower rank
    # Only SIGTERMs: no consequence left to exclude, the earliest one.
    assert first_failure({0: Failure(0, TERM, 9.0), 1: Failure(1, TERM, 8.0)}) == 1


def test_stalled_rank_is_the_one_that_stopped_not_the_one_that_timed_out():
    # Rank 1 froze at t=100; rank 0 waited in a collective (alive) until its timeout at t=105.
    beats = {0: Beat(0, 7, 99.9, 105.0), 1: Beat(1, 7, 99.9, 100.0)}
    failures = {
        0: Failure(0, 1, 105.0, True, "RuntimeError: Timed out waiting 5000ms"),
        1: Failure(1, TERM, 106.0),
    }
    assert stalled_rank(beats) == 1
    assert root_cause(failures, beats) == (1, True)
    # A step behind every other rank and silent no later than them: it never finished that step.
    assert (
        stalled_rank({0: Beat(0, 8, 100.0, 100.6), 1: Beat(1, 7, 99.8, 100.5), 2: Beat(2, 8, 100, 100.6)})
        == 1
    )
    # Nobody clearly lags (all died within the margin): no stalled rank, the first failure decides.
    beats = {0: Beat(0, 7, 99.9, 100.3), 1: Beat(1, 7, 99.9, 100.0)}
    assert stalled_rank(beats) is None
    assert root_cause({0: Failure(0, KILL, 101.0), 1: Failure(1, KILL, 101.0)}, beats) == (1, False)
    # A rank that finished cleanly long ago is not a suspect, nor is a lone heartbeat.
    beats = {0: Beat(0, 9, 50.0, 50.0), 1: Beat(1, 7, 99.9, 100.0), 2: Beat(2, 7, 99.9, 100.1)}
    assert stalled_rank(beats, among={1, 2}) is None
    assert stalled_rank({1: Beat(1, 7, 99.9, 10.0)}) is None


def test_heartbeats_are_written_under_torchrun_and_read_back(tmp_path, monkeypatch):
    supervision.heartbeat(tmp_path, 0, 1)
    assert not (tmp_path / "heartbeats").exists()  # not under torchrun: nothing written
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    supervision.heartbeat(tmp_path, 0, 5)
    supervision.heartbeat(tmp_path, 0, 6)
    supervision.heartbeat(tmp_path, 1, 6)
    (tmp_path / "heartbeats" / "rank_2").write_text(
        json.dumps({"rank": 2, "step": 3, "time": 1.0, "attempt": 0})
    )
    beats = supervision.read_heartbeats(tmp_path)
    assert sorted(beats) == [0, 1] and beats[0].step == 6 and beats[0].attempt == 1  # attempt 0 is stale
    assert supervision.agent_alive()  # not installed, no agent pid: nothing says it is gone


# ---- end to end: `smile train --nproc 2` -------------------------------------------------------------
class Job:
    """`smile train --nproc 2` in the background, its workers found through /proc."""

    def __init__(self, tmp_path: Path, cache_dir: str, *more: str) -> None:
        self.run_dir = tmp_path / "run"
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        cmd = [
            sys.executable, "-m", "smile.cli", "train", "--nproc", "2",
            *SMALL, f"data.cache_dir={cache_dir}", f"train.run_dir={self.run_dir}", *more,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        self.workers: dict[int, int] = {}

    def wait_steps(self, steps: int, timeout: float = 120.0) -> dict[int, int]:
        """Wait until both ranks finished ``steps`` steps; returns rank -> pid."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"no step {steps} after {timeout} s\n{self.text()}"
            beats = supervision.read_heartbeats(self.run_dir)
            if len(beats) == 2 and min(b.step for b in beats.values()) >= steps:
                break
            time.sleep(0.1)
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.workers = {r: p for p in map(int, children) if (r := _rank_of(p)) is not None}
        assert sorted(self.workers) == [0, 1], children
        return self.workers

    def finish(self, timeout: float = 90.0) -> str:
        self.proc.wait(timeout=timeout)
        return self.text()

    def text(self) -> str:
        return self.out.read_text()[-3000:] + self.err.read_text()[-3000:]

    def report(self) -> str:
        lines = [ln for ln in self.err.read_text().splitlines() if ln.startswith("smile train: error:")]
        assert len(lines) == 1, self.text()
        return lines[0]

    def close(self) -> None:
        for pid in [self.proc.pid, *self.workers.values()]:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@pytest.fixture
def job_factory(tmp_path, cache_dir):
    jobs: list[Job] = []

    def start(*more: str) -> Job:
        jobs.append(Job(tmp_path, cache_dir, *more))
        return jobs[-1]

    yield start
    for job in jobs:
        job.close()


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _state(pid: int) -> str:
    """The process's state letter (R, S, T, Z...), "gone" when it no longer exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


def _term_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)", status, re.M)
    return any(int(m, 16) & (1 << (signal.SIGTERM - 1)) for m in masks)


def _log_path(report: str) -> Path:
    match = re.search(r"its log: (\S+)$", report)
    assert match, report
    return Path(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_rank_is_named_with_its_log(job_factory):
    job = job_factory()
    workers = job.wait_steps(3)
    os.kill(workers[1], signal.SIGKILL)
    text = job.finish()
    assert job.proc.returncode != 0, text
    report = job.report()
    assert report.startswith("smile train: error: rank 1 failed first (signal SIGKILL) at "), report
    log = _log_path(report)
    assert log.is_file() and log.is_relative_to(job.run_dir / "logs"), report
    assert "Traceback" not in text.split("smile train: error:")[-1]  # no traceback after the line


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_of_two_failures_the_earlier_is_named(job_factory):
    """Rank 1 is killed; rank 0 fails later on its own (its peer is gone) and records an error.
    The agent is frozen meanwhile, so it sees both failures at once: rank 0's record has the earlier
    timestamp (torchrun stamps rank 1's death with the time it noticed it), yet rank 1 failed first."""
    job = job_factory()
    workers = job.wait_steps(3)
    os.kill(job.proc.pid, signal.SIGSTOP)
    try:
        os.kill(workers[1], signal.SIGKILL)
        _wait_for(lambda: _state(workers[0]) in ("Z", "gone"), 30, "rank 0 failing after rank 1")
        time.sleep(1.2)  # a later second for torchrun's detection stamp
    finally:
        os.kill(job.proc.pid, signal.SIGCONT)
    text = job.finish()
    assert job.proc.returncode != 0, text
    report = job.report()
    assert report.startswith("smile train: error: rank 1 failed first (signal SIGKILL)"), report
    assert _log_path(report).is_file()
    errors = list((job.run_dir / "logs").glob("*/attempt_0/0/error.json"))
    assert errors, "rank 0 did not record its own failure"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_frozen_rank_is_named_not_the_peer_that_timed_out(job_factory):
    job = job_factory("train.dist.timeout_s=4")
    workers = job.wait_steps(3)
    os.kill(workers[1], signal.SIGSTOP)
    # Rank 0 times out in a collective and fails; the agent then SIGTERMs the group, which a stopped
    # process only honours once continued (else the agent waits 30 s, then SIGKILLs it).
    _wait_for(lambda: _state(workers[0]) in ("Z", "gone"), 60, "rank 0 timing out")
    _wait_for(lambda: _term_pending(workers[1]), 30, "the agent's SIGTERM to rank 1")
    os.kill(workers[1], signal.SIGCONT)
    text = job.finish()
    assert job.proc.returncode != 0, text
    report = job.report()
    assert report.startswith("smile train: error: rank 1 stopped making progress first"), report
    assert _log_path(report).is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_die_with_their_agent_and_commit_nothing_after(job_factory):
    job = job_factory("train.checkpoint.every=5", "train.checkpoint.keep_last=1000")
    workers = job.wait_steps(6)  # after a first checkpoint: the run writes one every 0.5 s or so
    committed = job.run_dir / "checkpoints"

    def checkpoints() -> set[str]:
        return {p.parent.name for p in committed.glob("step_*/manifest.json")}

    os.kill(job.proc.pid, signal.SIGKILL)
    before = checkpoints()
    killed = time.monotonic()
    _wait_for(lambda: all(_state(p) in ("Z", "gone") for p in workers.values()), 5, "workers exiting")
    gone_after = time.monotonic() - killed
    time.sleep(1.0)
    assert checkpoints() == before, (before, checkpoints())
    assert gone_after < 5
