"""``smile zoo masked_diffuse_lm train|eval --config <yaml> [--control content|length|pos|span]
[--target T] [--checkpoint DIR] [key.path=value ...]``.

train   the diffusion model (resumes from the run's newest checkpoint; samples at each evaluation)
eval    samples with the EMA weights and their metrics; ``--control`` adds guided generation
        (``content``: a latent classifier for the target word is trained, then guided vs.
        unguided samples from the same noise; ``length``: samples of ``control.length`` words;
        ``pos``: toward a tag sequence, ``--target "DET NOUN VERB"``; ``span``: toward
        "words i..j form a constituent LABEL", ``--target "0,1,NP"``)
"""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from smile.models.masked_diffuse_lm.config import MDLMConfig
from smile.models.registry import config_names, resolve_config
from smile.runtime import load_config

METHOD = "masked_diffuse_lm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "eval"), help="train the model, or sample from it")
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config or a bundled name ({', '.join(config_names(METHOD))}; default: E2E)",
    )
    parser.add_argument(
        "--control",
        choices=("content", "length", "pos", "span"),
        default=None,
        help="eval: guided generation",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="eval: control.target (content: a word; pos: 'DET NOUN VERB'; span: 'i,j,LABEL', 0-based)",
    )
    parser.add_argument("--checkpoint", default=None, help="eval: checkpoint dir (default: the run's newest)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. n_buckets=1")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"control.task={args.control}"] if args.control else [])
    cfg = load_config(MDLMConfig, resolve_config(METHOD, args.config), overrides)
    if args.target is not None:  # set as given: an override would parse "yes" or "1,2" as YAML
        cfg.control.target = args.target
    from smile.models.masked_diffuse_lm import method

    if args.action == "train":
        result = method.train(cfg)
        summary = {k: result[k] for k in ("run_dir", "checkpoint", "resumed_from", "eval")}
    else:
        summary = method.evaluate(cfg, control=args.control is not None, checkpoint=args.checkpoint)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary))
    return 0
