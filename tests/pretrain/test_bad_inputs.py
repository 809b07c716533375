"""Every bad input stops ``smile train`` / ``smile demo`` before any worker starts: exit code != 0,
within 5 seconds, one line on stderr naming the field or file (and the allowed values)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from smile.cli import main as smile_main
from smile.runtime import checkpoint as ckpt
from tests.pretrain.test_pretrain import small


def run_cli(argv: list[str], capsys) -> tuple[int, str, float]:
    began = time.perf_counter()
    try:
        code = smile_main(argv)
    except SystemExit as exit_:  # argparse / parser.exit
        code = exit_.code
    elapsed = time.perf_counter() - began
    return code, capsys.readouterr().err, elapsed


def assert_refused(argv: list[str], message: str, capsys, prefix: str = "smile train: error:") -> None:
    code, err, elapsed = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith(prefix) and message in lines[0], err
    assert elapsed < 5, f"took {elapsed:.1f} s"


def write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# ---- config files and overrides -----------------------------------------------------------------
CONFIG_FILES = [
    ("bad.yaml", "model:\n  d_model: 64\n  d_ff: [1, 2\n", "bad.yaml' line 4: invalid YAML"),
    ("bad.yml", "model: {d_model: 64\ntrain: 1\n", "bad.yml' line 2: invalid YAML"),
    ("bad.toml", "[model]\nd_model = 64\nd_ff = = 3\n", "bad.toml' line 3: invalid TOML"),
    ("bad.json", '{\n "model": {"d_model": 64,}\n}\n', "bad.json' line 2: invalid JSON"),
    ("latin1.yaml", b"model:\n  d_model: 64\n# caf\xe9\n", "latin1.yaml' line 3: not UTF-8"),
    ("nan.yaml", "train:\n  grad_clip: .nan\n", "train.grad_clip=nan is not allowed"),
    (
        "inf.json",
        '{"train": {"optimizers": [{"name": "main", "lr": Infinity}]}}',
        "train.optimizers[0].lr=inf",
    ),
]


@pytest.mark.parametrize("name, text, message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_malformed_config_file(name, text, message, cache_dir, tmp_path, capsys):
    path = write(tmp_path / name, text)
    assert_refused(["train", "--check", "--config", str(path), *small(cache_dir)], message, capsys)


OVERRIDES = [
    ("train.max_steps=abc", "train.max_steps must be an integer, got 'abc'"),
    ("nokey", "override 'nokey' must look like key.path=value"),
    ("=5", "override '=5' has an empty key"),
    ("nosection.x=1", "the job has no section(s) ['nosection']; sections are: model, moe, data, train"),
    ("train.nofield=1", "train has no field(s) ['nofield']; fields are: run_dir"),
    ("data.nofield=1", "DataConfig has no field(s) ['nofield']"),
    ("train.max_steps=[1", "override 'train.max_steps=[1': the value does not parse"),
    ("train.run_dir={a: [", "the value does not parse"),
    ("train.optimizers.nosuch.lr=1", "no list entry named 'nosuch'; names: ['main']"),
    ("train.zero_stage=4", "train.zero_stage=4 is not allowed; allowed values: 0, 1, 2, 3"),
    ("train.grad_clip=.nan", "train.grad_clip=nan is not allowed; a finite number is required"),
    ("train.grad_clip=nan", "train.grad_clip=nan is not allowed"),
    ("train.optimizers.main.lr=inf", "train.optimizers[0].lr=inf is not allowed"),
    ("train.optimizers.main.betas=[0.9,-.inf]", "train.optimizers[0].betas[1]=-inf"),
    ("train.dist.timeout_s=1e999", "train.dist.timeout_s=inf is not allowed"),
    ("moe.capacity_factor=.nan", "moe.capacity_factor=nan is not allowed"),
    ("moe.aux_loss_weight=-.inf", "moe.aux_loss_weight=-inf is not allowed"),
    ("model.dropout=.nan", "model.dropout=nan is not allowed"),
    ("data.mean_span_length=.inf", "data.mean_span_length=inf is not allowed"),
]


@pytest.mark.parametrize("override, message", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_bad_override(override, message, cache_dir, capsys):
    assert_refused(["train", "--check", *small(cache_dir), override], message, capsys)


# ---- command-line options -----------------------------------------------------------------------
OPTIONS = [
    (["--max-restarts", "-1"], "--max-restarts must be in [0, 100], got -1"),
    (["--nproc", "2", "--max-restarts", "1000000"], "--max-restarts must be in [0, 100], got 1000000"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "-3"], "--nproc must be >= 1, got -3"),
    (["--nproc", "4", "--sim-nodes", "3"], "train.dist.sim_nodes=3 does not divide 4 processes"),
    (["--sim-nodes", "0"], "--sim-nodes must be >= 1, got 0"),
]


@pytest.mark.parametrize("options, message", OPTIONS, ids=[" ".join(o[0]) for o in OPTIONS])
def test_bad_option(options, message, cache_dir, capsys):
    assert_refused(["train", "--check", *options, *small(cache_dir)], message, capsys)


# ---- corpus files -------------------------------------------------------------------------------
def _parquet(path, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: ["a document", "another one"]}), path)
    return path


CORPORA = [
    ("latin1.txt", b"good line\nsecond line\ncaf\xe9\n", "latin1.txt:3: not UTF-8 text"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2: not UTF-8 text"),
    ("broken.jsonl", '{"text": "ok"}\n\n{"text": "cut\n', "broken.jsonl:3: not a JSON record"),
    (
        "nofield.jsonl",
        '{"text": "ok"}\n{"body": "x"}\n',
        "nofield.jsonl:2: no string field DataConfig.text_field='text'",
    ),
    (
        "nocolumn.parquet",
        "body",
        "nocolumn.parquet: no column DataConfig.text_field='text'; columns are ['body']",
    ),
    ("garbage.parquet", b"this is not parquet at all", "garbage.parquet: not a readable parquet file"),
]


@pytest.mark.parametrize("name, content, message", CORPORA, ids=[c[0] for c in CORPORA])
def test_bad_corpus_file(name, content, message, cache_dir, tmp_path, capsys):
    path = tmp_path / name
    if name == "nocolumn.parquet":
        _parquet(path, content)
    else:
        write(path, content)
    argv = ["train", "--check", *small(cache_dir), "data.source=files", f"data.paths=[{path}]"]
    assert_refused(argv, message, capsys)


# ---- run dir, resume path, checkpoints ----------------------------------------------------------
def test_run_dir_that_is_a_file(cache_dir, tmp_path, capsys):
    file = write(tmp_path / "taken", "x")
    assert_refused(
        ["train", "--check", *small(cache_dir), f"train.run_dir={file}"],
        f"train.run_dir='{file}' is an existing file",
        capsys,
    )
    assert_refused(
        ["train", "--check", *small(cache_dir), f"train.run_dir={file}/sub"],
        f"train.run_dir='{file}/sub' lies under the file",
        capsys,
    )


def test_resume_path_that_does_not_exist(cache_dir, tmp_path, capsys):
    missing = tmp_path / "no" / "step_00000010"
    argv = ["train", "--check", *small(cache_dir), f"train.checkpoint.resume={missing}"]
    assert_refused(
        argv, f"train.checkpoint.resume='{missing}' does not exist; allowed values: 'auto', 'never'", capsys
    )
    (tmp_path / "empty").mkdir()
    argv = ["train", "--check", *small(cache_dir), f"train.checkpoint.resume={tmp_path / 'empty'}"]
    assert_refused(argv, "is not a complete checkpoint directory (manifest.json is missing)", capsys)


def fake_checkpoint(cache: str, root, overrides: list[str], *, shrink: str | None = None):
    """A checkpoint directory of the small job's exact names and shapes (optionally one shrunk)."""
    from smile.data import build_tokenizer
    from smile.moe.experts import is_expert_parameter
    from smile.moe.topology import Topology
    from smile.pretrain.config import load_job
    from smile.pretrain.job import _weights_on_meta
    from smile.pretrain.model import build_model

    job = load_job(None, small(cache, *overrides))
    with _weights_on_meta():
        model = build_model(job, build_tokenizer(job.data), Topology(1, 1))
    dense, experts = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shape = list(tensor.shape)
        if name == shrink:
            shape[-1] -= 1
        (experts if is_expert_parameter(tensor) else dense)[name] = torch.zeros(shape, dtype=tensor.dtype)
    step = root / ckpt.step_dir_name(5)
    step.mkdir(parents=True)
    save_file(dense, str(step / "model.safetensors"))
    save_file(experts, str(step / "experts-ep0.safetensors"))
    manifest = {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "step": 5,
        "world_size": 1,
        "has_experts": True,
        "files": {},
    }
    (step / ckpt.MANIFEST).write_text(__import__("json").dumps(manifest))
    return step


