"""A runtime an operator can trust: resume takes the newest checkpoint that verifies (broken ones
skipped with a warning, also under torchrun restarts), a run directory is locked against a second
job (stale locks taken over), a step of another run is never replaced, and a crash's leftovers
are cleaned by the next start.

This file is also the job torchrun runs (``python tests/runtime/test_checkpoint_reliability.py RUN_DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smile.runtime import checkpoint as ckpt
from smile.runtime import lock as run_lock

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Checkpoint directories, in process.
# ---------------------------------------------------------------------------------------------
def _save(root: Path, step: int, run_id: str | None = "run-a") -> Path:
    stage = ckpt.staging_dir(root, step)
    stage.mkdir(parents=True, exist_ok=True)
    files = {
        "model.safetensors": ckpt.write_tensors(stage, "model.safetensors", {"w": torch.full((4,), step)}),
        "rank0.json": ckpt.write_json(stage, "rank0.json", {"step": step}),
    }
    return ckpt.commit(root, step, files, {"run_id": run_id})


def test_latest_verified_skips_every_broken_checkpoint_with_its_reason(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step)
    (root / "step_00000004" / "model.safetensors").write_bytes(b"truncated")  # size + sha mismatch
    (root / "step_00000003" / "rank0.json").unlink()  # a missing shard
    (root / "step_00000005").mkdir()  # no manifest: never loaded silently
    (root / "step_00000005" / "model.safetensors").write_bytes(b"x")

    found, manifest, skipped = ckpt.latest_verified(root)
    assert found.name == "step_00000002" and manifest["step"] == 2
    assert [p.name for p, _ in skipped] == ["step_00000005", "step_00000004", "step_00000003"]
    reasons = dict((p.name, why) for p, why in skipped)
    assert "manifest.json is missing" in reasons["step_00000005"]
    assert "fails verification" in reasons["step_00000004"] and "9 bytes" in reasons["step_00000004"]
    assert "missing shard 'rank0.json'" in reasons["step_00000003"]

    assert ckpt.latest_verified(tmp_path / "nothing") == (None, None, [])


def test_commit_never_replaces_a_step_of_another_run(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4, run_id="run-a")
    _save(root, 4, run_id="run-a")  # the same run re-saving its own step is fine
    with pytest.raises(ckpt.CheckpointError, match="written by run 'run-a', this run is 'run-b'"):
        _save(root, 4, run_id="run-b")
    assert ckpt.verify_all(root / "step_00000004")["run_id"] == "run-a"  # untouched

    (root / "step_00000008").mkdir()  # not provably anyone's: refused, not deleted
    with pytest.raises(ckpt.CheckpointError, match="no readable manifest"):
        _save(root, 8, run_id="run-a")
    assert (root / "step_00000008").is_dir()
    assert ckpt.owner_conflict(root, 12, "run-a") is None


def test_clean_leftovers_removes_staging_dirs_and_partial_files(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    good = _save(root, 2)
    ckpt.staging_dir(root, 3).mkdir()
    (ckpt.staging_dir(root, 3) / "rank0.safetensors.partial").write_bytes(b"\0")
    (good / "rank0.json.partial").write_bytes(b"\0")
    (tmp_path / "run" / "metrics.jsonl.partial").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="smile.runtime.checkpoint"):
        removed = ckpt.clean_leftovers(root, tmp_path / "run")
    assert {p.name for p in removed} == {"step_00000003.tmp", "rank0.json.partial", "metrics.jsonl.partial"}
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert ckpt.verify_all(good)
    assert "leftover" in caplog.text and "step_00000003.tmp" in caplog.text
    assert ckpt.clean_leftovers(root) == []


# ---------------------------------------------------------------------------------------------
# The run-directory lock, in process.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def job(monkeypatch):
    """Set this process's job identity (as a launcher would)."""
    for key in ("SMILE_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)

    def become(name: str) -> None:
        monkeypatch.setenv("SMILE_JOB_ID", name)

    return become


def test_second_job_fails_at_once_naming_the_holder(tmp_path, job):
    job("job-1")
    held = run_lock.acquire(tmp_path / "run", heartbeat_s=0)
    record = json.loads((tmp_path / "run" / "run.lock").read_text())
    assert record["job_id"] == "job-1" and record["pid"] == os.getpid()

    job("job-2")
    with pytest.raises(run_lock.RunLockedError) as err:
        run_lock.acquire(tmp_path / "run", heartbeat_s=0)
    message = str(err.value)
    assert "\n" not in message
    for part in ("'job-1'", socket.gethostname(), f"pid {os.getpid()}", record["started"], "run.lock"):
        assert part in message
    with pytest.raises(run_lock.RunLockedError):
        run_lock.check(tmp_path / "run")  # the launcher's read-only preflight says the same

    job("job-1")  # a restarted attempt of the same job re-takes its own lock
    again = run_lock.acquire(tmp_path / "run", heartbeat_s=0)
    assert not held.held() and again.held()
    again.release()
    assert not (tmp_path / "run" / "run.lock").exists()
    job("job-2")
    assert run_lock.check(tmp_path / "run") is None
    run_lock.acquire(tmp_path / "run", heartbeat_s=0).release()


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, job, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"job_id": "crashed", "host": socket.gethostname(), "pid": dead.pid, "started": "yesterday"}
    (run_dir / "run.lock").write_text(json.dumps(holder))
    job("job-2")
    with caplog.at_level(logging.WARNING, logger="smile.runtime.lock"):
        taken = run_lock.acquire(run_dir, heartbeat_s=0)
    assert taken.held()
    assert (
        "stale" in caplog.text
        and "'crashed'" in caplog.text
        and f"pid {dead.pid} is not running" in caplog.text
    )
    taken.release()

    # Another host's job: alive as far as we can tell until its heartbeat is too old.
    holder = {"job_id": "elsewhere", "host": "node-17", "pid": 1, "started": "today"}
    (run_dir / "run.lock").write_text(json.dumps(holder))
    with pytest.raises(run_lock.RunLockedError, match="node-17"):
        run_lock.acquire(run_dir, stale_after=60, heartbeat_s=0)
    old = time.time() - 120
    os.utime(run_dir / "run.lock", (old, old))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smile.runtime.lock"):
        taken = run_lock.acquire(run_dir, stale_after=60, heartbeat_s=0)
    assert "heartbeat is 120s old" in caplog.text
    taken.release()


