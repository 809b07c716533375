"""Loading a task's examples: the user's local files first, then the HF ``datasets`` cache.

Nothing is downloaded: HF datasets are opened with the hub offline, from ``cache_dir`` (or the
default cache). A dataset found nowhere raises FileNotFoundError saying where to put it. A
``limit`` takes a seeded random subsample (indices sorted, recorded in the results).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smile.models.zeroshot_eval.tasks import Row, Task


@dataclass(frozen=True)
class Example:
    """One test item: its position in the test set, the rendered input and the gold target."""

    idx: int
    input: str
    target: Any


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples or None (all), got {limit!r}")


def _read_local(path: Path) -> list[Row]:
    """A JSON list, a {"examples": [...]} file (Kojima's and BIG-bench's), JSON lines, or a folder
    of one-JSON-object files (MuTual's release)."""
    if path.is_dir():
        return [json.loads(p.read_text()) for p in sorted(path.iterdir()) if p.suffix in (".txt", ".json")]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = json.loads(path.read_text())
    return data["examples"] if isinstance(data, dict) else data


def _offline_hub() -> None:
    """Never touch the hub from here (also when ``datasets`` was imported before)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True


def _read_hf(task: Task, cache_dir: str | None) -> list[Row] | None:
    if task.hf is None:
        return None
    _offline_hub()
    import datasets

    try:
        data = datasets.load_dataset(task.hf.path, task.hf.name, split=task.hf.split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, ValueError, OSError):
        return None
    return [dict(row) for row in data]


def where_to_put(task: Task, data_dir: str | None) -> str:
    folder = data_dir or "<data_dir>"
    files = " or ".join(f"{folder}/{name}" for name in task.local_files())
    hub = f"; or cache HF dataset {task.hf.path!r}" if task.hf else ""
    if task.hf:
        hub += f" (config {task.hf.name!r}, split {task.hf.split!r}) under cache_dir with `datasets`"
    return f"place it at {files}{hub}"


def load_rows(task: Task, data_dir: str | None = None, cache_dir: str | None = None) -> list[Row]:
    """The raw rows of ``task``'s test split (local files win over the HF cache)."""
    for name in task.local_files() if data_dir else ():
        path = Path(data_dir) / name
        if path.exists():
            return _read_local(path)
    rows = _read_hf(task, cache_dir)
    if rows is None:
        raise FileNotFoundError(
            f"dataset of task {task.name!r} not found locally (nothing is downloaded): "
            + where_to_put(task, data_dir)
        )
    return rows


def load_examples(
    task: Task,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """The task's examples; with ``limit``, a seeded subsample of that size in test-set order."""
    check_limit(limit)
    rows = load_rows(task, data_dir, cache_dir)
    indices = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        indices = sorted(random.Random(seed).sample(indices, limit))
    examples = []
    for i in indices:
        try:
            text, target = task.convert(rows[i])
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ValueError(f"task {task.name!r}: row {i} is not in the expected format ({err!r})") from None
        examples.append(Example(i, text, target))
    return examples
