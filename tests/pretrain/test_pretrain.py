"""The pretraining job: its configs, the checks that stop bad inputs before training, Switch vs SMILE
convergence parity on a simulated 2 x 2 cluster, and ``smile train`` resuming after a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from smile.cli import main as smile_main
from smile.data import build_dataloader, build_tokenizer
from smile.hf import moe_modules
from smile.moe import collect_aux_loss
from smile.moe.topology import Topology
from smile.pretrain.config import load_job
from smile.pretrain.job import train_worker
from smile.runtime import ConfigError, config_to_dict
from smile.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# A small job: the tiny default, narrower, on 64-token sequences and a 1024-token vocabulary.
SMALL = [
    "model.d_model=64",
    "model.d_ff=256",
    "data.seq_len=64",
    "data.vocab_size=1024",
    "data.tokenizer_train_docs=300",
    "train.log.progress_bar=false",
]


def small(cache_dir: str, *more: str) -> list[str]:
    """The small job's overrides; a fresh run directory unless ``more`` names one (so no run left
    in the working directory is resumed or locked)."""
    named = any(m.startswith("train.run_dir=") for m in more)
    run_dir = [] if named else [f"train.run_dir={tempfile.mkdtemp()}"]
    return [*SMALL, f"data.cache_dir={cache_dir}", *run_dir, *more]


def test_tiny_config_file_is_the_default_job():
    assert load_job(CONFIGS / "pretrain_tiny.yaml") == load_job()
    job = load_job()
    assert (job.model.family, job.moe.router, job.data.source, job.data.objective) == (
        "t5", "bilevel", "embedded", "span_corruption",
    )
    assert job.train.micro_batch_size == job.data.batch_size


@pytest.mark.slow
def test_cluster_configs_are_switch_base_128_and_its_smile_twin(cache_dir):
    """Same job except routing; the Switch one has exactly HF Switch-Base-128's 7.4B parameters."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from smile.pretrain.model import build_model, parameter_summary

    switch = load_job(CONFIGS / "switch_base_128e_16x8.yaml")
    smile = load_job(CONFIGS / "smile_base_128e_16x8.yaml")
    a, b = config_to_dict(switch), config_to_dict(smile)
    assert (a["moe"]["router"], a["moe"]["dispatcher"]) == ("switch", "flat")
    assert (b["moe"]["router"], b["moe"]["dispatcher"]) == ("bilevel", "hierarchical")
    for job in (a, b):
        del job["moe"]["router"], job["moe"]["dispatcher"], job["train"]["run_dir"]
    assert a == b
    m = switch.model
    assert (m.num_layers, m.num_decoder_layers, m.d_model, switch.moe.num_experts) == (12, 12, 768, 128)
    assert (switch.data.source, switch.data.objective) == ("c4", "span_corruption")

    # One rank's slice of the 16 x 8 run (the T5 tokenizer is not here: the embedded one fits).
    topology = Topology(16, 8, rank=9)
    embedded = [f"data.cache_dir={cache_dir}", "data.tokenizer=embedded", "data.vocab_size=1024",
                "data.tokenizer_train_docs=300"]
    here = load_job(CONFIGS / "switch_base_128e_16x8.yaml", embedded)
    model = build_model(here, build_tokenizer(here.data), topology)
    params = parameter_summary(model, topology)
    hf_config = SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
        num_decoder_layers=12, num_experts=128, encoder_sparse_step=2, decoder_sparse_step=2,
    )
    with torch.device("meta"):
        reference = SwitchTransformersForConditionalGeneration(hf_config)
    assert params["total"] == sum(p.numel() for p in reference.parameters())
    assert 7.3e9 < params["total"] < 7.5e9


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.source=files", "data.paths=[/no/such/corpus]"], "'/no/such/corpus' is not a file, directory"),
        (["data.source=files", "data.paths=[{empty}]"], "holds no documents"),
        (["model.vocab_size=512"], "tokenizer/model vocabulary mismatch"),
        (
            ["model.family=gpt2", "data.objective=causal_lm", "model.max_seq_len=32"],
            "data.seq_len=64 exceeds the model's maximum sequence length 32",
        ),
        (["data.seq_len=512", "model.max_seq_len=256"], "exceeds the model's maximum sequence length 256"),
        (["--nproc", "4", "--sim-nodes", "2", "moe.num_experts=6"], "multiple of the expert-parallel size 4"),
        (["model.family=gpt2"], "model.family='gpt2' trains with data.objective='causal_lm'"),
        (["moe.router=hash"], "moe.router='hash' is not allowed; allowed values: 'switch', 'topk'"),
        (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    ],
)
def test_bad_inputs_fail_before_any_worker_starts(args, message, cache_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [a.replace("{empty}", str(empty)) for a in args]
    options = [a for a in args if "=" not in a]  # options come before the overrides
    argv = ["train", "--check", *options, *small(cache_dir), *(a for a in args if "=" in a)]
    assert smile_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("smile train: error:") and message in err, err


def test_check_passes_on_a_good_job(cache_dir, capsys):
    assert smile_main(["train", "--check", "--nproc", "4", "--sim-nodes", "2", *small(cache_dir)]) == 0
    assert "smile train: ok" in capsys.readouterr().out


def test_init_from_a_switch_checkpoint(cache_dir, tmp_path):
    """model.init_from imports a SwitchTransformers directory; its vocabulary must fit the tokenizer."""
    from smile.pretrain.model import build_model, pretrain_loss
    from tests.hf.test_moefy import tiny_switch_dir

    src = tiny_switch_dir(tmp_path / "switch", vocab=1024)
    job = load_job(None, small(cache_dir, f"model.init_from={src}", "moe.router=switch"))
    tokenizer = build_tokenizer(job.data)
    model = build_model(job, tokenizer, Topology(1, 1))
    with safe_open(str(src / "model.safetensors"), "pt") as handle:
        assert torch.equal(model.shared.weight, handle.get_tensor("shared.weight"))
        router = handle.get_tensor("encoder.block.1.layer.1.mlp.router.classifier.weight")
    assert torch.equal(model.encoder.block[1].layer[1].mlp.moe.router.proj.weight, router)
    batch = next(iter(build_dataloader(job.data, 0, 1, tokenizer)))
    loss, metrics = pretrain_loss(model, batch, None)
    aux = collect_aux_loss(model)  # what the Trainer adds to the task loss
    (loss + aux).backward()
    assert torch.isfinite(loss) and aux > 0

    # A dense checkpoint of the family is loaded, then made MoE.
    from transformers import T5Config, T5ForConditionalGeneration

    dense = T5ForConditionalGeneration(T5Config(vocab_size=1024, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2, decoder_start_token_id=0))
    dense.save_pretrained(tmp_path / "t5")
    model = build_model(load_job(None, small(cache_dir, f"model.init_from={tmp_path / 't5'}")), tokenizer,
                        Topology(1, 1))
    assert torch.equal(model.shared.weight, dense.shared.weight)
    assert [name for name, _ in moe_modules(model)] == [
        "encoder.block.1.layer.1.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense"
    ]

    small_vocab = tiny_switch_dir(tmp_path / "small", vocab=64)
    argv = ["train", "--check", *small(cache_dir, f"model.init_from={small_vocab}", "moe.router=switch")]
    assert smile_main(argv) == 2
    with pytest.raises(ConfigError, match="set moe.router='switch'"):
        build_model(load_job(None, small(cache_dir, f"model.init_from={src}")), tokenizer, Topology(1, 1))


def parity_worker(topology, jobs: list[dict]) -> list[dict]:
    """The jobs on the same ranks, one after the other (one process start for all)."""
    return [train_worker(topology, job) for job in jobs]


@pytest.mark.slow
def test_smile_converges_like_switch_on_2x2(cache_dir, tmp_path):
    """Same model size, data, seed, steps and capacity factor; only the routing differs.

    A third run sends SMILE's dispatch payload in fp8 and must end within 2% of full precision.
    """
    steps = 40
    variants = {
        "switch": ["moe.router=switch"],
        "smile": ["moe.router=bilevel"],
        "smile_fp8": ["moe.router=bilevel", "moe.dispatch_payload=fp8", "moe.combine_payload=bf16"],
    }
    jobs = [
        config_to_dict(
            load_job(
                None,
                small(
                    cache_dir,
                    *options,
                    "moe.capacity_factor=1.0",
                    f"train.max_steps={steps}",
                    f"train.run_dir={tmp_path / name}",
                    "train.checkpoint.every=0",
                    "train.checkpoint.save_final=false",
                    "train.log.every=5",
                    "train.log.plot=false",
                ),
            )
        )
        for name, options in variants.items()
    ]
    switch, smile, smile_fp8 = run_distributed(parity_worker, 2, 2, jobs, timeout=900)[0]
    start = switch["losses"][0]
    assert abs(smile["losses"][0] - start) / start < 0.02  # same initial model quality
    # Task loss, mean of the last 5 steps over all ranks (the aux losses differ by router).
    end_switch, end_smile = switch["train_metrics"]["ce"], smile["train_metrics"]["ce"]
    assert end_switch < 0.85 * start and end_smile < 0.85 * start
    assert abs(end_smile - end_switch) / end_switch <= 0.05, (end_switch, end_smile)
    end_fp8 = smile_fp8["train_metrics"]["ce"]
    assert abs(end_fp8 - end_smile) / end_smile <= 0.02, (end_smile, end_fp8)
    assert switch["step"] == smile["step"] == smile_fp8["step"] == steps


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_smile_train_resumes_after_a_worker_is_killed(cache_dir, tmp_path):
    """`smile train --nproc 4 --sim-nodes 2`: rank 1 is SIGKILLed after the step-4 checkpoint;
    torchrun restarts the workers, which resume from it and finish; the promised files exist."""
    run_dir = tmp_path / "run"
    steps = 12
    cmd = [
        sys.executable, "-m", "smile.cli", "train", "--nproc", "4", "--sim-nodes", "2", "--max-restarts", "1",
        *small(cache_dir), f"train.run_dir={run_dir}", f"train.max_steps={steps}",
        "train.checkpoint.every=4", "train.log.every=2", "train.log.progress_bar=true",
    ]
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            first = run_dir / "checkpoints" / "step_00000004" / "manifest.json"
            deadline = time.monotonic() + 600
            while not first.exists():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint after 600 s"
                time.sleep(0.2)
            victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
            os.kill(victim, signal.SIGKILL)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "resumed from" in text and "checkpoints/step_0000000" in text, text
    assert f"smile train: done: step {steps}" in text
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "manifest.json").exists()
    assert (run_dir / "metrics.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["step"] == steps and all("tokens_per_s" in r and "loss" in r for r in train)
