"""Fault tolerance under torchrun: one rank is SIGKILLed while a checkpoint is being written;
torchrun (--max-restarts=1) restarts the job, which skips the cut-off checkpoint, resumes from
the last complete one and ends exactly where an uninterrupted run (made afterwards by the same
processes with a fresh Trainer) ends.

This file is also the job torchrun runs (``python tests/runtime/test_fault.py RUN_DIR``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY, KILL_AT = 12, 4, 8


def _train(topology, run_dir: str, inject_fault: bool) -> dict:
    from smile.runtime import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig, Trainer
    from tests.runtime.test_trainer import Regression, ToyMoE, toy_loss

    class FaultyTrainer(Trainer):
        """Dies (SIGKILL, rank 1, first attempt only) after writing its shards of step KILL_AT."""

        def _commit_checkpoint(self, files, meta):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if inject_fault and first_attempt and self.rank == 1 and self.step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
            super()._commit_checkpoint(files, meta)

    torch.manual_seed(0)
    model = ToyMoE(topology.ep_rank, topology.ep_size)
    cfg = TrainConfig(
        run_dir=run_dir,
        max_steps=STEPS,
        zero_stage=2,
        grad_accum_steps=2,
        micro_batch_size=8,
        optimizers=[OptimizerConfig(lr=2e-2)],
        checkpoint=CheckpointConfig(every=EVERY, keep_last=2),
        log=LogConfig(every=4, progress_bar=False, plot=False),
    )
    trainer = FaultyTrainer(model, toy_loss, cfg, lambda r, w: Regression(100 + r), topology=topology)
    result = trainer.fit()
    return {
        "resumed_from": result.resumed_from,
        "losses": result.losses,
        "weights": {k: v.tolist() for k, v in model.state_dict().items()},
        "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }


def main(run_dir: str) -> None:
    """The faulty run, then (same processes, fresh Trainer) an uninterrupted reference run."""
    from smile.moe.topology import stop_process_group
    from smile.runtime import init_distributed

    topology = init_distributed()
    out = {
        "faulty": _train(topology, run_dir, inject_fault=True),
        "reference": _train(topology, str(Path(run_dir) / "reference"), inject_fault=False),
    }
    if topology.rank == 0:
        (Path(run_dir) / "result.json").write_text(json.dumps(out))
    stop_process_group()


def test_sigkill_under_torchrun_resumes_and_matches_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "faulty"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        __file__,
        str(run_dir),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    faulty, reference = result["faulty"], result["reference"]

    assert faulty["restarts"] == 1 and reference["resumed_from"] is None
    # Step 8's checkpoint was cut off (rank 1 died before the manifest): the restart used step 4.
    assert faulty["resumed_from"].endswith(f"step_{EVERY:08d}")
    assert faulty["losses"] == reference["losses"][EVERY:]
    assert faulty["weights"] == reference["weights"]
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [f"step_{KILL_AT:08d}", f"step_{STEPS:08d}"]


if __name__ == "__main__":
    main(sys.argv[1])
