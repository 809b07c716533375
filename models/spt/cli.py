"""``smile zoo spt train|eval|pretrain --config <yaml> [--setting multitask|glue2superglue] [--bank PATH]
[key.path=value ...]``.

train  setting A: multitask prompted training (bank + LM); setting B: bank pretraining with the
       LM frozen, then fine-tuning from that bank
eval   zero-shot rank classification (T0 protocol) on the training and held-out tasks
pretrain  a random tiny T5 trained on the config's tasks, saved (save_pretrained) as
       <run_dir>/backbone: the frozen LM of configs/tiny_frozen.yaml
"""

from __future__ import annotations

import argparse
import json

from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "spt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "eval", "pretrain"),
                        help="train the bank (and LM), evaluate, or pretrain a tiny backbone")  # fmt: skip
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config or a bundled name ({', '.join(config_names(METHOD))})",
    )
    parser.add_argument("--setting", choices=("multitask", "glue2superglue"), default=None,
                        help="overrides the config's setting")  # fmt: skip
    parser.add_argument("--bank", default=None, help="eval: bank.safetensors (default: <run_dir>/spt/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. spt.bank_size=16")


def main(args: argparse.Namespace) -> int:
    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import evaluate, pretrain, train

    overrides = list(args.overrides) + ([f"setting={args.setting}"] if args.setting else [])
    cfg = load_config(JobConfig, resolve_config(METHOD, args.config), overrides)
    if args.action == "eval":
        print(json.dumps(evaluate(cfg, args.bank)))
        return 0
    result = pretrain(cfg) if args.action == "pretrain" else train(cfg)
    print(json.dumps(result, default=str))
    return 0
