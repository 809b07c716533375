"""``smile zoo aim train|eval --config <yaml> [--checkpoint DIR] [key.path=value ...]``.

train  train the adapters (resumes from the run directory's newest checkpoint)
eval   multi-clip x multi-crop top-1/top-5 on ``eval_data`` (or ``data``)
"""

from __future__ import annotations

import argparse
import json

from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "aim"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "eval"), help="train the adapters or evaluate them")
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config or a bundled name ({', '.join(config_names(METHOD))})",
    )
    parser.add_argument("--checkpoint", default=None, help="eval: checkpoint dir (default: the newest)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. num_frames=16")


def main(args: argparse.Namespace) -> int:
    from smile.models.aim.config import AIMConfig
    from smile.models.aim.method import evaluate, train

    cfg = load_config(AIMConfig, resolve_config(METHOD, args.config), args.overrides)
    if args.action == "eval":
        print(json.dumps(evaluate(cfg, args.checkpoint)))
        return 0
    result = train(cfg)
    print(json.dumps({k: result[k] for k in ("run_dir", "step", "checkpoint", "resumed_from")}))
    return 0
