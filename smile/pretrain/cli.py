"""``smile train``: pretrain a transformers model made MoE (Switch or SMILE routing).

    smile train --nproc 4 --sim-nodes 2                    # the tiny default: 2 nodes x 2 GPUs on CPU
    smile train --config configs/x.yaml train.max_steps=10  # a config file plus section.field=value
    torchrun --nnodes 16 --nproc-per-node 8 ... -m smile.cli train --config configs/x.yaml

With ``--nproc`` the command starts torchrun's elastic agent itself; under torchrun, or with
neither, it trains in this process. Config, tokenizer, corpus and model shape are checked before
any worker starts (``--check`` stops there).
"""

from __future__ import annotations

import argparse
import sys

from smile.data import DataConfigError
from smile.hf import ConvertError
from smile.moe.topology import Topology
from smile.runtime import ConfigError
from smile.runtime.config import one_line
from smile.runtime.lock import RunLockedError

_USER_ERRORS = (ConfigError, ConvertError, DataConfigError, FileNotFoundError, RunLockedError, ValueError)
MAX_RESTARTS = 100  # --max-restarts bound: more restarts than this hide a job that cannot run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    parser.add_argument("--config", help="job config (YAML/TOML/JSON); default: the tiny embedded job")
    parser.add_argument("--nproc", type=int, help="start this many local workers through torchrun")
    parser.add_argument("--sim-nodes", type=int, help="present the workers as this many nodes")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help=f"with --nproc: restart failed workers (they resume), 0 to {MAX_RESTARTS} times",
    )
    parser.add_argument("--check", action="store_true", help="check config, data and model, then exit")


def _planned_topology(job, world: int) -> Topology:
    nodes = job.train.dist.sim_nodes or 1
    if world % nodes:
        raise ValueError(f"--sim-nodes / train.dist.sim_nodes={nodes} does not divide {world} processes")
    return Topology(nodes, world // nodes, 0, job.train.dist.ep_nodes)


def main(args: argparse.Namespace) -> int:
    from smile.moe.topology import under_torchrun
    from smile.pretrain.config import load_job
    from smile.pretrain.job import preflight, run
    from smile.runtime.launch import launch

    overrides = list(args.overrides)
    if args.sim_nodes is not None:
        overrides.append(f"train.dist.sim_nodes={args.sim_nodes}")
    inside = under_torchrun()
    try:
        _check_arguments(args)
        job = load_job(args.config, overrides)
        if not inside:
            print("smile train: checking config, tokenizer, corpus and model ...", flush=True)
            info = preflight(job, _planned_topology(job, args.nproc or 1))
    except _USER_ERRORS as err:
        print(f"smile train: error: {one_line(err)}", file=sys.stderr)
        return 2
    if args.check:
        if not inside:
            print(f"smile train: ok: {info}")
        return 0
    if args.nproc is not None and not inside:
        worker_argv = (["--config", args.config] if args.config else []) + overrides
        return launch(
            args.nproc,
            "smile.cli",
            ["train", *worker_argv],
            job.train.run_dir,
            prog="smile train",
            max_restarts=args.max_restarts,
        )
    from smile.runtime.trainer import TrainingFailedError

    try:
        run(job)
    except TrainingFailedError as err:  # every step non-finite: a failed run, never "done"
        print(f"smile train: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """The command-line options, before the config is read (each error names its option)."""
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.sim_nodes is not None and args.sim_nodes < 1:
        raise ValueError(f"--sim-nodes must be >= 1, got {args.sim_nodes}")
    if not 0 <= args.max_restarts <= MAX_RESTARTS:
        raise ValueError(f"--max-restarts must be in [0, {MAX_RESTARTS}], got {args.max_restarts}")
