"""``smile zoo lemda train|eval --config <yaml> [key.path=value ...] [--weights DIR]``.

``--config`` takes a file path or the name of a bundled config (``models/lemda/configs/<name>.yaml``,
e.g. ``wine_tiny``). Run under torchrun for several processes; results print as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from smile.models.lemda.config import JobConfig
from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "lemda"


def bundled_configs() -> list[str]:
    return config_names(METHOD)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "eval"], help="train a model, or evaluate saved weights")
    parser.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="ARG",
        help=f"a YAML path or bundled name ({', '.join(bundled_configs())}), then key.path=value overrides",
    )
    parser.add_argument("--weights", default=None, help="eval: checkpoint or export dir (default: newest)")
    parser.add_argument("overrides", nargs="*", help="more key.path=value overrides (lemda.augment=false)")


def load_job_config(config: str, overrides: list[str]) -> JobConfig:
    return load_config(JobConfig, resolve_config(METHOD, config), overrides)


def main(args: argparse.Namespace) -> int:
    from smile.models.lemda import job

    cfg = load_job_config(args.config[0], list(args.overrides) + args.config[1:])
    if args.action == "train":
        if args.weights is not None:
            raise SystemExit(
                "smile zoo lemda: --weights is for eval; train resumes per train.checkpoint.resume"
            )
        built, result = job.train(cfg)
        if built.topology.rank == 0:
            print(
                json.dumps(
                    {"step": result.step, "eval": result.eval_metrics, "checkpoint": result.checkpoint}
                )
            )
        return 0
    metrics = job.evaluate(cfg, args.weights)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"eval": metrics}))
    return 0
