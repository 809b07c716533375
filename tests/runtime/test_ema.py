"""EMA weights and the generating eval hook of the runtime (smile.runtime.ema, Trainer):
the EMA recurrence, evaluation with the EMA swapped in (and the weights restored after it),
generate_fn's samples and metrics without disturbing training, EMA files in the checkpoint,
bit-identical crash + resume of weights and EMA, load_ema_weights, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from smile.moe.experts import mark_expert_parameter
from smile.runtime import ConfigError, EMAConfig, TrainConfig
from smile.runtime.ema import EMA
from smile.testing import run_distributed

D = 4


class Toy(nn.Module):
    """A dense layer, one stacked "expert" weight and a frozen scale; the loss adds noise from
    the training RNG so that a disturbed RNG stream would show in the losses."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.experts = mark_expert_parameter(nn.Parameter(torch.randn(2, D, D, generator=gen) * 0.3))
        self.frozen = nn.Parameter(torch.ones(D), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bd,edf->bf", self.inp(x) * self.frozen, self.experts)
        return h.sum(-1)


def toy_loss(model, batch, ctx):
    x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
    return (model(x) - batch["y"]).square().mean()


class Data:
    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(8, D, generator=gen)
            yield {"x": x, "y": x[:, 0] - x[:, 1]}


class Crash(RuntimeError):
    pass


def test_ema_recurrence_start_step_and_swap():
    model = nn.Linear(2, 1)
    ema = EMA(model, EMAConfig(decay=0.5, start_step=1))
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(1)  # up to start_step: a copy
    assert torch.equal(ema.shadow["weight"], torch.full((1, 2), 2.0))
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(2)  # 0.5 * 2 + 0.5 * 4
    assert torch.equal(ema.shadow["weight"], torch.full((1, 2), 3.0))
    with ema.applied():
        assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    assert torch.equal(model.weight, torch.full((1, 2), 4.0))


def test_ema_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.ema\.decay=1\.0 must be in \[0, 1\)"):
        TrainConfig(ema=EMAConfig(decay=1.0)).validate()
    with pytest.raises(ConfigError, match=r"train\.ema needs zero_stage 0, 1 or 2"):
        TrainConfig(zero_stage=3, ema=EMAConfig(decay=0.9)).validate()


def _config(run_dir: Path, ema: float = 0.8, **kw) -> TrainConfig:
    from smile.runtime import CheckpointConfig, LogConfig, OptimizerConfig

    values = dict(
        run_dir=str(run_dir),
        max_steps=8,
        micro_batch_size=8,
        zero_stage=2,
        eval_every=4,
        optimizers=[OptimizerConfig(lr=5e-2)],
        checkpoint=CheckpointConfig(every=4),
        log=LogConfig(every=4, progress_bar=False, plot=False),
        ema=EMAConfig(decay=ema),
    )
    values.update(kw)
    return TrainConfig(**values)


def _run(topo, run_dir: Path, loss_fn=toy_loss, generate=True, **kw):
    from smile.runtime import Trainer

    torch.manual_seed(0)
    model = Toy()
    seen: list[dict] = []

    def generate_fn(model, ctx):
        draw = torch.randn(3)  # its own RNG: must not move the training stream
        seen.append({"step": ctx.step, "inp": model.inp.weight.detach().clone(), "draw": draw})
        return {"gen_metric": float(ctx.step)}, [{"text": f"sample {i}", "step": ctx.step} for i in range(2)]

    trainer = Trainer(
        model, loss_fn, _config(run_dir, **kw), lambda r, w: Data(), topology=topo,
        generate_fn=generate_fn if generate else None,
    )  # fmt: skip
    return trainer, model, trainer.fit(), seen


def ema_job(topo, tmp: str) -> dict:
    from smile.runtime import CheckpointError, load_ema_weights
    from smile.runtime import checkpoint as ckpt

    tmp_path, out = Path(tmp), {}
    trainer, model, result, seen = _run(topo, tmp_path / "a")
    out["losses"], out["eval"] = result.losses, result.eval_metrics
    out["gen_steps"] = [s["step"] for s in seen]
    shadow = trainer.ema.shadow
    out["eval_saw_ema"] = torch.equal(seen[-1]["inp"], shadow["inp.weight"])
    out["ema_differs"] = not torch.equal(shadow["inp.weight"], model.inp.weight)
    out["frozen_not_tracked"] = "frozen" not in shadow
    out["samples"] = (tmp_path / "a" / "samples" / "step_00000008.jsonl").read_text().splitlines()
    out["same_draw"] = torch.equal(seen[0]["draw"], seen[-1]["draw"])  # seeded by step: differs
    final = Path(result.checkpoint)
    files = json.loads((final / ckpt.MANIFEST).read_text())["files"]
    out["files"] = sorted(f for f in files if f.startswith("ema"))

    fresh = Toy()
    out["loaded"] = load_ema_weights(fresh, final)
    out["load_matches"] = torch.equal(fresh.inp.weight, shadow["inp.weight"]) and torch.equal(
        fresh.experts, shadow["experts"]
    )
    # Without the hook, training is the same to the bit: generation runs on its own RNG.
    _, plain_model, plain, _ = _run(topo, tmp_path / "plain", generate=False)
    out["hook_free_same"] = plain.losses == result.losses and torch.equal(
        plain_model.inp.weight, model.inp.weight
    )

    # Crash after step 4's checkpoint, resume: losses, weights and EMA bit-identical.
    def crashing(model, batch, ctx):
        if ctx.step == 5:
            raise Crash("stop")
        return toy_loss(model, batch, ctx)

    with pytest.raises(Crash):
        _run(topo, tmp_path / "b", loss_fn=crashing)
    resumed, resumed_model, r2, _ = _run(topo, tmp_path / "b")
    out["resumed_from"] = r2.resumed_from
    out["resumed_tail"] = r2.losses == result.losses[4:]
    out["resumed_weights"] = all(
        torch.equal(a, b) for a, b in zip(resumed_model.state_dict().values(), model.state_dict().values())
    )
    out["resumed_ema"] = all(torch.equal(resumed.ema.shadow[k], v) for k, v in shadow.items())
    # Another layout (ZeRO-0 instead of 2) reshards: the dense EMA is carried, the experts' restarts.
    from smile.runtime import Trainer

    torch.manual_seed(0)
    other = Toy()
    trainer_z0 = Trainer(
        other, toy_loss, _config(tmp_path / "z0", zero_stage=0), lambda r, w: Data(), topology=topo
    )
    trainer_z0.load_checkpoint(final)
    out["reshard_report"] = trainer_z0.resharded["ema"]
    out["reshard_dense"] = torch.equal(trainer_z0.ema.shadow["inp.weight"], shadow["inp.weight"])
    out["reshard_experts_reset"] = torch.equal(trainer_z0.ema.shadow["experts"], other.experts.detach())
    trainer_z0.close()
    # A checkpoint without EMA cannot resume a run that keeps one.
    _, _, no_ema, _ = _run(topo, tmp_path / "c", ema=0.0, generate=False)
    try:
        _run(topo, tmp_path / "d", checkpoint=_ckpt(no_ema.checkpoint))
        out["no_ema_error"] = None
    except CheckpointError as err:
        out["no_ema_error"] = str(err)
    return out


def _ckpt(path: str):
    from smile.runtime import CheckpointConfig

    return CheckpointConfig(every=4, resume=path)


@pytest.mark.slow
def test_trainer_keeps_ema_in_checkpoints_evaluates_with_it_and_generates(tmp_path):
    out = run_distributed(ema_job, 1, 1, str(tmp_path), timeout=300)[0]
    assert out["gen_steps"] == [4, 8] and out["eval"]["gen_metric"] == 8.0
    assert out["eval_saw_ema"] and out["ema_differs"] and out["frozen_not_tracked"]
    assert [json.loads(line) for line in out["samples"]] == [
        {"text": "sample 0", "step": 8},
        {"text": "sample 1", "step": 8},
    ]
    assert not out["same_draw"]
    assert out["files"] == ["ema-experts-ep0.safetensors", "ema.safetensors"]
    assert out["loaded"] == ["experts", "inp.bias", "inp.weight"] and out["load_matches"]
    assert out["hook_free_same"]
    assert out["resumed_from"].endswith("step_00000004")
    assert out["resumed_tail"] and out["resumed_weights"] and out["resumed_ema"]
    assert out["reshard_report"] == "dense carried" and out["reshard_dense"] and out["reshard_experts_reset"]
    assert "has no EMA weights" in out["no_ema_error"] and "ema.decay=0.8" in out["no_ema_error"]
