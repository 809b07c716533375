"""Offline moving-square clips whose class is the direction of motion (right, left, down, up).

Why this design: the ablation without temporal adaptation is a bag of frames (per-frame CLS
averaged over T), so the clips are built so that the *set* of frames says nothing about the
direction along an axis. Starts are uniform over the positions from which the whole path fits, so
"right from x" and "left from x + path" show the same frames in reverse order, and the first
frame of a clip has the same distribution as the last frame of its reverse. A bag of frames can
still see the axis (a horizontal or vertical path), so its ceiling is 50% over the 4 classes and
chance (50%) for the direction within an axis; only order (time) tells right from left.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy): right, left, down, up
NAMES = ("right", "left", "down", "up")


def motion_clips(
    n: int,
    num_frames: int = 4,
    image_size: int = 32,
    square: int = 8,
    step: int = 6,
    classes: int = 4,
    seed: int = 0,
    noise: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """``n`` clips (n, 3, T, H, W) (already normalised: background ~0, square +2) and labels."""
    if classes not in (2, 4):
        raise ValueError(f"motion clips have 2 or 4 direction classes, got {classes}")
    path = step * (num_frames - 1)
    span = image_size - square - path  # starts from which the whole path fits
    if span < 0:
        raise ValueError(
            f"a {square}px square moving {step}px x {num_frames - 1} does not fit {image_size}px"
        )
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=gen)
    along = torch.randint(span + 1, (n,), generator=gen)
    across = torch.randint(image_size - square + 1, (n,), generator=gen)
    video = noise * torch.randn(n, 1, num_frames, image_size, image_size, generator=gen)
    for i in range(n):
        dx, dy = DIRECTIONS[int(labels[i])]
        start = int(along[i]) + (path if dx + dy < 0 else 0)
        for t in range(num_frames):
            pos = start + (dx + dy) * step * t
            x, y = (pos, int(across[i])) if dx else (int(across[i]), pos)
            video[i, 0, t, y : y + square, x : x + square] += 2.0
    return video.expand(-1, 3, -1, -1, -1).contiguous(), labels


def random_frames(
    n: int,
    image_size: int = 32,
    square: int = 8,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Single frames with the square anywhere, and its centre in [-1, 1]^2 (x, y): the image task."""
    images = noise * torch.randn(n, 1, image_size, image_size, generator=generator)
    xy = torch.randint(image_size - square + 1, (n, 2), generator=generator)
    for i, (x, y) in enumerate(xy.tolist()):
        images[i, 0, y : y + square, x : x + square] += 2.0
    centres = (xy.float() + square / 2) / image_size * 2 - 1
    return images.expand(-1, 3, -1, -1).contiguous(), centres
