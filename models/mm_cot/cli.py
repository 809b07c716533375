"""``smile zoo mm_cot train|eval|extract --config <yaml> --stage rationale|answer [key=value ...]``.

train    fine-tune one stage (resumes its run if cut off), evaluating by generation
eval     decode the eval/test splits; the rationale stage writes the answer stage's inputs
extract  write ``<features_dir>/<pid>.npy`` ViT patch features from a local ViT (``data.vit_path``)
"""

from __future__ import annotations

import argparse
import json

from smile.models.mm_cot.config import STAGES, MMCoTConfig
from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "mm_cot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "eval", "extract"))
    parser.add_argument("--stage", choices=STAGES, default=None, help="overrides the config's stage")
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config or a bundled name ({', '.join(config_names(METHOD))})",
    )
    parser.add_argument(
        "--image-root", default=None, help="extract: ScienceQA's <split>/<pid>/image.png tree"
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. lr=8e-5 data.limit=100")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"stage={args.stage}"] if args.stage else [])
    cfg = load_config(MMCoTConfig, resolve_config(METHOD, args.config), overrides)
    from smile.models.mm_cot import method

    if args.action == "extract":
        from smile.models.mm_cot.extract import extract_features

        print(json.dumps(extract_features(cfg, image_root=args.image_root)))
        return 0
    result = (method.train if args.action == "train" else method.evaluate)(cfg)
    if method._world()[0] == 0:
        print(json.dumps(result))
    return 0
