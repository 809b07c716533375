"""Micro-benchmarks (pytest-benchmark): one thread, fixed seeds, and the stored baseline's storage.

Not part of the default test run (``testpaths = ["tests"]``). The baseline is stored in
``benchmarks/micro/baseline`` (tracked; ``.benchmarks/`` is git-ignored), one folder per machine
id (``Linux-CPython-3.11-64bit``); ``make bench-micro`` compares with it, see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

STORAGE = Path(__file__).resolve().parent / "baseline"
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own defaults
DEFAULT_TIMER = "time.perf_counter"


def pytest_configure(config: pytest.Config) -> None:
    """Point pytest-benchmark at the baseline kept next to these files, and on CPU time it by the
    process's CPU time, unless told otherwise.

    Why CPU time: on a machine shared with other jobs, wall time measures how often this process
    got a core (medians moved 21-80% between two runs of unchanged code at load 8 on 2 cores);
    CPU time measures the code. On a GPU the wall clock stays (the device's work is not CPU time).
    Runs before pytest-benchmark's own pytest_configure (trylast), which reads both options.
    """
    if config.getoption("benchmark_storage", None) == DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{STORAGE}"
    if config.getoption("benchmark_timer", None) == DEFAULT_TIMER and not torch.cuda.is_available():
        config.option.benchmark_timer = "time.process_time"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One intra-op thread and a fixed seed: the machine is shared, the baseline must be comparable."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def synced(device: torch.device) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """Wrap a step so the timer sees the device's work, not just the kernel launches."""

    def wrap(step: Callable[[], object]) -> Callable[[], object]:
        if device.type != "cuda":
            return step

        def run() -> object:
            out = step()
            torch.cuda.synchronize()
            return out

        return run

    return wrap
