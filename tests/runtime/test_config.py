"""Runtime pieces that need no process group: config, schedules, optimizers, codec, checkpoint files."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from smile.runtime import checkpoint as ckpt
from smile.runtime.config import (
    ConfigError,
    OptimizerConfig,
    ParamGroupConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    from_dict,
    load_config,
)
from smile.runtime.optim import build_optimizer, make_optimizer, param_groups
from smile.runtime.schedule import lr_at
from smile.runtime.serialization import decode, encode

YAML = """
run_dir: runs/x
max_steps: 50
zero_stage: 1
optimizers:
  - name: task
    lr: 1e-4
    weight_decay: 0.001
    schedule: {kind: cosine, warmup_ratio: 0.1}
    groups: [{params: ["layers.0.*"], lr_scale: 0.8}]
  - name: aug
    type: adam
    lr: 1e-4
    params: ["augmenter.*"]
checkpoint: {every: 10, keep_last: 2}
"""


def test_config_files_overrides_and_coercion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    cfg = load_config(
        TrainConfig,
        path,
        [
            "optimizers.aug.lr=3e-4",
            "zero_stage=2",
            "log.every=5",
            "optimizers.0.betas=[0.8, 0.99]",
            "dist.sim_nodes=2",
        ],
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizers[0].lr == 1e-4 and isinstance(
        cfg.optimizers[0].lr, float
    )  # YAML reads 1e-4 as a str
    assert cfg.optimizers[1].lr == 3e-4 and cfg.optimizers[1].type == "adam"
    assert cfg.optimizers[0].betas == (0.8, 0.99)
    assert cfg.optimizers[0].groups[0] == ParamGroupConfig(["layers.0.*"], 0.8, None)
    assert cfg.zero_stage == 2 and cfg.log.every == 5 and cfg.dist.sim_nodes == 2
    assert cfg.checkpoint.keep_last == 2 and str(cfg.checkpoint_dir) == "runs/x/checkpoints"
    # A dump loads back to the same config, also from TOML and JSON.
    dumped = config_to_dict(cfg)
    assert from_dict(TrainConfig, dumped) == cfg
    (tmp_path / "c.json").write_text(json.dumps(dumped))
    assert load_config(TrainConfig, tmp_path / "c.json") == cfg
    (tmp_path / "c.toml").write_text('max_steps = 7\n[[optimizers]]\nname = "only"\nlr = 0.5\n')
    toml_cfg = load_config(TrainConfig, tmp_path / "c.toml")
    assert (
        toml_cfg.max_steps == 7 and toml_cfg.optimizers[0].name == "only" and toml_cfg.optimizers[0].lr == 0.5
    )


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["zero_stage=4"], ["train.zero_stage=4", "allowed values: 0, 1, 2, 3"]),
        (["precision=fp16"], ["train.precision='fp16'", "'auto', 'fp32', 'bf16'"]),
        (
            ["optimizers.0.type=lamb"],
            ["train.optimizers[0].type='lamb'", "'adamw', 'adam', 'sgd', 'adafactor'"],
        ),
        (["max_steps=0"], ["train.max_steps must be >= 1, got 0"]),
        (["max_steps=abc"], ["train.max_steps must be an integer, got 'abc'"]),
        (["grad_clipping=1.0"], ["train has no field(s) ['grad_clipping']", "grad_clip"]),
        (["log.colour=red"], ["train.log has no field(s) ['colour']"]),
        (
            ["optimizers.0.schedule.warmup_steps=5", "optimizers.0.schedule.warmup_ratio=0.1"],
            ["train.optimizers[0].schedule: set warmup_steps=5 or warmup_ratio=0.1, not both"],
        ),
        (["optimizers.0.betas=[0.9]"], ["train.optimizers[0].betas must have 2 entries"]),
        (["optimizer_mode=alternate"], ["optimizer_mode='alternate' needs at least two optimizers"]),
        (["optimizers.nope.lr=1"], ["no list entry named 'nope'"]),
        (["checkpoint.keep_last=0"], ["train.checkpoint.keep_last must be >= 1"]),
        (
            ["optimizer_mode=alternate", "zero_stage=3", "optimizers=[{name: a}, {name: b, params: [x]}]"],
            ["train.optimizer_mode='alternate' supports zero_stage 0, 1 or 2, not 3"],
        ),
        (["optimizers.0.nesterov=true"], ["nesterov=true needs type='sgd' and momentum > 0"]),
    ],
)
def test_config_errors_name_field_and_allowed_values(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_tensorboard_needs_its_package():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="train.log.tensorboard=true needs the 'tensorboard' package"):
            load_config(TrainConfig, None, ["log.tensorboard=true"])
    else:
        assert load_config(TrainConfig, None, ["log.tensorboard=true"]).log.tensorboard


def test_config_duplicate_optimizer_names_and_bad_file(tmp_path):
    data = {"optimizers": [{"name": "a"}, {"name": "a", "params": ["x"]}]}
    with pytest.raises(ConfigError, match=r"names must be unique, repeated: \['a'\]"):
        from_dict(TrainConfig, data)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="unknown extension '.ini'"):
        load_config(TrainConfig, tmp_path / "c.ini")
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides({}, ["zero_stage"])


def test_schedules():
    total = 100
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cos, 1.0, 0, total) == pytest.approx(1 / 11)
    assert lr_at(cos, 1.0, 9, total) == pytest.approx(10 / 11)
    assert lr_at(cos, 1.0, 10, total) == pytest.approx(1.0)
    assert lr_at(cos, 1.0, 55, total) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cos, 1.0, 100, total) == pytest.approx(0.1)
    lin = ScheduleConfig(kind="linear", warmup_ratio=0.2)
    assert lr_at(lin, 2.0, 20, total) == pytest.approx(2.0)
    assert lr_at(lin, 2.0, 60, total) == pytest.approx(1.0)
    const_warm = ScheduleConfig(kind="cosine", warmup_steps=5, warmup_lr=1e-5)
    assert lr_at(const_warm, 2e-3, 4, total) == 1e-5 and lr_at(const_warm, 2e-3, 5, total) == 2e-3
    assert lr_at(ScheduleConfig(total_steps=10, kind="linear"), 1.0, 5, total) == pytest.approx(0.5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.augmenter = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_parameter_selection_groups_and_errors():
    net = _Net()
    opts = [
        OptimizerConfig(name="task", weight_decay=0.1, groups=[ParamGroupConfig(["head.*"], lr_scale=2.0)]),
        OptimizerConfig(name="aug", type="sgd", params=["augmenter.*"]),
    ]
    optimizer, selection = build_optimizer(net, opts)
    # Explicit globs claim first even though "task" (catch-all) is listed first; frozen never.
    assert selection.names("aug") == ["augmenter.weight", "augmenter.bias"]
    assert selection.names("task") == ["body.weight", "body.bias", "head.weight", "head.bias"]
    groups = {
        (g["smile_optimizer"], g["lr_scale"], g["weight_decay"]): g["params"] for g in optimizer.param_groups
    }
    assert groups[("task", 1.0, 0.1)] == [net.body.weight]  # 1-D params get no decay by default
    assert groups[("task", 1.0, 0.0)] == [net.body.bias]
    assert groups[("task", 2.0, 0.1)] == [net.head.weight]
    assert isinstance(optimizer.members["aug"], torch.optim.SGD)
    with pytest.raises(ConfigError, match=r"selected by no optimizer: \['body.weight'"):
        build_optimizer(net, [OptimizerConfig(params=["head.*", "augmenter.*"])])
    with pytest.raises(ConfigError, match=r"optimizers\[1\] \('aug'\) selects no trainable parameter"):
        build_optimizer(net, [OptimizerConfig(name="a"), OptimizerConfig(name="aug", params=["frozen.*"])])


def test_multi_optimizer_matches_members_and_skips_inactive():
    torch.manual_seed(0)
    net = _Net()
    twin = copy.deepcopy(net)
    cfgs = [
        OptimizerConfig(name="task", lr=0.05, params=["body.*", "head.*"]),
        OptimizerConfig(name="aug", type="sgd", lr=0.1, momentum=0.9, params=["augmenter.*"]),
    ]
    multi, _ = build_optimizer(net, cfgs)
    plain = [
        make_optimizer(
            c,
            param_groups(
                c,
                [
                    (n, p)
                    for n, p in twin.named_parameters()
                    if n.split(".")[0] in {"task": ("body", "head"), "aug": ("augmenter",)}[c.name]
                ],
            ),
        )
        for c in cfgs
    ]
    x = torch.randn(8, 4)
    for step in range(4):
        for model in (net, twin):
            model.zero_grad()
            (model.head(model.body(x)).square().mean() + model.augmenter(x).square().mean()).backward()
        multi.active = {"task", "aug"} if step < 3 else {"task"}
        multi.step()
        plain[0].step()
        if step < 3:
            plain[1].step()
    for (name, a), b in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    state = multi.state_dict()
    fresh, _ = build_optimizer(copy.deepcopy(net), cfgs)
    fresh.load_state_dict(state)
    assert all(m.state is fresh.state for m in fresh.members.values())
    assert torch.equal(
        fresh.state_dict()["state"][4]["momentum_buffer"], state["state"][4]["momentum_buffer"]
    )


def test_codec_roundtrip_without_pickle():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3)}},
        "groups": [{"betas": (0.9, 0.99), "foreach": None, "name": "x", "flag": True}],
        "rng": (3, tuple(range(5)), None),
        "np": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "inf": math.inf,
        "__odd": 1,
    }
    json_tree, tensors = encode(tree)
    text = json.dumps(json_tree)
    back = decode(json.loads(text), tensors)
    assert back["state"][0]["exp_avg"].equal(tree["state"][0]["exp_avg"]) and 0 in back["state"]
    assert back["groups"][0]["betas"] == (0.9, 0.99) and back["rng"] == tree["rng"]
    assert back["np"][1].dtype == np.uint32 and back["np"][1].tolist() == [0, 1, 2, 3]
    assert back["inf"] == math.inf and back["__odd"] == 1
    with pytest.raises(TypeError, match="cannot serialize .*object"):
        encode({"bad": object()})


def test_checkpoint_files_commit_verify_and_prune(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        stage = ckpt.staging_dir(root, step)
        stage.mkdir(parents=True)
        files = {
            "model.safetensors": ckpt.write_tensors(
                stage, "model.safetensors", {"w": torch.full((3,), step)}
            ),
            "rank0.json": ckpt.write_json(stage, "rank0.json", {"step": step}),
        }
        ckpt.commit(root, step, files, {"world_size": 1})
    # A checkpoint cut off mid-write (staging dir, partial file, no manifest) is never listed.
    cut = ckpt.staging_dir(root, 4)
    cut.mkdir()
    (cut / "model.safetensors.partial").write_bytes(b"\0" * 10)
    assert ckpt.latest_checkpoint(root).name == "step_00000003"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]
    ckpt.prune(root, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert cut.exists()  # newer than every complete checkpoint: a later save of step 4 replaces it
    path = root / "step_00000003"
    manifest = ckpt.verify_all(path)
    assert ckpt.read_tensors(path, manifest, "model.safetensors")["w"].tolist() == [3, 3, 3]
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        ckpt.CheckpointError, match="model.safetensors fails verification .*modified or truncated"
    ):
        ckpt.read_tensors(path, manifest, "model.safetensors")
    (path / "rank0.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing shard 'rank0.json'"):
        ckpt.read_json(path, manifest, "rank0.json")
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ckpt.CheckpointError, match="is not 'smile-checkpoint'"):
        ckpt.read_manifest(path)
