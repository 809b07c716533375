"""Seeded, resumable, rank-sharded mini-batches with the official augmentations.

Each epoch's order and every augmentation draw come from generators seeded by (seed, epoch,
batch), so a resumed run sees exactly the batches an uninterrupted one does, whatever the number
of loader workers. Batches are dicts ``{"image": float [0, 1] (B, C, H, W), "label": int64}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from smile.models.trap_replace.poison import PoisonedSet


def crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding=4) with zero padding + RandomHorizontalFlip, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    tops = torch.randint(0, 2 * padding + 1, (b,), generator=gen).tolist()
    lefts = torch.randint(0, 2 * padding + 1, (b,), generator=gen).tolist()
    flips = (torch.rand(b, generator=gen) < 0.5).tolist()
    out = torch.stack(
        [padded[i, :, top : top + h, left : left + w] for i, (top, left) in enumerate(zip(tops, lefts))]
    )
    return torch.where(torch.tensor(flips).view(b, 1, 1, 1), out.flip(-1), out)


def random_resized_crop(
    x: torch.Tensor, gen: torch.Generator, size: int, scale: tuple[float, float] = (0.2, 1.0)
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3) + RandomHorizontalFlip, per image
    (torchvision's sampling: 10 tries, then a centre crop of clamped aspect ratio)."""
    _, _, h, w = x.shape
    area = h * w
    out = []
    for img in x:
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
            log_ratio = float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
            ratio = math.exp(log_ratio)
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                break
        else:
            ch, cw = min(h, w), min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        crop = img[None, :, top : top + ch, left : left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out).clamp(0, 1)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


class _BatchReader(torch.utils.data.Dataset):
    """Turns a (positions, seed) key into a batch; picklable for DataLoader workers."""

    def __init__(self, images: PoisonedSet, augment: str, crop: int) -> None:
        self.images, self.augment, self.crop = images, augment, crop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[list[int], int]) -> dict[str, torch.Tensor]:
        positions, seed = key
        x = self.images.load(positions).to(torch.float32) / 255.0
        gen = torch.Generator().manual_seed(seed)
        if self.augment == "crop_flip":
            x = crop_flip(x, gen)
        elif self.augment == "resized_crop":
            x = random_resized_crop(x, gen, self.crop)
        elif self.augment == "center_crop":
            x = center_crop(x, self.crop)
        labels = self.images.labels[torch.as_tensor(positions, dtype=torch.int64)]
        return {"image": x.contiguous(), "label": labels}


class Batches:
    """Mini-batches of ``images`` for one rank: ``batch_size`` is per rank, the global batch is
    ``batch_size * world_size``. Training order is shuffled per epoch with the last partial
    global batch dropped (as the official loaders do); evaluation order is sequential and
    complete. ``augment``: crop_flip, resized_crop, center_crop or none."""

    def __init__(
        self,
        images: PoisonedSet,
        batch_size: int,
        *,
        shuffle: bool,
        augment: str = "none",
        crop: int = 224,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.reader = _BatchReader(images, augment, crop)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out (resume point)
        if len(self) == 0:
            raise ValueError(
                f"{len(images)} images make no batch of {batch_size} per rank x {world_size} ranks"
            )

    def __len__(self) -> int:
        n = len(self.reader)
        if self.shuffle:
            return n // (self.batch_size * self.world_size)
        return math.ceil(math.ceil(n / self.world_size) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def _keys(self) -> list[tuple[list[int], int]]:
        n = len(self.reader)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
            glob = self.batch_size * self.world_size
            batches = [order[b * glob : (b + 1) * glob] for b in range(len(self))]
            mine = [
                batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size] for batch in batches
            ]
        else:
            own = torch.arange(n)[self.rank :: self.world_size]
            mine = [own[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]
            mine = [m for m in mine if len(m)]
        base = (self.seed * 1_000_003 + self.epoch) * 100_003 + self.rank * 7_919
        return [(m.tolist(), base + b) for b, m in enumerate(mine)]

    def __iter__(self):
        if not self.shuffle:  # evaluation passes always start at the beginning
            self.position = 0
        keys = self._keys()[self.position :]
        if self.num_workers == 0:
            batches = (self.reader[key] for key in keys)
        else:
            batches = iter(
                torch.utils.data.DataLoader(
                    self.reader, batch_size=None, sampler=keys, num_workers=self.num_workers
                )
            )
        for batch in batches:
            self.position += 1
            yield batch
        self.position = 0  # a completed pass; the next one starts over

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
