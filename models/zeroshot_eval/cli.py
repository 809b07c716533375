"""``smile zoo zeroshot_eval eval --config <yaml> [key=value ...]`` and ``--report <dir>``.

eval              run the config's tasks on its model (zs or zs-cot), write results, print the table
eval --report D   print the paper-style table of the results under D (nothing is run)
train             not applicable: this is an evaluation-only method (one error line)

Several GPUs: ``smile zoo zeroshot_eval eval --nproc N --config ...`` (or
``torchrun --nproc-per-node N -m smile.cli zoo zeroshot_eval eval --config ...``).
"""

from __future__ import annotations

import argparse
import logging

from smile.models.registry import config_names, resolve_config

METHOD = "zeroshot_eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("eval", "train"), help="eval (train: not applicable)")
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML/TOML/JSON config, or a bundled config's name ({', '.join(config_names(METHOD))})",
    )
    parser.add_argument("--report", default=None, metavar="DIR", help="print the table of the results in DIR")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mode=zs-cot limit=100")


def main(args: argparse.Namespace) -> int:
    from smile.models.zeroshot_eval import method, report

    if args.action == "train":
        method.train()
    if args.report is not None:
        print(report.report(args.report))
        return 0
    from smile.models.zeroshot_eval.backends import EndpointError
    from smile.models.zeroshot_eval.config import ZeroShotEvalConfig
    from smile.runtime import load_config
    from smile.runtime.sharding import rank_and_world

    cfg = load_config(ZeroShotEvalConfig, resolve_config(METHOD, args.config), args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend = method.make_backend(cfg)
    try:
        results = method.evaluate(cfg, backend)
    except EndpointError as err:
        raise ValueError(str(err)) from err  # smile prints it as one line
    if rank_and_world()[0] == 0:
        print(report.format_table(list(results.values())))
        print(f"results: {method.run_dir(cfg, backend)}")
    return 0
