"""``smile zoo <method> <action> ...``: each zoo method's own command line, imported on use.

Methods come from :mod:`smile.models.registry`. A method's ``cli`` module provides
``add_arguments(parser)`` and ``main(args)``; its first positional argument is the action (for
example ``train``).
"""

from __future__ import annotations

import argparse
import os
import sys

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
    method_args = parser.parse_intermixed_args(args.rest)
    try:
        return cli.main(method_args)
    except RuntimeError as err:
        if not _is_run_failure(err) or os.environ.get("SMILE_DEBUG") == "1":
            raise
        print(f"smile zoo {method.name}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 1


def _is_run_failure(err: RuntimeError) -> bool:
    """A run that cannot start (another live job holds its run directory) or that applied no step
    is an outcome for the operator, not a bug: one line and exit status 1, as ``smile train`` does.
    Imported here: ``smile.runtime`` loads torch and DeepSpeed, which ``--help`` must not wait for."""
    from smile.runtime.lock import RunLockedError
    from smile.runtime.trainer import TrainingFailedError

    return isinstance(err, (RunLockedError, TrainingFailedError))
