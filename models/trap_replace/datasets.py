"""Image datasets as uint8 (C, H, W) image sets with integer labels, read from local files.

CIFAR-10 (python-pickle batches or a HF ``datasets`` id/directory), GTSRB (the torchvision or
official-zip folder layout, resized to 32x32 as the official code does), an ImageNet-style folder
restricted to a class list (loaded lazily at 256x256), and scikit-learn's bundled digits for
offline tests. Nothing here downloads, except a HF hub id the user names.
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from smile.models.trap_replace.config import DataCfg

IMAGE_SUFFIXES = (".ppm", ".png", ".jpg", ".jpeg", ".bmp")


class ImageSet(Protocol):
    """What the poisoning and the loaders need: labels up front, images on demand."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images (B, C, H, W) at ``indices``."""
        ...


class TensorImages:
    """An image set held in memory as a uint8 (N, C, H, W) tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]


class FolderImages:
    """Image files decoded on demand and resized to ``size`` x ``size`` RGB (ImageNet-scale data)."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, size: int) -> None:
        self.paths = paths
        self.labels = labels.to(torch.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([_read_image(self.paths[int(i)], (self.size, self.size)) for i in indices])


@dataclass
class ImageDataset:
    """A training and a test image set over ``num_classes`` classes."""

    train: ImageSet
    test: ImageSet
    num_classes: int
    channels: int


def _read_image(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != size:
            img = img.resize(size)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _hwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------
def cifar10_pickle(root: str | Path) -> ImageDataset:
    """The "CIFAR-10 python version" directory (data_batch_1..5, test_batch), or its parent."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, root / "test_batch"] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 directory {str(root)!r} lacks {missing}")

    def read(files: list[Path]) -> TensorImages:
        data, labels = [], []
        for path in files:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        return TensorImages(torch.from_numpy(np.concatenate(data)), torch.tensor(labels))

    return ImageDataset(read(train_files), read([root / "test_batch"]), num_classes=10, channels=3)


def hf_images(cfg: DataCfg) -> ImageDataset:
    """A HF ``datasets`` image-classification set with train and test splits (hub id or local dir)."""
    import datasets

    def read(split: str) -> TensorImages:
        ds = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=split, cache_dir=cfg.cache_dir)
        for column in (cfg.image_column, cfg.label_column):
            if column not in ds.column_names:
                raise ValueError(
                    f"data.hf_path={cfg.hf_path!r} split {split!r} has no column {column!r}; "
                    f"columns: {ds.column_names}"
                )
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in ds[cfg.image_column]])
        return TensorImages(_hwc_to_tensor(images), torch.tensor(ds[cfg.label_column]))

    train, test = read("train"), read("test")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return ImageDataset(train, test, num_classes=num_classes, channels=3)


# ---------------------------------------------------------------------------------------------
# GTSRB
# ---------------------------------------------------------------------------------------------
_GTSRB_TRAIN = ("gtsrb/GTSRB/Training", "GTSRB/Final_Training/Images", "GTSRB/Training")
_GTSRB_TEST = ("gtsrb/GTSRB/Final_Test/Images", "GTSRB/Final_Test/Images")
_GTSRB_CSV = ("gtsrb/GT-final_test.csv", "GTSRB/GT-final_test.csv", "GT-final_test.csv")


def _first(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for rel in candidates:
        if (root / rel).exists():
            return root / rel
    raise FileNotFoundError(f"GTSRB root {str(root)!r} has no {what}; looked for {list(candidates)}")


def gtsrb(root: str | Path, size: int = 32) -> ImageDataset:
    """GTSRB from its class folders (train) and GT-final_test.csv (test), resized to ``size``."""
    root = Path(root)
    train_dir = _first(root, _GTSRB_TRAIN, "training class folders")
    paths, labels = [], []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        for path in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            paths.append(path)
            labels.append(int(class_dir.name))
    test_dir = _first(root, _GTSRB_TEST, "test image folder")
    test_paths, test_labels = [], []
    with open(_first(root, _GTSRB_CSV, "GT-final_test.csv"), newline="") as fh:
        for row in csv.DictReader(fh, delimiter=";"):
            test_paths.append(test_dir / row["Filename"])
            test_labels.append(int(row["ClassId"]))

    def read(files: list[Path], ys: list[int]) -> TensorImages:
        if not files:
            raise FileNotFoundError(f"GTSRB root {str(root)!r}: no images found")
        return TensorImages(torch.stack([_read_image(p, (size, size)) for p in files]), torch.tensor(ys))

    return ImageDataset(read(paths, labels), read(test_paths, test_labels), num_classes=43, channels=3)


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders
# ---------------------------------------------------------------------------------------------
def image_folder(root: str | Path, class_list: str | Path, size: int = 256) -> ImageDataset:
    """``root``/train/<class>/* and ``root``/val/<class>/*, keeping the classes listed (one folder
    name per line) in ``class_list``, labelled in list order. ImageNet-12 lists 12 classes."""
    root, class_list = Path(root), Path(class_list)
    if not class_list.is_file():
        raise FileNotFoundError(f"class list {str(class_list)!r} does not exist")
    classes = [line.strip() for line in class_list.read_text().splitlines() if line.strip()]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"class list {str(class_list)!r} must list distinct class folder names")

    def read(split: str) -> FolderImages:
        paths, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            if not folder.is_dir():
                raise FileNotFoundError(f"class folder {str(folder)!r} does not exist")
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            paths.extend(files)
            labels.extend([label] * len(files))
        return FolderImages(paths, torch.tensor(labels), size)

    return ImageDataset(read("train"), read("val"), num_classes=len(classes), channels=3)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits (offline)
# ---------------------------------------------------------------------------------------------
def digits(test_fraction: float = 0.3, seed: int = 0, size: int = 16) -> ImageDataset:
    """scikit-learn's 1797 bundled 8x8 digits (0..16 grey levels) as 1-channel uint8 images,
    bilinearly upsampled to ``size``; a seeded ``test_fraction`` forms the test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return ImageDataset(
        TensorImages(images[train], labels[train]), TensorImages(images[test], labels[test]), 10, 1
    )


def load_image_dataset(cfg: DataCfg, seed: int = 0) -> ImageDataset:
    """The dataset ``cfg`` names."""
    if cfg.source in ("cifar10", "gtsrb", "imagenet_folder") and not cfg.root:
        raise ValueError(f"data.root must name the local dataset directory for data.source={cfg.source!r}")
    if cfg.source == "imagenet_folder" and not cfg.class_list:
        raise ValueError("data.class_list must name the class-list file for data.source='imagenet_folder'")
    if cfg.source == "cifar10":
        return cifar10_pickle(cfg.root)
    if cfg.source == "hf":
        return hf_images(cfg)
    if cfg.source == "gtsrb":
        return gtsrb(cfg.root)
    if cfg.source == "imagenet_folder":
        return image_folder(cfg.root, cfg.class_list, cfg.load_size)
    if cfg.source == "digits":
        return digits(cfg.test_fraction, seed)
    raise ValueError(f"data.source={cfg.source!r}; allowed: cifar10, hf, gtsrb, imagenet_folder, digits")
