"""The zoo entry points (``smile.models.registry`` points here): ``evaluate`` runs the protocol
from a config; ``train`` does not apply to this evaluation-only method and says so."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smile.models.zeroshot_eval.backends import (
    Backend,
    HFCausalBackend,
    HFSeq2SeqBackend,
    OpenAICompatBackend,
)
from smile.models.zeroshot_eval.config import ZeroShotEvalConfig
from smile.models.zeroshot_eval.evaluate import run_eval

NOT_TRAINABLE = (
    "zeroshot_eval is an evaluation-only method (the study evaluates models zero-shot, without "
    "training): use `smile zoo zeroshot_eval eval --config <yaml>`"
)


def train(cfg: Any = None, **kwargs: Any) -> None:
    """Not applicable: raises one clear line."""
    raise ValueError(NOT_TRAINABLE)


def make_backend(cfg: ZeroShotEvalConfig) -> Backend:
    if cfg.backend == "openai":
        e = cfg.endpoint
        return OpenAICompatBackend(
            e.base_url, cfg.model, e.api, e.timeout_s, e.max_retries, e.backoff_s, e.api_key_env
        )
    cls = HFCausalBackend if cfg.backend == "hf_causal" else HFSeq2SeqBackend
    return cls(cfg.model, batch_size=cfg.batch_size, dtype=cfg.dtype, moe=cfg.moe)


def _join_torchrun() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group so examples shard over the ranks."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from smile.runtime import init_distributed

        init_distributed()


def run_dir(cfg: ZeroShotEvalConfig, backend: Backend) -> Path:
    return Path(cfg.out_dir) / (cfg.run_name or backend.name)


def evaluate(cfg: ZeroShotEvalConfig, backend: Backend | None = None) -> dict[str, dict[str, Any]]:
    """Run ``cfg``'s tasks on its model (or on ``backend``); results under :func:`run_dir`."""
    _join_torchrun()
    backend = backend or make_backend(cfg)
    return run_eval(
        cfg.tasks,
        backend,
        cfg.mode,
        cfg.limit,
        cfg.seed,
        data_dir=cfg.data_dir,
        cache_dir=cfg.cache_dir,
        out_dir=run_dir(cfg, backend),
        max_new_tokens=cfg.max_new_tokens,
        cot_max_new_tokens=cfg.cot_max_new_tokens,
        stop=cfg.stop,
    )
