"""The offline data set-up: scikit-learn's bundled digits as 32x32 RGB images of digit tuples.

Class ``(a, b)`` is an image with digit a on the left and digit b on the right, named
``"<a> <b>"`` in words ("three seven"): 100 classes with compositional names, enough for local
contrast (K << N) to differ from a full softmax. Triples ``(a, b, c)`` ("three seven one") give
1000 classes, the regime the method is for: a full softmax encodes 1000 prompts per step while
local contrast encodes at most B + K - 1. Train and test images come from disjoint halves of the
1797 digit scans.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def tuple_names(arity: int = 2) -> list[str]:
    """Class names in class-id order: id = digits read as a base-10 number ("zero seven" is 7)."""
    return [" ".join(WORDS[d] for d in digits) for digits in itertools.product(range(10), repeat=arity)]


def _scans(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    half = len(order) // 2
    pools = []
    for part in (order[:half], order[half:]):
        pools.append([digits.images[part][digits.target[part] == d] for d in range(10)])
    return pools[0], pools[1]


_ROWS, _COLS10 = np.arange(16) // 2, np.arange(10) * 8 // 10  # nearest-neighbour 8x8 -> 16x10


def _render(scans: list[np.ndarray]) -> np.ndarray:
    """8x8 scans (0..16) side by side in a 32x32 uint8 RGB image: two upsampled to 16x16 each,
    or three to 16 rows x 10 columns each."""
    canvas = np.zeros((32, 32), dtype=np.float32)
    if len(scans) == 2:
        canvas[8:24, :16] = np.kron(scans[0], np.ones((2, 2)))
        canvas[8:24, 16:] = np.kron(scans[1], np.ones((2, 2)))
    else:
        for j, scan in enumerate(scans):
            canvas[8:24, 1 + 10 * j : 11 + 10 * j] = scan[_ROWS][:, _COLS10]
    return np.repeat((canvas * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=2)


def digit_tuples(
    per_class: int,
    split: str = "train",
    classes: list[int] | None = None,
    seed: int = 0,
    arity: int = 2,
) -> tuple[np.ndarray, Tensor]:
    """(uint8 images (n, 32, 32, 3), labels (n,)) with ``per_class`` images of each class of
    ``arity`` digits (all 10**arity, or the given class ids, labelled by their position in
    ``classes``)."""
    if arity not in (2, 3):
        raise ValueError(f"arity={arity} is not supported; allowed: 2 (pairs), 3 (triples)")
    train, test = _scans(0)
    pool = train if split == "train" else test
    rng = np.random.default_rng(seed + (0 if split == "train" else 7919))
    classes = list(range(10**arity)) if classes is None else classes
    images, labels = [], []
    for label, cls in enumerate(classes):
        digits = np.unravel_index(cls, (10,) * arity)
        for _ in range(per_class):
            images.append(_render([pool[d][rng.integers(len(pool[d]))] for d in digits]))
            labels.append(label)
    return np.stack(images), torch.tensor(labels)
