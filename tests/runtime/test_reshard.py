"""Resuming a checkpoint on another layout (smile.runtime.reshard), and trainable-only checkpoints.

A smile MoE model (8 experts, dropless top-2: the function does not depend on the layout) trains
on a simulated 4 nodes x 2 GPUs at ZeRO-1 and checkpoints at step 4; the global batch of each step
is the same whatever the world size (each rank takes its share). The checkpoint then resumes on
8x1 with 2-rank expert parallelism at ZeRO-3 (same spawn), 2x2 at ZeRO-2 and 1x1 at ZeRO-0: the
loss of a fixed batch right after the load, the next step's loss, and the weights and optimizer
state (by name) after that step equal the original run's. One spawn per world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from smile.moe.topology import Topology
from smile.testing import run_distributed
from tests.runtime.test_trainer import MoENet

pytestmark = pytest.mark.slow

D, EXPERTS, GLOBAL_BATCH, SAVED, FINAL = 8, 8, 16, 4, 5


def Net(topology: Topology) -> MoENet:  # noqa: N802 - a model class, seeded like one built fresh
    torch.manual_seed(0)
    return MoENet(topology, EXPERTS)


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, D, generator=gen)
    return x, torch.tanh(x[:, :2].sum(-1))


FIXED = _global_batch(-1)


class Shard:
    """This rank's equal share of each step's global batch (the same global data on any world)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __iter__(self):
        size = GLOBAL_BATCH // self.world
        step = 0
        while True:
            x, y = _global_batch(step)
            rows = slice(self.rank * size, (self.rank + 1) * size)
            yield {"x": x[rows], "y": y[rows]}
            step += 1


PROBES: dict[int, float] = {}


def loss_fn(model, batch, ctx):
    if ctx.training and ctx.micro_step == 0 and ctx.step not in PROBES:
        with torch.no_grad():  # the fixed batch's loss with this step's (pre-update) weights
            PROBES[ctx.step] = float((model(FIXED[0]) - FIXED[1]).square().mean())
    return (model(batch["x"]) - batch["y"]).square().mean()


def _config(run_dir, zero, world, **checkpoint):
    from smile.runtime import CheckpointConfig, LogConfig, OptimizerConfig, ScheduleConfig, TrainConfig

    return TrainConfig(
        run_dir=str(run_dir),
        max_steps=FINAL,
        zero_stage=zero,
        micro_batch_size=GLOBAL_BATCH // world,
        grad_clip=1.0,
        optimizers=[
            OptimizerConfig(
                lr=1e-2,
                weight_decay=0.01,
                schedule=ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=10),
            )
        ],
        checkpoint=CheckpointConfig(**checkpoint),
        log=LogConfig(every=1, progress_bar=False, plot=False),
        deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )


def _mean_losses(losses: list[float]) -> list[float]:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, losses)
    return [sum(p[i] for p in parts) / len(parts) for i in range(len(losses))]


def _run(topo, run_dir: Path, zero: int, resume: str) -> dict:
    from smile.runtime import Trainer

    PROBES.clear()
    cfg = _config(run_dir, zero, topo.world_size, every=SAVED, resume=resume)
    trainer = Trainer(Net(topo), loss_fn, cfg, lambda r, w: Shard(r, w), topology=topo)
    result = trainer.fit()
    return {
        "probes": dict(PROBES),
        "losses": _mean_losses(result.losses),
        "resharded": result.resharded,
        "resumed_from": result.resumed_from,
    }


def original_job(topo, tmp: str) -> dict:
    """4x2 ZeRO-1 from scratch to step 5 (checkpoints 4 and 5), then step 4 resumed on 8x1 with
    2-rank expert parallelism at ZeRO-3."""
    tmp = Path(tmp)
    out = {"original": _run(topo, tmp / "orig", 1, "never")}
    wide = Topology.from_env(sim_nodes=8, ep_nodes=2)
    out["8x1"] = _run(wide, tmp / "r8x1", 3, str(tmp / "orig" / "checkpoints" / "step_00000004"))
    return out


