"""Tables of multimodal rows from scikit-learn, local CSV folders or HF ``datasets``.

A table is columns of equal length; rows are read in batches (``take``) so large image
datasets are decoded lazily. Layouts:

* ``sklearn`` "wine" (columns f0..f12, ``label`` 0..2) or "digits" (f0..f63, the 8x8 pixels,
  ``label`` 0..9): a stratified train/test split of ``test_fraction``, optionally a stratified
  "validation" split (``val_fraction``) and a stratified cut of the train rows (``train_rows``),
  with optional Gaussian noise of ``noise_std`` feature standard deviations (plus ``shift_std`` on
  the validation and test splits only).
* ``csv``: ``<name>/<split>.csv`` with a header row; empty cells are missing values; image cells
  hold paths relative to ``image_root`` (default ``<name>``), several separated by ';' (the first
  is used, as in the official Petfinder script).
* ``jsonl``: ``<name>/<split>.jsonl``, one JSON object per row (Hateful Memes' own format); keys
  missing from a row are missing values; image paths as for csv.
* ``hf``: ``datasets.load_from_disk(name)[split]`` when ``name`` is a directory written by
  ``save_to_disk``, else ``datasets.load_dataset(name, hf_name, split=split)`` (from the local
  cache unless the user's environment allows downloads).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Protocol

from smile.models.lemda.config import DataConfig


class Table(Protocol):
    """Columns of equal length, read whole (for fitting statistics) or by rows."""

    columns: list[str]

    def __len__(self) -> int: ...

    def column(self, name: str) -> list[Any]: ...

    def take(self, indices: list[int]) -> dict[str, list[Any]]: ...


class ColumnTable:
    """A table held as Python lists."""

    def __init__(self, data: dict[str, list[Any]], source: str = "table") -> None:
        lengths = {name: len(values) for name, values in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{source}: columns have different lengths {lengths}")
        self.data, self.source = data, source
        self.columns = list(data)
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def column(self, name: str) -> list[Any]:
        _check_column(name, self.columns, self.source)
        return self.data[name]

    def take(self, indices: list[int]) -> dict[str, list[Any]]:
        return {name: [values[i] for i in indices] for name, values in self.data.items()}

    def head(self, rows: int) -> ColumnTable:
        return ColumnTable({k: v[:rows] for k, v in self.data.items()}, self.source)


class HFTable:
    """A ``datasets.Dataset``; ``take`` decodes only the requested rows (images included)."""

    def __init__(self, dataset: Any, source: str) -> None:
        self.dataset, self.source = dataset, source
        self.columns = list(dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def column(self, name: str) -> list[Any]:
        _check_column(name, self.columns, self.source)
        return list(self.dataset[name])

    def take(self, indices: list[int]) -> dict[str, list[Any]]:
        return self.dataset[list(indices)]

    def head(self, rows: int) -> HFTable:
        return HFTable(self.dataset.select(range(min(rows, len(self.dataset)))), self.source)


def _check_column(name: str, columns: list[str], source: str) -> None:
    if name not in columns:
        raise KeyError(f"{source} has no column {name!r}; columns: {columns}")


def load_split(cfg: DataConfig, split: str) -> ColumnTable | HFTable:
    """One split of the configured dataset."""
    if cfg.source == "sklearn":
        table: ColumnTable | HFTable = _sklearn(cfg, split)
    elif cfg.source == "csv":
        table = _csv(Path(cfg.name) / f"{split}.csv")
    elif cfg.source == "jsonl":
        table = _jsonl(Path(cfg.name) / f"{split}.jsonl")
    else:
        table = _hf(cfg, split)
    if cfg.max_rows is not None and len(table) > cfg.max_rows:
        table = table.head(cfg.max_rows)
    return table


def image_root(cfg: DataConfig) -> Path | None:
    if cfg.image_root is not None:
        return Path(cfg.image_root)
    return Path(cfg.name) if cfg.source in ("csv", "jsonl") else None


def _csv(path: Path) -> ColumnTable:
    if not path.is_file():
        raise FileNotFoundError(f"data: no CSV file {str(path)!r} (expected <data.name>/<split>.csv)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise ValueError(f"{path}: the CSV has no header row")
        columns: dict[str, list[Any]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in columns:
                value = row.get(name)
                columns[name].append(None if value is None or value == "" else value)
    return ColumnTable(columns, str(path))


def _jsonl(path: Path) -> ColumnTable:
    if not path.is_file():
        raise FileNotFoundError(f"data: no file {str(path)!r} (expected <data.name>/<split>.jsonl)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: each line must hold a JSON object")
                records.append(record)
    names = list(dict.fromkeys(key for record in records for key in record))
    return ColumnTable({n: [record.get(n) for record in records] for n in names}, str(path))


def _hf(cfg: DataConfig, split: str) -> HFTable:
    import datasets

    local = Path(cfg.name)
    if local.is_dir():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{local} has no split {split!r}; splits: {list(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(cfg.name, cfg.hf_name, split=split)
    return HFTable(loaded, f"{cfg.name}[{split}]")


VALIDATION = "validation"


def _sklearn(cfg: DataConfig, split: str) -> ColumnTable:
    """Stratified test / validation / train splits of a scikit-learn table, the train part
    optionally cut to ``train_rows`` (stratified), with optional Gaussian feature noise."""
    try:
        import numpy as np
        from sklearn.datasets import load_digits, load_wine
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("data.source='sklearn' needs scikit-learn (pip install scikit-learn)") from err
    splits = [cfg.train_split, cfg.eval_split] + ([VALIDATION] if cfg.val_fraction > 0 else [])
    if split not in splits:
        raise KeyError(f"sklearn {cfg.name} has splits {splits}, not {split!r}")
    x, y = (load_wine if cfg.name == "wine" else load_digits)(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=cfg.seed
    )
    parts = {cfg.eval_split: (x_test, y_test)}
    if cfg.val_fraction > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train,
            y_train,
            test_size=round(cfg.val_fraction * len(y)),
            stratify=y_train,
            random_state=cfg.seed,
        )
        parts[VALIDATION] = (x_val, y_val)
    if cfg.train_rows is not None and cfg.train_rows < len(y_train):
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=cfg.train_rows, stratify=y_train, random_state=cfg.seed
        )
    if cfg.label_noise > 0:
        y_train = _flip_labels(y_train, cfg.label_noise, int(y.max()) + 1, np.random.default_rng(cfg.seed))
    parts[cfg.train_split] = (x_train, y_train)
    x, y = parts[split]
    noise = cfg.noise_std + (cfg.shift_std if split != cfg.train_split else 0.0)
    if noise > 0:
        rng = np.random.default_rng(cfg.seed + splits.index(split))
        x = x + noise * x_train.std(axis=0) * rng.standard_normal(x.shape)
    columns: dict[str, list[Any]] = {f"f{j}": x[:, j].tolist() for j in range(x.shape[1])}
    columns["label"] = [int(v) for v in y]
    return ColumnTable(columns, f"sklearn {cfg.name}[{split}]")


def _flip_labels(y: Any, fraction: float, classes: int, rng: Any) -> Any:
    """``round(fraction * len(y))`` rows, drawn without replacement, get another class drawn
    uniformly (symmetric label noise on the training rows only)."""
    y = y.copy()
    rows = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    y[rows] = (y[rows] + rng.integers(1, classes, size=len(rows))) % classes
    return y


def as_float(value: Any) -> float:
    """A numerical cell as a float (NaN when missing or not a number)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
