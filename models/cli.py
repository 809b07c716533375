"""``smile zoo <method> <action> ...``: each zoo method's own command line, imported on use.

Methods come from :mod:`smile.models.registry`. A method's ``cli`` module provides
``add_arguments(parser)`` and ``main(args)``; its first positional argument is the action (for
example ``train``). Every method also takes ``--nproc N``: its command runs on N local workers
through the runtime's launcher (:mod:`smile.runtime.launch`), as under
``torchrun --standalone --nproc-per-node N -m smile.cli zoo ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    parser.add_argument("--nproc", type=int, help="run on this many local workers (torchrun's agent)")
    method_args = parser.parse_intermixed_args(args.rest)
    if method_args.nproc is not None:
        from smile.moe.topology import under_torchrun

        if not under_torchrun():  # inside a worker the option has done its job
            return _launch(method, args.rest, method_args)
    try:
        return cli.main(method_args)
    except RuntimeError as err:
        if not _is_run_failure(err) or os.environ.get("SMILE_DEBUG") == "1":
            raise
        from smile.runtime.config import one_line

        print(f"smile zoo {method.name}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 1


def _is_run_failure(err: RuntimeError) -> bool:
    """A run that cannot start (another live job holds its run directory) or that applied no step
    is an outcome for the operator, not a bug: one line and exit status 1, as ``smile train`` does.
    Imported here: ``smile.runtime`` loads torch and DeepSpeed, which ``--help`` must not wait for."""
    from smile.runtime.lock import RunLockedError
    from smile.runtime.trainer import TrainingFailedError

    return isinstance(err, (RunLockedError, TrainingFailedError))


def _launch(method: registry.ZooMethod, rest: list[str], method_args: argparse.Namespace) -> int:
    """The same command on ``--nproc`` workers; the config is read first, so a bad one is one line
    here, before any worker starts. Logs go under the config's run directory."""
    if method_args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {method_args.nproc}")
    config = method.load_config(
        getattr(method_args, "config", None), getattr(method_args, "overrides", None) or []
    )
    from smile.runtime.launch import launch

    argv = ["zoo", method.name, *_without_nproc(rest)]
    return launch(method_args.nproc, "smile.cli", argv, run_dir_of(config), prog=f"smile zoo {method.name}")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


RUN_DIR_FIELDS = ("train.run_dir", "run_dir", "out_dir")


def run_dir_of(config: object) -> Path:
    """Where a zoo config's job writes (its ``train.run_dir``, ``run_dir`` or ``out_dir``)."""
    for dotted in RUN_DIR_FIELDS:
        value = config
        for part in dotted.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str | Path):
            return Path(value)
    raise ValueError(f"--nproc: the config has none of {', '.join(RUN_DIR_FIELDS)} for the workers' logs")