@pytest.mark.parametrize(
    "shrink", [None, "shared.weight", "encoder.block.1.layer.1.DenseReluDense.moe.experts.w_in"]
)
def test_checkpoint_that_does_not_fit_the_model(shrink, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    step = fake_checkpoint(cache_dir, run_dir / "checkpoints", [], shrink=shrink)
    for resume in ("auto", str(step)):
        argv = [
            "train",
            "--check",
            *small(cache_dir),
            f"train.run_dir={run_dir}",
            f"train.checkpoint.resume={resume}",
        ]
        if shrink is None:  # the same shapes pass
            code, err, _ = run_cli(argv, capsys)
            assert code == 0, err
        else:
            assert_refused(argv, f"tensor {shrink} has shape", capsys)
    # A different model width against the same checkpoint: every name is there, shapes differ.
    argv = ["train", "--check", *small(cache_dir), f"train.run_dir={run_dir}", "model.d_model=32"]
    assert_refused(argv, "the configured model has", capsys)


def test_checkpoint_of_another_model_family(cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    fake_checkpoint(cache_dir, run_dir / "checkpoints", [])
    argv = ["train", "--check", *small(cache_dir), f"train.run_dir={run_dir}", "model.num_layers=3"]
    assert_refused(argv, "does not hold the configured model's tensors: missing", capsys)


# ---- smile demo ---------------------------------------------------------------------------------
DEMO = [
    (["--nodes", "0"], "--nodes must be in [1, 64], got 0"),
    (["--gpus-per-node", "-2"], "--gpus-per-node must be in [1, 64], got -2"),
    (["--nodes", "64", "--gpus-per-node", "64"], "at most 256 are simulated"),
    (["--tokens", "0"], "--tokens must be in [1, 1048576], got 0"),
    (["--d-model", "0"], "--d-model must be in [1, 65536], got 0"),
    (["--d-ff", "100000000"], "--d-ff must be in [1, 65536]"),
    (["--experts-per-rank", "0"], "--experts-per-rank must be in [1, 1024], got 0"),
    (["--d-model", "65536", "--d-ff", "65536"], "expert weights; at most"),
    (["--capacity-factor", "-1"], "--capacity-factor must be a finite number >= 0"),
    (["--capacity-factor", "nan"], "--capacity-factor must be a finite number >= 0"),
    (["--capacity-factor", "inf"], "--capacity-factor must be a finite number >= 0"),
    (["--iters", "0"], "--iters must be in [1, 100000], got 0"),
    (["--json", "/no/such/dir/out.json"], "directory '/no/such/dir' does not exist"),
]


@pytest.mark.parametrize("options, message", DEMO, ids=[" ".join(o[0]) for o in DEMO])
def test_bad_demo_arguments(options, message, capsys):
    assert_refused(["demo", *options], message, capsys, prefix="smile demo: error:")


def test_demo_json_path_that_is_a_directory(tmp_path, capsys):
    assert_refused(
        ["demo", "--json", str(tmp_path)],
        "is a directory; give a file path",
        capsys,
        prefix="smile demo: error:",
    )


# ---- a run whose every step is non-finite fails -------------------------------------------------
def test_run_where_every_step_is_non_finite_fails(cache_dir, tmp_path, capsys, monkeypatch):
    import smile.pretrain.job as job_module

    real = job_module.pretrain_loss

    def nan_loss(model, batch, ctx):
        loss, metrics = real(model, batch, ctx)
        return loss * float("nan"), metrics

    monkeypatch.setattr(job_module, "pretrain_loss", nan_loss)
    argv = [
        "train",
        *small(cache_dir),
        f"train.run_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "data.batch_size=2",
        "train.log.plot=false",
    ]
    code, err, _ = run_cli(argv, capsys)
    assert code == 1, err
    assert "smile train: error: training failed: none of the 2 optimizer steps" in err, err
    assert "smile train: done" not in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(2)).exists()
