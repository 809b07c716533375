"""Video decoding (PyAV) and AIM's frame sampling and clip transforms (mmaction2's pipeline).

Sampling: ``interval`` is mmaction2's dense SampleFrames (T frames ``interval`` apart from a random
offset; at test time ``num_clips`` offsets spread evenly), used for Kinetics and Diving-48;
``uniform`` is TSN-style segment sampling (one frame from each of T equal segments), used for SSv2.
Transforms keep one crop for all frames of a clip: RandomResizedCrop + flip for training; resize
of the short side then 1 centre crop or 3 crops along the long side for testing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_video(path: str | Path) -> Tensor:
    """Every frame of the first video stream, (N, H, W, 3) uint8, decoded with PyAV."""
    import av  # the maintained FFmpeg binding; imported on use

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"video {str(path)!r} could not be decoded: {err}") from err
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    return torch.from_numpy(np.stack(frames))


def interval_indices(
    total: int, num_frames: int, interval: int, num_clips: int = 1, train: bool = True, rng=None
) -> list[list[int]]:
    """mmaction2 SampleFrames: ``num_clips`` clips of T frames ``interval`` apart (looped when
    the video is short). Training draws the offset; testing spreads the clips evenly."""
    span = num_frames * interval
    if train:
        offsets = [int(rng.integers(0, total - span + 1)) if total > span else 0 for _ in range(num_clips)]
    elif total > span - 1:
        step = (total - span + 1) / num_clips
        offsets = [int(step * c + step / 2) for c in range(num_clips)]
    else:
        offsets = [0] * num_clips
    return [[(o + t * interval) % total for t in range(num_frames)] for o in offsets]


def uniform_indices(
    total: int, num_frames: int, num_clips: int = 1, train: bool = True, rng=None
) -> list[list[int]]:
    """TSN segments: one frame per each of T equal segments, random within it when training; at
    test time clip c takes position (c + 0.5) / num_clips of every segment."""
    seg = total / num_frames
    clips = []
    for c in range(num_clips):
        if train:
            pos = [seg * t + float(rng.random()) * seg for t in range(num_frames)]
        else:
            pos = [seg * (t + (c + 0.5) / num_clips) for t in range(num_frames)]
        clips.append([min(int(p), total - 1) for p in pos])
    return clips


def to_clip(frames: Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """(T, H, W, 3) uint8 -> normalised float (3, T, H, W)."""
    x = frames.permute(3, 0, 1, 2).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None, None]) / torch.tensor(std)[:, None, None, None]


def _resize(clip: Tensor, h: int, w: int) -> Tensor:
    """(C, T, H, W) -> (C, T, h, w), bilinear."""
    out = F.interpolate(
        clip.transpose(0, 1), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
    return out.transpose(0, 1)


def random_resized_crop(clip: Tensor, size: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """One RandomResizedCrop (same box for every frame), resized to size x size."""
    _, _, h, w = clip.shape
    for _ in range(10):
        area = h * w * float(rng.uniform(*scale))
        aspect = math.exp(float(rng.uniform(math.log(ratio[0]), math.log(ratio[1]))))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(clip[:, :, top : top + ch, left : left + cw], size, size)
    side = min(h, w)  # fallback: the central square
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(clip[:, :, top : top + side, left : left + side], size, size)


def resize_short(clip: Tensor, size: int) -> Tensor:
    _, _, h, w = clip.shape
    scale = size / min(h, w)
    return _resize(clip, max(size, round(h * scale)), max(size, round(w * scale)))


def multi_crops(clip: Tensor, size: int, crops: int) -> list[Tensor]:
    """Short side resized to ``size``; 1 centre crop, or 3 crops spread along the long side."""
    clip = resize_short(clip, size)
    _, _, h, w = clip.shape
    if crops == 1:
        positions = [((h - size) // 2, (w - size) // 2)]
    elif w >= h:
        positions = [((h - size) // 2, x) for x in (0, (w - size) // 2, w - size)]
    else:
        positions = [(y, (w - size) // 2) for y in (0, (h - size) // 2, h - size)]
    return [clip[:, :, y : y + size, x : x + size] for y, x in positions]