def resume_job(topo, tmp: str, zero: int) -> dict:
    tmp = Path(tmp)
    name = f"r{topo.nodes}x{topo.gpus_per_node}"
    out = {name: _run(topo, tmp / name, zero, str(tmp / "orig" / "checkpoints" / "step_00000004"))}
    if topo.world_size == 1:  # another optimizer type: its state cannot carry and is re-initialised
        from smile.runtime import Trainer

        cfg = _config(tmp / "sgd", 0, 1, resume=str(tmp / "orig" / "checkpoints" / "step_00000004"))
        cfg.optimizers[0].type, cfg.optimizers[0].momentum = "sgd", 0.9
        result = Trainer(Net(topo), loss_fn, cfg, lambda r, w: Shard(r, w), topology=topo).fit()
        out["sgd"] = {"resharded": result.resharded, "losses": result.losses}
    out.update(trainable_only_job(topo, tmp))
    return out


# ---------------------------------------------------------------------------------------------
# Trainable-only checkpoints: a frozen base (with frozen experts) and a trainable adapter.
# ---------------------------------------------------------------------------------------------
class Adapted(nn.Module):
    def __init__(self, topology: Topology, base_seed: int = 0) -> None:
        super().__init__()
        self.base = Net(topology)  # "rebuilt from its source": seed base_seed
        if base_seed:
            with torch.no_grad():
                self.base.head.weight.add_(0.01 * base_seed)
        self.base.requires_grad_(False)
        torch.manual_seed(1)
        self.adapter = nn.Linear(D, D)
        self.out = nn.Linear(1, 1)

    def forward(self, x):
        return self.out(self.base(x + 0.1 * self.adapter(x)).unsqueeze(-1)).squeeze(-1)


def adapter_loss(model, batch, ctx):
    return (model(batch["x"]) - batch["y"]).square().mean()


def _adapter_trainer(topo, run_dir, zero, max_steps, resume, base_seed=0):
    from smile.runtime import Trainer

    cfg = _config(
        run_dir, zero, topo.world_size, resume=resume, trainable_only=True, frozen_source="Net(seed=0)"
    )
    cfg.max_steps = max_steps
    model = Adapted(topo, base_seed)
    return Trainer(model, adapter_loss, cfg, lambda r, w: Shard(r, w), topology=topo), model


def trainable_only_job(topo, tmp: Path) -> dict:
    from smile.runtime import CheckpointError
    from smile.runtime.export import consolidated_state

    out: dict = {}
    here = f"{topo.nodes}x{topo.gpus_per_node}"
    if topo.world_size > 1:  # write it on 2x2, ZeRO-2; resume there (same layout) to step 5
        trainer, _ = _adapter_trainer(topo, tmp / "ad", 2, 3, "never")
        trainer.fit()
        path = str(tmp / "ad" / "checkpoints" / "step_00000003")
    else:  # resume the 2x2 checkpoint on 1x1 (resharded, ZeRO-0)
        path = str(tmp / "ad" / "checkpoints" / "step_00000003")
    trainer, model = _adapter_trainer(topo, tmp / f"ad_{here}", 2 if topo.world_size > 1 else 0, 5, path)
    result = trainer.fit()
    out[f"adapter_{here}"] = {
        "resumed_from": result.resumed_from,
        "resharded": result.resharded is not None,
        "losses": result.losses,
        "export": {k: v.numpy() for k, v in consolidated_state(model, topo).items()},
    }
    exported = trainer.export(tmp / f"ad_export_{here}")
    out[f"adapter_{here}"]["export_dir"] = str(exported)
    # A frozen part that is not the one trained with is refused, naming it.
    bad, _ = _adapter_trainer(
        topo, tmp / f"ad_bad_{here}", 2 if topo.world_size > 1 else 0, 5, path, base_seed=3
    )
    try:
        bad.fit()
        out[f"adapter_{here}"]["mismatch"] = None
    except CheckpointError as err:
        out[f"adapter_{here}"]["mismatch"] = str(err)
    return out


def _named(step_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(step_dir / "optim-dense.safetensors"))
    parts = sorted(step_dir.glob("optim-experts-ep*.safetensors"), key=lambda p: int(p.stem.split("ep")[-1]))
    loaded = [load_file(str(p)) for p in parts]
    for name in loaded[0]:
        state[name] = loaded[0][name] if loaded[0][name].dim() == 0 else torch.cat([p[name] for p in loaded])
    return state


