"""Clip sources and this rank's batches.

A source yields a training clip (sampled and augmented, seeded by (seed, epoch, index)) or the
test views of one video (``test_clips`` temporal clips x ``test_crops`` spatial crops).
``video_list``: ``<path> <label>`` lines (the Kinetics/SSv2/Diving-48 list files), paths relative
to ``root``; ``motion``: the offline moving-square clips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from smile.models.aim.config import VideoData
from smile.models.aim.synthetic import motion_clips
from smile.models.aim.video import (
    interval_indices,
    multi_crops,
    random_resized_crop,
    read_video,
    resize_short,
    to_clip,
    uniform_indices,
)


def read_list(list_file: str | Path, root: str | Path = "") -> list[tuple[Path, int]]:
    """``<path> <label>`` lines (the path may contain spaces; the label is the last field)."""
    path = Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(f"video list {str(path)!r} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.rstrip().rpartition(" ")
        if not name or not label.lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
        items.append((Path(root) / name, int(label)))
    if not items:
        raise ValueError(f"video list {str(path)!r} is empty")
    return items


class VideoList:
    """Videos of a list file, decoded with PyAV and sampled as in the config."""

    def __init__(self, data: VideoData, num_frames: int, size: int, num_classes: int, flip: bool = True):
        self.items = read_list(data.list_file or "", data.root)
        bad = [label for _, label in self.items if not 0 <= label < num_classes]
        if bad:
            raise ValueError(
                f"label {bad[0]} in {data.list_file} is out of range for num_classes={num_classes}"
            )
        self.data, self.num_frames, self.size, self.flip = data, num_frames, size, flip

    def __len__(self) -> int:
        return len(self.items)

    def label(self, i: int) -> int:
        return self.items[i][1]

    def _indices(self, total: int, clips: int, train: bool, rng) -> list[list[int]]:
        if self.data.sampling == "uniform":
            return uniform_indices(total, self.num_frames, clips, train, rng)
        return interval_indices(total, self.num_frames, self.data.frame_interval, clips, train, rng)

    def train_clip(self, i: int, rng: np.random.Generator) -> Tensor:
        frames = read_video(self.items[i][0])
        clip = to_clip(frames[self._indices(len(frames), 1, True, rng)[0]])
        clip = random_resized_crop(resize_short(clip, self.size * 256 // 224), self.size, rng)
        return clip.flip(-1) if self.flip and rng.random() < 0.5 else clip

    def test_views(self, i: int, clips: int, crops: int) -> Tensor:
        frames = read_video(self.items[i][0])
        views = [
            crop
            for idx in self._indices(len(frames), clips, False, None)
            for crop in multi_crops(to_clip(frames[idx]), self.size, crops)
        ]
        return torch.stack(views)


class MotionSet:
    """The offline moving-square clips, generated once in memory (no augmentation)."""

    def __init__(self, data: VideoData, num_frames: int, size: int) -> None:
        self.videos, self.labels = motion_clips(
            data.size, num_frames, size, classes=data.motion_classes, seed=data.seed
        )

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def train_clip(self, i: int, rng: np.random.Generator) -> Tensor:
        return self.videos[i]

    def test_views(self, i: int, clips: int, crops: int) -> Tensor:
        return self.videos[i][None]


def build_source(
    data: VideoData, num_frames: int, size: int, num_classes: int, flip: bool = True
) -> VideoList | MotionSet:
    if data.source == "motion":
        return MotionSet(data, num_frames, size)
    return VideoList(data, num_frames, size, num_classes, flip)


class ClipBatches:
    """This rank's training batches ``{"video", "label"}``: a seeded shuffle per epoch, sharded
    over ranks (the same count on every rank, last partial batch dropped), resumable
    (``state_dict`` = epoch and position)."""

    def __init__(self, source, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.source) // (self.batch_size * self.world)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 9973 + self.epoch)
        order = torch.randperm(len(self.source), generator=gen).tolist()
        order = order[: len(self) * self.batch_size * self.world][self.rank :: self.world]
        while self.position < len(self):
            ids = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            clips = [
                self.source.train_clip(i, np.random.default_rng((self.seed, self.epoch, i))) for i in ids
            ]
            self.position += 1
            yield {"video": torch.stack(clips), "label": torch.tensor([self.source.label(i) for i in ids])}
