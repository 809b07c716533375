"""``smile zoo trap_replace train|eval --stage 1|2 --config <yaml> [key.path=value ...]``.

train --stage 1   bait and trap on the poisoned training set (resumes if the run was cut off)
train --stage 2   replace the head on the clean holdout (stem from the stage-1 run directory)
eval  --stage N   CA and ASR of stage N's selected checkpoint on the clean/triggered test sets
ablate --seeds 0,1,2  no defense, head replacement alone and trap and replace for every seed (the
                      trap's own contribution; see ablation.py)
"""

from __future__ import annotations

import argparse
import json

from smile.models.registry import config_names, resolve_config
from smile.models.trap_replace.config import TrapReplaceConfig
from smile.runtime import load_config

METHOD = "trap_replace"


def _seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2] (one token, so the overrides after it stay overrides)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=("train", "eval", "ablate"), help="train or evaluate a stage, or run the ablation"
    )
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: bait and trap, 2: replace")
    parser.add_argument(
        "--config",
        default=None,
        help="YAML/TOML/JSON config, or a bundled config's name "
        f"({', '.join(config_names(METHOD))}; default: the paper's CIFAR-10)",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="ablate: comma-separated seeds, each for both the poison draw and training (default 0,1,2)",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. poison.attack=blend")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(TrapReplaceConfig, resolve_config(METHOD, args.config), args.overrides)
    from smile.models.trap_replace import stages

    if args.action == "ablate":
        from smile.models.trap_replace.ablation import ablate

        result = ablate(cfg, args.seeds)
        if stages.is_rank0():
            print(result.pop("table"))
            print(json.dumps(result))
        return 0
    if args.action == "eval":
        print(json.dumps(stages.evaluate_stage(cfg, args.stage)))
        return 0
    train = stages.train_stage1 if args.stage == 1 else stages.train_stage2
    result = train(cfg)
    if stages.is_rank0():
        summary = {
            "stage": result.stage,
            "run_dir": str(result.run_dir),
            "checkpoint": str(result.checkpoint),
            "resumed_from": result.resumed_from,
            **result.metrics,
        }
        print(json.dumps(summary))
    return 0
