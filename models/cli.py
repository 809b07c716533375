"""``smile zoo <method> <action> ...``: each zoo method's own command line, imported on use.

Methods come from :mod:`smile.models.registry`. A method's ``cli`` module provides
``add_arguments(parser)`` and ``main(args)``; its first positional argument is the action (for
example ``train``).
"""

from __future__ import annotations

import argparse

from smile.models import registry


def available_methods() -> list[str]:
    return registry.available()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", help="zoo method: " + ", ".join(available_methods()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the method's action and options")


def main(args: argparse.Namespace) -> int:
    method = registry.get(args.method)  # an unknown name: a ZooError (ValueError) listing the methods
    cli = method.load_cli()
    parser = argparse.ArgumentParser(prog=f"smile zoo {method.name}", description=method.summary or None)
    cli.add_arguments(parser)
    return cli.main(parser.parse_intermixed_args(args.rest))
