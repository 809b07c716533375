"""Start local worker processes through torchrun's elastic agent, from inside ``smile train``.

``smile train --nproc N`` runs what ``torchrun --standalone --nproc-per-node N -m smile.cli train``
would: the agent picks a free rendezvous port, starts N workers with the torchrun environment,
and with ``max_restarts`` restarts them all after a failure; each restart resumes from the newest
complete checkpoint (the runtime's ``checkpoint.resume="auto"``).
"""

from __future__ import annotations

import os
import sys

import torch


def launch(nproc: int, worker_argv: list[str], max_restarts: int = 0) -> int:
    """Run ``smile train <worker_argv>`` on ``nproc`` local workers; returns an exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # several ranks share this machine's cores
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}",
            "--module",
            "smile.cli",
            "train",
            *worker_argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as err:
        first = next(iter(err.failures.values()))
        message = f"worker rank {first.rank} failed (exit code {first.exitcode}); see its error above"
        print(f"smile train: {message}", file=sys.stderr)
        return 1
    return 0