def test_heartbeat_and_job_identity_across_torchrun_restarts(tmp_path, job, monkeypatch):
    monkeypatch.delenv("SMILE_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv-42")
    assert run_lock.job_id() == "torchrun:rdzv-42"  # not the worker pid: a restart is the same job
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default rdzv id: key on the agent
    assert run_lock.job_id() == f"torchrun-agent:{socket.gethostname()}:{os.getppid()}"

    job("job-1")
    held = run_lock.acquire(tmp_path, heartbeat_s=0.05)
    old = time.time() - 1000
    os.utime(held.path, (old, old))
    time.sleep(0.5)
    assert time.time() - held.path.stat().st_mtime < 5
    held.release()
    assert not held.path.exists()


# ---------------------------------------------------------------------------------------------
# The Trainer, one spawned process: resume fallback, leftovers, lock, another run's step.
# ---------------------------------------------------------------------------------------------
def _config(run_dir, max_steps, **checkpoint):
    from smile.runtime import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig

    return TrainConfig(
        run_dir=str(run_dir),
        max_steps=max_steps,
        zero_stage=2,
        grad_accum_steps=1,
        micro_batch_size=8,
        optimizers=[OptimizerConfig(lr=2e-2)],
        checkpoint=CheckpointConfig(**{"every": 4, "keep_last": 5, **checkpoint}),
        log=LogConfig(every=4, progress_bar=False, plot=False),
    )


def _trainer(topo, run_dir, max_steps, trainer_cls=None, **checkpoint):
    from smile.runtime import Trainer
    from tests.runtime.test_trainer import Regression, ToyMoE, toy_loss

    torch.manual_seed(0)
    cls = trainer_cls or Trainer
    model = ToyMoE(topo.ep_rank, topo.ep_size)
    return cls(
        model,
        toy_loss,
        _config(run_dir, max_steps, **checkpoint),
        lambda r, w: Regression(100 + r),
        topology=topo,
    )


