"""``smile zoo <method> <action> ...``: each zoo method's own command line, imported on use.

A method sub-package provides ``cli.py`` with ``add_arguments(parser)`` and ``main(args)``;
its first positional argument is the action (for example ``train``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import smile.models


def available_methods() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(smile.models.__path__) if m.ispkg and not m.name.startswith("_")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", help="zoo method: " + ", ".join(available_methods()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the method's action and options")


def main(args: argparse.Namespace) -> int:
    methods = available_methods()
    if args.method not in methods:
        raise SystemExit(f"smile zoo: unknown method {args.method!r}; allowed: {', '.join(methods)}")
    cli = importlib.import_module(f"smile.models.{args.method}.cli")
    parser = argparse.ArgumentParser(prog=f"smile zoo {args.method}")
    cli.add_arguments(parser)
    return cli.main(parser.parse_intermixed_args(args.rest))
