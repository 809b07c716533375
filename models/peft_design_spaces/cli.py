"""``smile zoo peft_design_spaces train|eval|search --config <yaml> [key.path=value ...]``.

train: train the configured design (``--search``: run the design-space search first and train
its best design); eval: score a saved PEFT artifact (``--peft``, default ``<run_dir>/peft``);
search: run the search only. Under torchrun every rank runs the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from smile.models.registry import resolve_config

METHOD = "peft_design_spaces"
ACTIONS = ("train", "eval", "search")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="train | eval | search")
    parser.add_argument(
        "--config", help="YAML/TOML/JSON job config, or a bundled config's name (e.g. tiny_roberta_keywords)"
    )
    parser.add_argument("--search", action="store_true", help="train: search the design space first")
    parser.add_argument("--peft", help="eval: a PEFT artifact directory (default <train.run_dir>/peft)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.max_steps=10")


def main(args: argparse.Namespace) -> int:
    from smile.models.peft_design_spaces.training import Experiment, JobConfig, run_search
    from smile.runtime import config_to_dict, load_config

    job = load_config(JobConfig, resolve_config(METHOD, args.config), args.overrides)
    exp = Experiment(job)
    if args.action == "eval":
        result = {"eval": exp.evaluate(args.peft or Path(job.train.run_dir) / "peft")}
    elif args.action == "search":
        result = {"best": config_to_dict(run_search(exp).best)}
    else:
        design = run_search(exp).best if args.search else None
        result = exp.train(design)
        result = {k: v for k, v in result.items() if k != "budget"} | {
            "peft_ratio": result["budget"]["ratio"],
            "design": config_to_dict(design or job.design),
        }
    if exp.rank == 0:
        print(json.dumps(result, indent=1, default=_jsonable))
    return 0


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)