def test_reshard_across_topologies_and_trainable_only(tmp_path):
    from smile.runtime import load_weights

    out = run_distributed(original_job, 4, 2, str(tmp_path), timeout=400)[0]
    out.update(run_distributed(resume_job, 2, 2, str(tmp_path), 2, timeout=300)[0])
    out.update(run_distributed(resume_job, 1, 1, str(tmp_path), 0, timeout=300)[0])

    orig = out["original"]
    assert orig["resumed_from"] is None and orig["resharded"] is None
    want_probe, want_loss = orig["probes"][SAVED], orig["losses"][SAVED]
    reference = _named(tmp_path / "orig" / "checkpoints" / "step_00000005")
    assert any(k.endswith("::exp_avg_sq") for k in reference) and any("experts" in k for k in reference)
    for name, zero in (("r8x1", 3), ("r2x2", 2), ("r1x1", 0)):
        got = out[name[1:]] if name == "r8x1" else out[name]
        assert got["resumed_from"].endswith("step_00000004"), name
        report = got["resharded"]
        assert report["optimizer"]["carried"] == ["main"] and not report["optimizer"]["reinitialized"], report
        assert report["to"]["zero_stage"] == zero and report["from"]["world_size"] == 8
        if name == "r8x1":
            assert report["data"]["mode"].startswith("restored") and report["rng"] == "restored per rank"
        else:
            assert report["data"]["batches_skipped_per_rank"] == SAVED, report
            assert report["rng"].startswith("re-seeded")
        # The same function right after the load, and the same next step.
        assert got["probes"][SAVED] == pytest.approx(want_probe, rel=1e-5, abs=1e-7), name
        assert got["losses"] == pytest.approx([want_loss], rel=1e-5, abs=1e-7), name
        state = _named(tmp_path / name / "checkpoints" / "step_00000005")
        assert state.keys() == reference.keys(), name
        for key, value in reference.items():
            assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-6), (name, key)

    sgd = out["sgd"]["resharded"]["optimizer"]
    assert sgd["carried"] == [] and sgd["reinitialized"] == {"main": "type changed from adamw to sgd"}
    assert out["sgd"]["losses"][0] == pytest.approx(want_loss, rel=1e-5) and len(out["sgd"]["losses"]) == 1

    # Trainable-only: frozen tensors recorded, not saved; resume (same layout and resharded), export.
    step3 = tmp_path / "ad" / "checkpoints" / "step_00000003"
    manifest = json.loads((step3 / "manifest.json").read_text())
    saved = set(load_file(str(step3 / "model.safetensors"))) | set(
        load_file(str(step3 / "experts-ep0.safetensors"))
    )
    frozen = json.loads((step3 / "frozen.json").read_text())
    assert manifest["trainable_only"] and manifest["frozen_source"] == "Net(seed=0)"
    assert not saved & {k.split("[")[0] for k in frozen}, saved
    assert "adapter.weight" in saved and {"base.head.weight", "base.norm.weight"} <= set(frozen)
    assert {f"base.moe.experts.w_in[{g}]" for g in range(EXPERTS)} <= set(frozen)
    source = Net(Topology(1, 1)).state_dict()
    for here in ("2x2", "1x1"):
        got = out[f"adapter_{here}"]
        assert got["resumed_from"].endswith("step_00000003") and got["resharded"] == (here == "1x1")
        assert len(got["losses"]) == 2 and all(v == v for v in got["losses"])
        for key, value in source.items():
            assert torch.equal(torch.from_numpy(got["export"][f"base.{key}"]), value), (here, key)
        assert "frozen_source='Net(seed=0)'" in got["mismatch"] and "base.head.weight" in got["mismatch"]
    for key, value in out["adapter_2x2"]["export"].items():  # the continued runs agree
        assert torch.allclose(
            torch.from_numpy(out["adapter_1x1"]["export"][key]), torch.from_numpy(value), atol=1e-5
        )
    # load_weights: a rebuilt model takes the trainable-only checkpoint (frozen part verified).
    fresh = Adapted(Topology(1, 1))
    load_weights(fresh, step3)
    bad = Adapted(Topology(1, 1), base_seed=3)
    with pytest.raises(Exception, match="does not match"):
        load_weights(bad, step3)
