"""``smile zoo pomp train|eval --config <yaml> [--dataset NAME] [key.path=value ...]``.

train  pre-train the prompt (resumes from the run directory's newest checkpoint)
eval   zero-shot top-1 of the trained prompt on ``data`` or a named ``evaluation`` set
"""

from __future__ import annotations

import argparse
import json

from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "pomp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "eval"), help="train the prompt or evaluate it")
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config or a bundled name ({', '.join(config_names(METHOD))})",
    )
    parser.add_argument("--dataset", default=None, help="eval: an evaluation set's name (default: data)")
    parser.add_argument("--prompt", default=None, help="eval: run or checkpoint directory (default: run_dir)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. num_sampled_classes=500")


def main(args: argparse.Namespace) -> int:
    from smile.models.pomp.config import POMPConfig
    from smile.models.pomp.method import evaluate, train

    cfg = load_config(POMPConfig, resolve_config(METHOD, args.config), args.overrides)
    if args.action == "eval":
        print(json.dumps(evaluate(cfg, args.dataset, prompt=args.prompt)))
        return 0
    result = train(cfg)
    print(json.dumps({k: result[k] for k in ("run_dir", "step", "checkpoint", "resumed_from")}))
    return 0
