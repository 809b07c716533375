"""The offline data set-up: scikit-learn's bundled digits as 32x32 RGB images of digit pairs.

Class ``(a, b)`` is an image with digit a on the left and digit b on the right, named
``"<a> <b>"`` in words ("three seven"): 100 classes with compositional names, enough for local
contrast (K << N) to differ from a full softmax. Train and test images come from disjoint halves
of the 1797 digit scans.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def pair_names() -> list[str]:
    return [f"{WORDS[a]} {WORDS[b]}" for a in range(10) for b in range(10)]


def _scans(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    half = len(order) // 2
    pools = []
    for part in (order[:half], order[half:]):
        pools.append([digits.images[part][digits.target[part] == d] for d in range(10)])
    return pools[0], pools[1]


def _render(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two 8x8 scans (0..16) upsampled to 16x16, side by side in a 32x32 uint8 RGB image."""
    canvas = np.zeros((32, 32), dtype=np.float32)
    canvas[8:24, :16] = np.kron(left, np.ones((2, 2)))
    canvas[8:24, 16:] = np.kron(right, np.ones((2, 2)))
    return np.repeat((canvas * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=2)


def digit_pairs(
    per_class: int, split: str = "train", classes: list[int] | None = None, seed: int = 0
) -> tuple[np.ndarray, Tensor]:
    """(uint8 images (n, 32, 32, 3), labels (n,)) with ``per_class`` images of each pair class
    (all 100, or the given class ids, labelled by their position in ``classes``)."""
    train, test = _scans(0)
    pool = train if split == "train" else test
    rng = np.random.default_rng(seed + (0 if split == "train" else 7919))
    classes = list(range(100)) if classes is None else classes
    images, labels = [], []
    for label, cls in enumerate(classes):
        a, b = divmod(cls, 10)
        for _ in range(per_class):
            left = pool[a][rng.integers(len(pool[a]))]
            right = pool[b][rng.integers(len(pool[b]))]
            images.append(_render(left, right))
            labels.append(label)
    return np.stack(images), torch.tensor(labels)
