"""The ``smile`` command. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help); each module provides add_arguments(parser) and main(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("smile.demo", "Switch vs SMILE MoE layers on a simulated multi-node cluster (CPU/gloo)"),
    "train": ("smile.pretrain.cli", "MoE pretraining, Switch or SMILE routing, from CPU to clusters"),
    "zoo": ("smile.models.cli", "train or evaluate a model-zoo method: smile zoo <method> <action> ..."),
    "simulate": ("smile.sim.cli", "cost-model projection of SMILE vs Switch from 1 to 256 nodes"),
    "cluster": ("smile.sim.cli", "run a torchrun job on an emulated multi-node cluster (network namespaces)"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only ``chosen`` imports its module (imports can be slow)."""
    parser = argparse.ArgumentParser(prog="smile", description="SMILE Mixture-of-Experts training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input ends with one clear line (``SMILE_DEBUG=1`` for the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        code = importlib.import_module(COMMANDS[args.command][0]).main(args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("SMILE_DEBUG") == "1":
            raise
        parser.exit(2, f"smile {args.command}: error: {err}\n")
    return code


def entry() -> None:
    """The ``smile`` executable: :func:`main`, then, in a torchrun worker after a good run, leave
    the process group with the peers (``main`` itself may run inside a caller's group)."""
    code = main()
    if code == 0 and "torch.distributed" in sys.modules:
        from smile.moe.topology import stop_process_group

        stop_process_group()
    sys.exit(code)


if __name__ == "__main__":
    entry()
