"""Training metrics: step-time breakdown, throughput, MFU, and their sinks (JSONL, TensorBoard,
progress bar, end-of-run plot). Rank 0 writes; every rank measures.

The MoE sections of a step are timed by running one step every ``profile_every`` under
``torch.profiler`` and summing the events whose names start with ``smile.``: router and expert
modules are labelled here (forward hooks, only during that step); other sections (dispatch,
All2All hops) are labelled by the core with ``torch.profiler.record_function``; All2All
collectives the profiler records are summed too. Outside profiled steps this costs nothing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smile.runtime.distributed import device, gather_json

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(override: float | None) -> float | None:
    """Dense bf16 peak of this GPU (None on CPU or an unknown device)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class StepTimer:
    """Wall time per named phase of the current optimizer step (synchronising CUDA)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_COLLECTIVE_HINTS = ("all_to_all", "alltoall")


def profile_sections(prof: Any) -> dict[str, float]:
    """Seconds spent in ``smile.*`` labelled regions (and All2All collectives) of a profile."""
    sections: dict[str, float] = defaultdict(float)
    for event in prof.events():
        name = event.name
        if name.startswith("smile."):
            sections[name[len("smile.") :]] += event.cpu_time_total / 1e6
        elif any(h in name.lower() for h in _COLLECTIVE_HINTS):
            sections["all2all_ops"] += event.cpu_time_total / 1e6
    return dict(sections)


@contextmanager
def maybe_profile(enabled: bool, model: torch.nn.Module):
    """Yield a torch.profiler session (router and expert modules labelled) when enabled, else None."""
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _labelled_modules(model), torch.profiler.profile(activities=activities) as prof:
        yield prof


@contextmanager
def _labelled_modules(model: torch.nn.Module):
    """Open a ``smile.router`` / ``smile.experts`` profiler region around those modules' forward."""
    from smile.moe.experts import ExpertFFN
    from smile.moe.routing import Router

    handles = []
    for module in model.modules():
        label = (
            "smile.router"
            if isinstance(module, Router)
            else "smile.experts"
            if isinstance(module, ExpertFFN)
            else None
        )
        if label is None:
            continue
        regions: list = []

        def enter(_module, _args, label=label, regions=regions):
            regions.append(torch.profiler.record_function(label))
            regions[-1].__enter__()

        def leave(_module, _args, _out, regions=regions):
            regions.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reduce_mean(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Average per-key sums over every rank's counts (ranks may report different keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: sums[k] / counts[k] for k in sums if counts.get(k)}
    keys = sorted({k for ks in gather_json(sorted(sums)) for k in ks})
    if not keys:
        return {}
    dev = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    t = t.cpu()
    return {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(keys) if t[i, 1] > 0}


class MetricsSink:
    """Where records go: a JSONL file, optional TensorBoard, a tqdm bar; only on rank 0."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        total_steps: int,
        start_step: int,
        jsonl: bool,
        tensorboard: bool,
        progress_bar: bool,
    ) -> None:
        self.active = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._bar is not None and record.get("split") == "train":
            shown = {k: record[k] for k in ("loss", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss (train and eval) and throughput against step, from the JSONL log."""
    records = read_records(metrics_path)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("split") == "eval" and "loss" in r]
    fig, (ax_loss, ax_tp) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    key = "tokens_per_s" if any("tokens_per_s" in r for r in train) else "samples_per_s"
    ax_tp.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r])
    ax_tp.set_xlabel("step")
    ax_tp.set_ylabel(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
