"""The poisoned threat model: a clean holdout, a poisoned training set, clean and triggered tests.

The split is a pure function of the dataset and :class:`PoisonCfg` (seeded), so both stages and
every rank rebuild exactly the same sets. The holdout is drawn first from the training data and
never poisoned; ``round(ratio * |train|)`` images of the rest get the trigger and the target
label (clean-label attacks: target-class images, labels unchanged). The triggered test set holds
the non-target test images with the trigger and their true labels; ASR counts predictions equal
to the target on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from smile.models.trap_replace.attacks import CLEAN_LABEL_ATTACKS, Trigger, make_trigger
from smile.models.trap_replace.config import PoisonCfg
from smile.models.trap_replace.datasets import ImageDataset, ImageSet


class PoisonedSet:
    """A view of ``base`` at ``indices``; items flagged in ``poisoned`` get ``trigger`` (after
    the optional per-item ``replacement`` images, the clean-label attack's perturbed versions)."""

    def __init__(
        self,
        base: ImageSet,
        indices: torch.Tensor,
        poisoned: torch.Tensor,
        labels: torch.Tensor,
        trigger: Trigger | None,
        replacement: torch.Tensor | None = None,
    ) -> None:
        self.base = base
        self.indices = indices.to(torch.int64)
        self.poisoned = poisoned.to(torch.bool)
        self.labels = labels.to(torch.int64)
        self.trigger = trigger
        self.replacement = replacement

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, positions: Sequence[int]) -> torch.Tensor:
        positions = torch.as_tensor(positions, dtype=torch.int64)
        images = self.base.load(self.indices[positions].tolist())
        hit = self.poisoned[positions]
        if self.trigger is not None and bool(hit.any()):
            chosen = images[hit]
            if self.replacement is not None:
                chosen = self.replacement[self.indices[positions][hit]]
            images = images.clone()
            images[hit] = self.trigger(chosen)
        return images

    def subset(self, positions: torch.Tensor) -> PoisonedSet:
        return PoisonedSet(
            self.base,
            self.indices[positions],
            self.poisoned[positions],
            self.labels[positions],
            self.trigger,
            self.replacement,
        )

    @property
    def poisoned_indices(self) -> torch.Tensor:
        """Indices into the base set of the poisoned items."""
        return self.indices[self.poisoned]


class PoisonSplit(NamedTuple):
    train: PoisonedSet
    holdout: PoisonedSet
    test_clean: PoisonedSet
    test_triggered: PoisonedSet


def _image_shape(images: ImageSet) -> tuple[int, int, int]:
    return tuple(images.load([0]).shape[1:])


