"""Streamed Hugging Face ``datasets`` sources: C4 and any other ``load_dataset`` path.

C4 is ``allenai/c4`` config ``en``: on the hub that config is the packaged ``json`` builder over
``en/c4-{split}.*.json.gz``. A local mirror of the repository (``DataConfig.paths = [root]``)
is loaded with the same builder and the same file pattern, so tests on a mirror-shaped fixture
exercise the code path real runs take. Nothing here downloads unless a hub id is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import IterableDataset

C4_HUB_ID = "allenai/c4"
C4_CONFIG = "en"


def c4_data_files(root: str, split: str) -> list[str]:
    """The shard files of ``split`` in a local allenai/c4 mirror, sorted."""
    pattern = f"c4-{split}.*.json.gz"
    files = sorted(str(p) for p in (Path(root) / C4_CONFIG).glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"DataConfig.paths: no {C4_CONFIG}/{pattern} under {root!r} (expected a local allenai/c4 mirror)"
        )
    return files


def open_c4(split: str, local_root: str | None = None) -> IterableDataset:
    """C4 ``en`` ``split`` as a streamed dataset: from the hub, or from a local mirror."""
    if local_root is None:
        return open_hf(C4_HUB_ID, C4_CONFIG, split)
    return open_hf("json", None, split, data_files={split: c4_data_files(local_root, split)})


def open_hf(
    path: str, name: str | None, split: str, data_files: list[str] | dict[str, list[str]] | None = None
) -> IterableDataset:
    """``datasets.load_dataset(..., streaming=True)`` for one split."""
    from datasets import load_dataset

    if isinstance(data_files, list):
        data_files = {split: data_files} if data_files else None
    return load_dataset(path, name, split=split, data_files=data_files, streaming=True)
