"""Start local worker processes through torchrun's elastic agent, from inside a ``smile`` command.

``smile train --nproc N`` and ``smile zoo <method> ... --nproc N`` run what
``torchrun --standalone --nproc-per-node N -m smile.cli ...`` would: the agent picks a free
rendezvous port, starts N workers with the torchrun environment, and with ``max_restarts``
restarts them all after a failure; each restart resumes from the newest complete checkpoint (the
runtime's ``checkpoint.resume="auto"``).

What an operator gets:

* every worker's output goes to the console and to ``<run_dir>/logs/<run id>/attempt_<N>/<rank>/``
  (``stdout.log``, ``stderr.log``, and ``error.json`` when the worker raised);
* workers die with the agent (``smile.runtime.supervision``): killing the command leaves no
  orphan training, nor committing checkpoints;
* when the run fails for good, ONE line names the root cause and returns 1::

      smile train: error: rank 1 failed first (signal SIGKILL) at 2025-01-31 12:00:01.250; its log: ...

  The rank is chosen by :func:`smile.runtime.supervision.root_cause`: a rank that stopped making
  progress while its peers waited for it (its heartbeat is clearly older), else the first failure
  (not a peer that only noticed it), rather than whichever rank torchrun lists first.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

from smile.moe.topology import stop_process_group
from smile.runtime import supervision


def launch(
    nproc: int, module: str, argv: list[str], run_dir: str | Path, *, prog: str, max_restarts: int = 0
) -> int:
    """Run ``module.main(argv)`` (e.g. ``smile.cli`` with ``["train", ...]``) on ``nproc`` local
    workers; returns an exit code.

    ``run_dir``: the job's run directory, where the logs go and the workers' heartbeats are read
    from. ``prog`` names the command in the one-line failure report (``smile train``).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    log_dir = Path(run_dir) / "logs"
    supervision_dir = Path(run_dir) / supervision.HEARTBEAT_DIR
    for stale in supervision_dir.glob("*") if supervision_dir.is_dir() else ():
        stale.unlink(missing_ok=True)  # an earlier run's heartbeats must not be read as this one's
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # several ranks share this machine's cores
    os.environ[supervision.AGENT_PID_ENV] = str(os.getpid())  # workers watch this process
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}",
            f"--log-dir={log_dir}",
            "--redirects=3",  # stdout and stderr of every rank to its files ...
            "--tee=3",  # ... and to the console
            "--module",
            __name__,  # the worker entry below: runs `module`, recording its error with a time
            module,
            *argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as err:
        print(
            report(err.failures, run_dir, log_dir, prog=prog, run_id=args.rdzv_id),
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


# ---- the one-line report -------------------------------------------------------------------------
def failures_from_torchrun(failures: dict) -> dict[int, supervision.Failure]:
    """torchrun's ``ProcessFailure`` records (global rank -> record) as supervision ``Failure``s."""
    out = {}
    for rank, record in failures.items():
        data = record.error_file_data if isinstance(record.error_file_data, dict) else {}
        exact = data.get("smile_time")
        message = record.message if isinstance(record.message, str) else json.dumps(record.message)
        if record.error_file == "<N/A>" or not data:
            message = ""  # torchrun's made-up text for a death without an error file
        out[int(rank)] = supervision.Failure(
            rank=int(rank),
            exitcode=int(record.exitcode),
            time=float(exact if exact is not None else record.timestamp),
            exact=exact is not None,
            message=message,
        )
    return out


def rank_log(log_dir: Path, run_id: str | None, rank: int) -> Path | None:
    """``stderr.log`` of ``rank`` in the latest attempt of this run (local rank == rank here)."""
    runs = sorted(log_dir.glob(f"{run_id}_*" if run_id else "*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return None
    attempts = sorted(runs[-1].glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    if not attempts:
        return None
    path = attempts[-1] / str(rank) / "stderr.log"
    return path if path.exists() else None


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).isoformat(sep=" ", timespec="milliseconds")


def report(
    failures: dict, run_dir: str | Path, log_dir: Path, *, prog: str, run_id: str | None = None
) -> str:
    """One line naming the root-cause rank, how and when it failed, and its log (or its error)."""
    records = failures_from_torchrun(failures)
    beats = supervision.read_heartbeats(run_dir)
    rank, stalled = supervision.root_cause(records, beats)
    failure, beat = records[rank], beats.get(rank)
    how = f"signal {failure.signal_name}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    if stalled:
        waited = min(b.alive_time for r, b in beats.items() if r != rank and r in records) - beat.alive_time
        what = (
            f"stopped making progress first (last step {beat.step}, last sign of life at "
            f"{_when(beat.alive_time)}; its peers waited {waited:.1f} s longer), then ended ({how})"
        )
    else:
        at = supervision.failure_time(failure, beat)
        what = f"failed first ({how}) at {_when(at)}"
    log = rank_log(log_dir, run_id, rank)
    error = failure.message.strip().splitlines()[0][:300] if failure.message.strip() else ""
    where = f"its log: {log}" if log is not None else f"its error: {error or 'not recorded'}"
    if log is not None and error:
        where = f"{error}; {where}"
    return f"{prog}: error: rank {rank} {what}; {where}"


# ---- the worker entry ----------------------------------------------------------------------------
def _record_error(err: BaseException) -> None:
    """Write torchrun's error file (its format, plus the exact time) for this worker's exception."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    now = time.time()
    data = {
        "message": f"{type(err).__name__}: {err}",
        "timestamp": str(int(now)),
        "smile_time": now,
        "traceback": "".join(traceback.format_exception(err)),
    }
    partial = f"{path}.partial"
    try:  # atomic: torchrun's agent parses this file, and a rank may be killed while writing it
        with open(partial, "w") as handle:
            json.dump(data, handle)
        os.replace(partial, path)
    except OSError:
        pass


def worker_main(module: str, argv: list[str]) -> int:
    """``module.main(argv)`` in a torchrun worker; an exception is recorded (with its time) and
    re-raised; after a good run the process group is ended with the peers. The module is named, not
    imported here: the runtime does not depend on its callers."""
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit:
        raise
    except BaseException as err:
        _record_error(err)
        raise
    if code == 0:
        stop_process_group()
    return code


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2:]))