def _read_hard_images(path: Path) -> torch.Tensor:
    """The clean-label attack's perturbed training set from its .npy file (N, H, W, C), 0..255;
    any unreadable or misshapen file is one ValueError naming the file and the allowed format."""
    allowed = "allowed format: .npy holding an (N, H, W, C) array of 0..255 values (e.g. inf_16.npy)"
    if path.suffix.lower() != ".npy":
        raise ValueError(f"poison.cl_hard_images={str(path)!r} is not a .npy file; {allowed}")
    if not path.is_file():
        raise FileNotFoundError(f"poison.cl_hard_images={str(path)!r} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types on a corrupt file
        raise ValueError(
            f"poison.cl_hard_images={str(path)!r} is not a readable .npy file ({type(err).__name__}: {err}); "
            f"{allowed}"
        ) from None
    if (
        array.dtype.kind not in "biuf"
        or array.ndim != 4
        or array.size == 0
        or array.min() < 0
        or array.max() > 255
    ):
        raise ValueError(
            f"poison.cl_hard_images={str(path)!r} holds a {array.dtype} array of shape {array.shape} "
            f"(or values outside 0..255); {allowed}"
        )
    return torch.from_numpy(array.astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def _hard_images(cfg: PoisonCfg, given: torch.Tensor | None, base: ImageSet) -> torch.Tensor:
    if given is None:
        if not cfg.cl_hard_images:
            raise ValueError(
                "attack 'cl' needs the adversarially perturbed training images: set poison.cl_hard_images "
                "to a .npy (N, H, W, C) uint8 array in dataset order (Turner et al.'s release, "
                "e.g. inf_16.npy)"
            )
        given = _read_hard_images(Path(cfg.cl_hard_images))
    expected = (len(base), *_image_shape(base))
    if tuple(given.shape) != expected:
        raise ValueError(
            f"clean-label hard images have shape {tuple(given.shape)}, the training set {expected}"
        )
    return given.to(torch.uint8)


def _trigger(dataset: ImageDataset, cfg: PoisonCfg) -> Trigger:
    cfg.validate()
    if not 0 <= cfg.target < dataset.num_classes:
        raise ValueError(f"poison.target={cfg.target} is out of range for {dataset.num_classes} classes")
    channels, height, width = _image_shape(dataset.train)
    return make_trigger(
        cfg.attack,
        channels,
        height,
        width,
        seed=cfg.seed,
        trigger_file=cfg.trigger_file,
        mask_file=cfg.mask_file,
        patch_size=cfg.patch_size,
    )


def make_test_sets(dataset: ImageDataset, cfg: PoisonCfg) -> tuple[PoisonedSet, PoisonedSet]:
    """(clean test set, triggered non-target test set with true labels)."""
    trigger = _trigger(dataset, cfg)
    test = dataset.test
    test_clean = PoisonedSet(
        test, torch.arange(len(test)), torch.zeros(len(test), dtype=torch.bool), test.labels, None
    )
    source = torch.nonzero(test.labels != cfg.target).flatten()
    test_triggered = PoisonedSet(
        test, source, torch.ones(len(source), dtype=torch.bool), test.labels[source], trigger
    )
    return test_clean, test_triggered


def make_poisoned_split(
    dataset: ImageDataset, cfg: PoisonCfg, *, hard_images: torch.Tensor | None = None
) -> PoisonSplit:
    """(poisoned train, clean holdout, clean test, triggered non-target test) for ``cfg``.

    hard_images: attack 'cl' only, uint8 (N, C, H, W) perturbed versions of the training set
        (otherwise read from ``cfg.cl_hard_images``).
    """
    trigger = _trigger(dataset, cfg)
    base = dataset.train
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(base), generator=gen)
    n_holdout = round(cfg.holdout_ratio * len(base))
    if n_holdout < 1:
        raise ValueError(f"poison.holdout_ratio={cfg.holdout_ratio} leaves no holdout image of {len(base)}")
    holdout_idx, train_idx = order[:n_holdout].sort().values, order[n_holdout:].sort().values

    labels = base.labels[train_idx].clone()
    clean_label = cfg.attack in CLEAN_LABEL_ATTACKS
    eligible = torch.nonzero((labels == cfg.target) if clean_label else (labels != cfg.target)).flatten()
    count = round(cfg.ratio * len(train_idx))
    if clean_label:
        count = min(count, len(eligible))  # official: at most every target-class image
    elif count > len(eligible):
        raise ValueError(
            f"poison.ratio={cfg.ratio} asks for {count} poisoned images, only {len(eligible)} are eligible"
        )
    chosen = eligible[torch.randperm(len(eligible), generator=gen)[:count]]
    poisoned = torch.zeros(len(train_idx), dtype=torch.bool)
    poisoned[chosen] = True
    labels[poisoned] = cfg.target
    replacement = _hard_images(cfg, hard_images, base) if cfg.attack == "cl" else None
    train = PoisonedSet(base, train_idx, poisoned, labels, trigger, replacement)
    holdout = PoisonedSet(
        base, holdout_idx, torch.zeros(n_holdout, dtype=torch.bool), base.labels[holdout_idx], None
    )
    return PoisonSplit(train, holdout, *make_test_sets(dataset, cfg))


def split_digest(split: PoisonSplit) -> str:
    """A fingerprint of who is in the holdout and who is poisoned (stage 2 checks stage 1's)."""
    h = hashlib.sha256()
    for tensor in (split.holdout.indices, split.train.poisoned_indices):
        h.update(tensor.numpy().astype(np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def holdout_val_split(holdout: PoisonedSet, fraction: float, seed: int) -> tuple[PoisonedSet, PoisonedSet]:
    """(train part, validation part) of the holdout, for checkpoint selection without the test set."""
    order = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(seed + 17))
    n_val = max(1, round(fraction * len(holdout)))
    if n_val >= len(holdout):
        raise ValueError(
            f"val_fraction={fraction} leaves no holdout image to train on ({len(holdout)} in all)"
        )
    return holdout.subset(order[n_val:].sort().values), holdout.subset(order[:n_val].sort().values)