def trainer_job(topo, tmp: str) -> dict:
    run_dir = Path(tmp) / "run"
    root = run_dir / "checkpoints"
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("smile").addHandler(Collect(logging.WARNING))
    out: dict = {}

    first = _trainer(topo, run_dir, 8)
    first.fit()
    out["lock_during_run"] = json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    first.close()
    out["lock_after_close"] = (run_dir / "run.lock").exists()
    run_id = ckpt.read_manifest(root / "step_00000008")["run_id"]

    # The newest checkpoint is corrupt, a newer dir has no manifest, a crash left debris.
    data = bytearray((root / "step_00000008" / "rank0.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "step_00000008" / "rank0.safetensors").write_bytes(bytes(data))
    (root / "step_00000010").mkdir()
    ckpt.staging_dir(root, 9).mkdir()
    (ckpt.staging_dir(root, 9) / "rank0.safetensors.partial").write_bytes(b"\0" * 64)

    # Another live job holds the run dir: refused at once, nothing cleaned, nothing written.
    other = {"job_id": "other-job", "host": socket.gethostname(), "pid": os.getppid(), "started": "t0"}
    (run_dir / "run.lock").write_text(json.dumps(other))  # pytest's own process: alive
    try:
        _trainer(topo, run_dir, 12)
    except run_lock.RunLockedError as err:
        out["locked_error"] = str(err)
    out["debris_kept_while_locked"] = ckpt.staging_dir(root, 9).is_dir()
    (run_dir / "run.lock").unlink()

    messages.clear()
    second = _trainer(topo, run_dir, 12)
    out["debris_after_start"] = sorted(p.name for p in root.iterdir())
    result = second.fit()
    out["resumed_from"] = result.resumed_from
    out["warnings"] = list(messages)
    out["step"] = result.step
    out["run_ids"] = {
        p.name: ckpt.verify_all(p)["run_id"]
        for p in ckpt.complete_checkpoints(root)
        if p.name != "step_00000010"
    }
    out["run_id"] = run_id
    second.close()

    # A fresh run (resume=never) into the same checkpoint dir may not replace the old run's steps.
    fresh = _trainer(topo, run_dir, 4, resume="never")
    try:
        fresh.fit()
    except ckpt.CheckpointError as err:
        out["other_run_error"] = str(err)
    out["step4_run_id"] = ckpt.verify_all(root / "step_00000004")["run_id"]
    fresh.close()
    return out


@pytest.mark.slow
def test_trainer_falls_back_locks_and_protects_other_runs(tmp_path):
    from smile.testing import run_distributed

    (out,) = run_distributed(trainer_job, 1, 1, str(tmp_path), timeout=150)
    assert out["lock_during_run"] and not out["lock_after_close"]

    assert "in use by job 'other-job'" in out["locked_error"] and "pid" in out["locked_error"]
    assert out["debris_kept_while_locked"]
    assert "step_00000009.tmp" not in out["debris_after_start"]

    assert out["resumed_from"].endswith("step_00000004") and out["step"] == 12
    skipped = [m for m in out["warnings"] if m.startswith("resume: skipping checkpoint")]
    assert len(skipped) == 2
    assert "step_00000010" in skipped[0] and "manifest.json is missing" in skipped[0]
    assert "step_00000008" in skipped[1] and "fails verification" in skipped[1]
    assert any("leftover" in m and "step_00000009.tmp" in m for m in out["warnings"])
    # The resumed run is the same run: it re-saved its corrupt step 8 and went on.
    assert set(out["run_ids"].values()) == {out["run_id"]}
    assert set(out["run_ids"]) == {"step_00000004", "step_00000008", "step_00000012"}

    assert "refusing to replace" in out["other_run_error"] and out["run_id"] in out["other_run_error"]
    assert out["step4_run_id"] == out["run_id"]


# ---------------------------------------------------------------------------------------------
# torchrun: the newest checkpoint is corrupt when the job dies; one restart is enough.
# ---------------------------------------------------------------------------------------------
STEPS, EVERY, CORRUPT_AT = 12, 4, 8


def main(run_dir: str) -> None:
    """First attempt: after step CORRUPT_AT's checkpoint, rank 0 truncates a shard of it and
    rank 1 is SIGKILLed. The restart must fall back to step EVERY at once."""
    import torch.distributed as dist

    from smile.moe.topology import stop_process_group
    from smile.runtime import Trainer, init_distributed

    class Faulty(Trainer):
        def save_checkpoint(self):
            path = super().save_checkpoint()
            if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and self.step == CORRUPT_AT:
                if self.rank == 0:
                    with open(path / "model.safetensors", "r+b") as fh:
                        fh.truncate(16)
                dist.barrier()
                if self.rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            return path

    topology = init_distributed()
    trainer = _trainer(topology, run_dir, STEPS, trainer_cls=Faulty, every=EVERY)
    result = trainer.fit()
    if topology.rank == 0:
        out = {
            "resumed_from": result.resumed_from,
            "step": result.step,
            "restarts": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
        }
        (Path(run_dir) / "result.json").write_text(json.dumps(out))
    stop_process_group()


@pytest.mark.slow
def test_torchrun_restart_skips_a_corrupt_newest_checkpoint_on_the_first_retry(tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "1", "--monitor-interval", "0.5", __file__, str(run_dir)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["restarts"] == 1 and result["step"] == STEPS
    assert result["resumed_from"].endswith(f"step_{EVERY:08d}")
    assert f"resume: skipping checkpoint {run_dir / 'checkpoints' / f'step_{CORRUPT_AT:08d}'}" in proc.stderr
    # The restart re-took its job's lock, re-saved its own corrupt step, and released the lock.
    for step in (EVERY, CORRUPT_AT, STEPS):
        ckpt.verify_all(run_dir / "checkpoints" / f"step_{step:08d}")
    assert not (run_dir / "run.lock").exists()


if __name__ == "__main__":
    main(sys.argv[1])
