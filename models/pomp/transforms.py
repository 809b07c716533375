"""Image pipelines without torchvision: CLIP's eval transform (bicubic resize + centre crop) and
the paper's training augmentation (random resized crop + flip + RandAugment(n))."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.Resampling.BICUBIC


def to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop(image: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0)) -> Image.Image:
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return image.resize((size, size), BICUBIC, box=(left, top, left + cw, top + ch))
    return center_crop(image, size)


def _ops(level: float):
    """RandAugment's operations at magnitude ``level`` in [0, 1] (sign drawn per call)."""
    return {
        "identity": lambda im, s: im,
        "autocontrast": lambda im, s: ImageOps.autocontrast(im),
        "equalize": lambda im, s: ImageOps.equalize(im),
        "rotate": lambda im, s: im.rotate(30 * level * s),
        "solarize": lambda im, s: ImageOps.solarize(im, int(256 - 256 * level)),
        "color": lambda im, s: ImageEnhance.Color(im).enhance(1 + 0.9 * level * s),
        "contrast": lambda im, s: ImageEnhance.Contrast(im).enhance(1 + 0.9 * level * s),
        "brightness": lambda im, s: ImageEnhance.Brightness(im).enhance(1 + 0.9 * level * s),
        "sharpness": lambda im, s: ImageEnhance.Sharpness(im).enhance(1 + 0.9 * level * s),
        "posterize": lambda im, s: ImageOps.posterize(im, max(1, 8 - int(4 * level))),
        "shear_x": lambda im, s: im.transform(
            im.size, Image.Transform.AFFINE, (1, 0.3 * level * s, 0, 0, 1, 0)
        ),
        "shear_y": lambda im, s: im.transform(
            im.size, Image.Transform.AFFINE, (1, 0, 0, 0.3 * level * s, 1, 0)
        ),
        "translate_x": lambda im, s: im.transform(
            im.size, Image.Transform.AFFINE, (1, 0, 0.45 * im.size[0] * level * s, 0, 1, 0)
        ),
        "translate_y": lambda im, s: im.transform(
            im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, 0.45 * im.size[1] * level * s)
        ),
    }


def rand_augment(image: Image.Image, n: int, rng: random.Random, magnitude: int = 10) -> Image.Image:
    """n operations drawn uniformly, each at magnitude/30 (RandAugment, Cubuk et al. 2020)."""
    ops = _ops(magnitude / 30)
    for name in rng.choices(sorted(ops), k=n):
        image = ops[name](image.convert("RGB"), rng.choice((-1, 1)))
    return image


def train_transform(
    image: Image.Image, size: int, augment: str, randaug_n: int, rng: random.Random
) -> Image.Image:
    if augment == "none":
        return center_crop(image, size)
    image = random_resized_crop(image, size, rng)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return rand_augment(image, randaug_n, rng) if augment == "randaugment" else image
