"""On a CUDA device (NCCL, bf16): ZeRO 0 (DeepSpeed's bf16 optimizer), 2 and 3 train, report MFU,
and resume bit-identically from a checkpoint. Runs as its own process (a fresh process group);
this file is also that process's script. Skipped without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _loss_with_tokens(model, batch, ctx):
    from tests.runtime.test_trainer import toy_loss

    loss, metrics = toy_loss(model, batch, ctx)
    return loss, {**metrics, "tokens": batch["x"].shape[0]}  # one "token" per row, for throughput and MFU


def _run(topology, run_dir: Path, zero: int, steps: int, resume: str = "never"):
    from smile.runtime import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig, Trainer
    from tests.runtime.test_trainer import Regression, ToyMoE

    torch.manual_seed(0)
    model = ToyMoE()
    cfg = TrainConfig(
        run_dir=str(run_dir),
        max_steps=steps,
        zero_stage=zero,
        precision="auto",
        grad_accum_steps=2,
        optimizers=[OptimizerConfig(lr=1e-2)],
        checkpoint=CheckpointConfig(every=4, keep_last=2, resume=resume),
        log=LogConfig(every=4, progress_bar=False, plot=False, peak_tflops=None),
        deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    result = Trainer(model, _loss_with_tokens, cfg, lambda r, w: Regression(100 + r), topology=topology).fit()
    return model, result


def main(out_dir: str) -> None:
    from smile.runtime import init_distributed
    from smile.runtime.state import model_state

    topology = init_distributed()
    out = {}
    for zero in (0, 2, 3):
        model, straight = _run(topology, Path(out_dir) / f"z{zero}", zero, 8)
        weights = model_state(model)[0]
        dtype = str(next(p for p in model.parameters()).dtype)
        model, resumed = _run(
            topology,
            Path(out_dir) / f"r{zero}",
            zero,
            8,
            resume=str(Path(out_dir) / f"z{zero}" / "checkpoints" / "step_00000004"),
        )
        again = model_state(model)[0]
        out[zero] = {
            "dtype": dtype,
            "losses": straight.losses,
            "mfu": straight.train_metrics.get("mfu"),
            "resume_equal": resumed.losses == straight.losses[4:]
            and all(torch.equal(v, again[k]) for k, v in weights.items()),
        }
    (Path(out_dir) / "gpu.json").write_text(json.dumps(out))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_gpu_stages_resume_and_mfu(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu.json").read_text())
    for zero in ("0", "2", "3"):
        run = out[zero]
        assert run["dtype"] == "torch.bfloat16", (zero, run)
        assert run["resume_equal"], (zero, run)
        assert run["losses"][-1] < run["losses"][0], (zero, run)
        assert run["mfu"] is not None and 0 < run["mfu"] < 1, (zero, run)


if __name__ == "__main__":
    main(sys.argv[1])
