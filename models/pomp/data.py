"""Image sets (ImageNet-21K-style folders with k shots per class, HF ``datasets`` with the user's
``data_dir``, offline digit pairs / triples) and the per-rank batch stream the Trainer consumes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smile.models.pomp.config import DataCfg
from smile.models.pomp.digits import digit_tuples, tuple_names
from smile.models.pomp.transforms import center_crop, to_tensor, train_transform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Images (file paths, PIL images or uint8 arrays), integer labels and class names."""

    items: list
    labels: torch.Tensor
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Image.Image:
        item = self.items[i]
        if isinstance(item, (str, Path)):
            with Image.open(item) as im:
                return im.convert("RGB")
        return item.convert("RGB") if isinstance(item, Image.Image) else Image.fromarray(item)


def read_classnames(path: str | Path, folders: list[str] | None = None) -> list[str]:
    """Names from ``<folder> <name>`` lines (mapped onto ``folders``) or bare names in order."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"classnames_file={str(path)!r} does not exist")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if folders is not None:
        pairs = [line.split(maxsplit=1) for line in lines]
        mapping = {p[0]: p[1] for p in pairs if len(p) == 2}
        if set(folders) <= set(mapping):
            return [mapping[f] for f in folders]
        lines = [line for line in lines if line not in mapping or len(lines) == len(folders)]
    n = len(folders) if folders is not None else len(lines)
    if len(lines) != n:
        raise ValueError(f"classnames_file={str(path)!r} has {len(lines)} names but the data has {n} classes")
    return lines


def image_folder(cfg: DataCfg, shots: int | None) -> ImageSet:
    """``root/<class>/*`` (ImageNet-21K layout), ``shots`` images per class drawn with ``cfg.seed``."""
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a directory of class folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"data.root={str(root)!r} has no class folders")
    names = read_classnames(cfg.classnames_file, folders) if cfg.classnames_file else folders
    rng = random.Random(cfg.seed)
    items, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if shots is not None and len(files) > shots:
            files = sorted(rng.sample(files, shots))
        items += [str(f) for f in files]
        labels += [label] * len(files)
    return ImageSet(items, torch.tensor(labels), names)


def hf_images(cfg: DataCfg) -> ImageSet:
    """A HF ``datasets`` split (``hf_path`` with the user's ``data_dir`` / ``cache_dir``)."""
    import datasets

    ds = datasets.load_dataset(
        cfg.hf_path, cfg.hf_name, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, split=cfg.split
    )
    for column in (cfg.image_column, cfg.label_column):
        if column not in ds.column_names:
            raise ValueError(f"dataset {cfg.hf_path!r} has no column {column!r}; columns: {ds.column_names}")
    feature = ds.features[cfg.label_column]
    if cfg.classnames_file:
        names = read_classnames(cfg.classnames_file)
    elif hasattr(feature, "names"):
        names = [n.replace("_", " ") for n in feature.names]
    else:
        raise ValueError(
            f"dataset {cfg.hf_path!r}: label column {cfg.label_column!r} has no class names; "
            "set classnames_file"
        )
    labels = torch.tensor(ds[cfg.label_column])
    return ImageSet(list(ds[cfg.image_column]), labels, names)


def load_images(cfg: DataCfg, shots: int | None = None) -> ImageSet:
    if cfg.source == "imagefolder":
        return image_folder(cfg, shots)
    if cfg.source == "hf":
        return hf_images(cfg)
    arity = 2 if cfg.source == "digit_pairs" else 3
    names = tuple_names(arity)
    classes = cfg.classes or list(range(len(names)))
    images, labels = digit_tuples(cfg.per_class, cfg.split, classes, seed=cfg.seed, arity=arity)
    return ImageSet(list(images), labels, [names[c] for c in classes])


class Batches:
    """This rank's batches of ``{"pixel_values", "label"}``: a seeded shuffle per epoch, sharded
    over ranks (every rank the same count, last partial batch dropped when training), resumable
    (``state_dict`` = epoch and position). Augmentation is seeded by (seed, epoch, index)."""

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        size: int,
        mean,
        std,
        *,
        train: bool,
        augment: str = "none",
        randaug_n: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.images, self.batch_size, self.size, self.mean, self.std = images, batch_size, size, mean, std
        self.train, self.augment, self.randaug_n, self.seed = (
            train,
            augment if train else "none",
            randaug_n,
            seed,
        )
        self.rank, self.world, self.num_workers = rank, world_size, num_workers
        self.epoch, self.position = 0, 0
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        per_step = self.batch_size * self.world
        return len(self.images) // per_step if self.train else -(-len(self.images) // per_step)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> list[int]:
        n = len(self.images)
        if not self.train:
            return list(range(n))[self.rank :: self.world]
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.seed * 9973 + self.epoch)
        ).tolist()
        usable = len(self) * self.batch_size * self.world
        return order[:usable][self.rank :: self.world]

    def pixels(self, i: int) -> torch.Tensor:
        if self.augment == "none":
            if i not in self._cache:
                self._cache[i] = to_tensor(center_crop(self.images.image(i), self.size), self.mean, self.std)
            return self._cache[i]
        rng = random.Random(hash((self.seed, self.epoch, i)))
        image = train_transform(self.images.image(i), self.size, self.augment, self.randaug_n, rng)
        return to_tensor(image, self.mean, self.std)

    def __iter__(self):
        order = self._order()
        batches = [order[j : j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        while self.position < len(batches):
            idx = batches[self.position]
            self.position += 1
            yield {
                "pixel_values": torch.stack([self.pixels(i) for i in idx]),
                "label": self.images.labels[idx],
            }
        if self.train:
            self.set_epoch(self.epoch + 1)


def shots_of(images: ImageSet) -> np.ndarray:
    """Images per class (the 16-shot check)."""
    return np.bincount(images.labels.numpy(), minlength=len(images.classnames))
