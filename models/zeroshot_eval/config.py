"""Typed configuration of a zero-shot evaluation run (``smile zoo zeroshot_eval eval``).

Defaults are the study's protocol: all 20 datasets, greedy decoding, Kojima's triggers, answers
of at most 32 new tokens, CoT reasoning of at most 256. ``backend`` picks the model kind;
``model`` is a local ``from_pretrained`` directory (or the endpoint's model name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smile.models.zeroshot_eval.tasks import TASKS
from smile.moe import MoEConfig
from smile.runtime import ConfigError


@dataclass
class EndpointCfg:
    """An OpenAI-compatible server: ``base_url`` (e.g. https://api.openai.com/v1), ``api`` chat or
    completions, the request timeout, retries after a failed request, and the env variable that
    holds the key (never stored in the config)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api: Literal["chat", "completions"] = "chat"
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    api_key_env: str = "OPENAI_API_KEY"

    def validate(self, where: str = "endpoint") -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError(f"{where}: timeout_s > 0, max_retries >= 0 and backoff_s >= 0 required")


@dataclass
class ZeroShotEvalConfig:
    """One model, some tasks, one mode.

    backend: hf_causal | hf_seq2seq (local directory ``model``) | openai (``endpoint``).
    moe: the MoEConfig a smile MoE export was trained with (its FFNs are made MoE before loading).
    tasks: task names, or ["all"] (the paper's 20) or ["paper+"] (also LogiQA).
    out_dir / run_name: results go to ``<out_dir>/<run_name or model dir name>/<task>.<mode>.json``.
    data_dir: local dataset files (see README); cache_dir: the HF datasets cache to read from.
    limit / seed: a seeded subsample per task (None: the full test split).
    """

    backend: Literal["hf_causal", "hf_seq2seq", "openai"] = "hf_causal"
    model: str = "models/my-moe-export"
    moe: MoEConfig | None = None
    endpoint: EndpointCfg = field(default_factory=EndpointCfg)
    tasks: list[str] = field(default_factory=lambda: ["all"])
    mode: Literal["zs", "zs-cot"] = "zs"
    out_dir: str = "runs/zeroshot_eval"
    run_name: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 32
    cot_max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["\nQ:"])
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def validate(self, where: str = "zeroshot_eval") -> None:
        special = self.tasks in (["all"], ["paper+"])
        unknown = [] if special else [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ConfigError(
                f"{where}.tasks: unknown task {unknown[0] if unknown else None!r}; "
                f"registered tasks: {', '.join(TASKS)} (or all, paper+)"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit={self.limit} must be a positive number of examples or null")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.cot_max_new_tokens < 1:
            raise ConfigError(f"{where}: batch_size, max_new_tokens and cot_max_new_tokens must be >= 1")
