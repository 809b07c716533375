"""The poisoning attacks the paper evaluates, as deterministic transforms of uint8 image batches.

Each trigger maps ``(B, C, H, W)`` uint8 images to uint8 images, computed on the 0..255 scale,
clipped and truncated to uint8 exactly as the official code does. Pixel-placed triggers (BadNets
square and grid, the clean-label corner grids) are the official ones. The official code reads the
other patterns from image files (``triggers/*.png``, ``mask.npy``); ``trigger_file`` / ``mask_file``
load those files for exact parity. Without them a pattern of the same kind is generated from the
seed (documented per attack below), so every run is reproducible offline.

How each attack combines image x and pattern t (official code):
  badnet_sq, badnet_grid, cl      pixels set in place
  trojan_3x3/8x8/wm, l2_inv       x + t
  l0_inv                          x * (1 - m) + t
  blend, sig                      0.8 x + 0.2 t
  smooth                          x + t, then per-image min-max rescaled to 0..255
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ATTACKS = (
    "badnet_sq",
    "badnet_grid",
    "trojan_3x3",
    "trojan_8x8",
    "trojan_wm",
    "l0_inv",
    "l2_inv",
    "blend",
    "smooth",
    "sig",
    "cl",
)
# Clean-label attacks poison target-class images and keep their labels.
CLEAN_LABEL_ATTACKS = ("sig", "cl")

# The official 3x3 grid as it appears in each corner of a 32x32 image (rows top to bottom).
_GRID = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.float32)
# The official ImageNet grid (10-pixel cells at offset 32 of a 256x256 image) is the same grid
# rotated by 180 degrees.
_GRID_LARGE = torch.flip(_GRID, dims=(0, 1))


def check_attack(name: str) -> str:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; allowed attacks: {', '.join(ATTACKS)}")
    return name


@dataclass(frozen=True)
class Trigger:
    """One attack's transform for images of shape ``(C, H, W)``; call it on uint8 batches."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"triggers take uint8 (B, C, H, W) batches, got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            return images
        out = self.apply(images.to(torch.float32))
        return out.clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Pixel-placed triggers
# ---------------------------------------------------------------------------------------------
def badnet_square(x: torch.Tensor, size: int, margin: int) -> torch.Tensor:
    """A white ``size`` x ``size`` square ``margin`` pixels from the bottom-right corner
    (official: 4 x 4 at rows/cols 27..30 of 32)."""
    h, w = x.shape[-2:]
    x = x.clone()
    x[..., h - margin - size : h - margin, w - margin - size : w - margin] = 255.0
    return x


def _stamp(x: torch.Tensor, pattern: torch.Tensor, top: int, left: int) -> torch.Tensor:
    ph, pw = pattern.shape
    x[..., top : top + ph, left : left + pw] = pattern.to(x.dtype)
    return x


def _grid_pattern(h: int) -> tuple[torch.Tensor, int, bool]:
    """(pattern, cell size, large layout): 1-pixel cells in the corner for small images (the
    CIFAR/GTSRB trigger), 10/256-of-the-side cells at offset 32/256 for large ones (ImageNet)."""
    if h <= 64:
        return _GRID, 1, False
    cell = max(1, round(10 * h / 256))
    return _GRID_LARGE.repeat_interleave(cell, 0).repeat_interleave(cell, 1), cell, True


def badnet_grid(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    pattern, _, large = _grid_pattern(h)
    x = x.clone()
    if large:
        offset = round(32 * h / 256)
        return _stamp(x, pattern, offset, offset)
    return _stamp(x, pattern, h - 3, w - 3)


def corner_grids(x: torch.Tensor) -> torch.Tensor:
    """The clean-label trigger: the 3x3 grid in all four corners (Turner et al.; official code)."""
    h, w = x.shape[-2:]
    x = x.clone()
    for top, left in ((h - 3, w - 3), (h - 3, 0), (0, 0), (0, w - 3)):
        _stamp(x, _GRID, top, left)
    return x


# ---------------------------------------------------------------------------------------------
# Pattern triggers (from a file, or generated from the seed)
# ---------------------------------------------------------------------------------------------
TRIGGER_FORMATS = (".png", ".npy")
_FORMATS_HELP = (
    "allowed formats: .png (8-bit grayscale, RGB or RGBA, as the official triggers/*.png) or .npy "
    "(H x W, H x W x C or C x H x W with C in 1, 3, 4, values 0..255, as the official mask.npy)"
)


def _bad_file(path: Path, why: str) -> ValueError:
    return ValueError(f"trigger file {str(path)!r} {why}; {_FORMATS_HELP}")


def _read_array(path: Path) -> np.ndarray:
    """The raw array of a .png/.npy trigger file; every failure is one ValueError naming the file."""
    suffix = path.suffix.lower()
    if suffix not in TRIGGER_FORMATS:
        raise _bad_file(path, f"has the unsupported format {suffix or '(no extension)'!r}")
    if not path.is_file():
        raise FileNotFoundError(f"trigger file {str(path)!r} does not exist")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB") if image.mode == "P" else image)
    except Exception as err:  # numpy and PIL raise many types on a corrupt file
        raise _bad_file(path, f"is not a readable {suffix} file ({type(err).__name__}: {err})") from None


def load_pattern(path: str | Path, channels: int, height: int, width: int) -> torch.Tensor:
    """A trigger image (.png/.npy, HWC or CHW, 0..255) as float (C, H, W), resized if needed.

    A wrong extension, an unreadable file, a non-numeric array, a shape that is not an image or
    values outside 0..255 raise one ValueError that names the file and the allowed formats.
    """
    path = Path(path)
    array = _read_array(path)
    if array.dtype.kind not in "biuf":
        raise _bad_file(path, f"holds a {array.dtype} array, not numbers")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise _bad_file(path, f"has shape {array.shape}, not an image")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise _bad_file(path, f"has values outside 0..255 (min {array.min()}, max {array.max()})")
    t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if t.shape[0] == 4:  # RGBA
        t = t[:3]
    if tuple(t.shape[1:]) != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if t.shape[0] != channels:
        if t.shape[0] == 1:
            t = t.expand(channels, -1, -1)
        elif channels == 1:
            t = t.mean(0, keepdim=True)
        else:
            raise ValueError(f"trigger file {str(path)!r} has {t.shape[0]} channels, the images {channels}")
    return t.contiguous()


def save_pattern(pattern: torch.Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) 0..255 pattern as an official-format file (.png or .npy, H x W x C uint8),
    so a generated trigger can be shared and loaded back with ``trigger_file`` unchanged."""
    path = Path(path)
    if path.suffix.lower() not in TRIGGER_FORMATS:
        raise _bad_file(path, f"has the unsupported format {path.suffix or '(no extension)'!r}")
    if pattern.dim() != 3 or float(pattern.min()) < 0 or float(pattern.max()) > 255:
        raise ValueError(f"a pattern is (C, H, W) in 0..255, got {tuple(pattern.shape)}")
    array = pattern.round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, array)
    else:
        from PIL import Image

        Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(path)
    return path


def _generator(seed: int, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, salt)))


def generated_pattern(name: str, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A seeded pattern of the attack's kind, float (C, H, W) of whole numbers on the 0..255 scale
    (whole, like the official 8-bit trigger files, so it round-trips through :func:`save_pattern`).

    trojan_3x3 / trojan_8x8: a random-valued k x k patch (k scaled by side/32) in the bottom-right
    corner, zero elsewhere. trojan_wm: a sparse random watermark over the whole image (10% of the
    pixels). l0_inv: random values on 1% of the pixels (with the matching mask). l2_inv: dense
    low-amplitude noise (0..16). blend: uniform noise 0..255. smooth: low-frequency noise (a 4x4
    grid upsampled bicubically) of amplitude 0..64. sig: the sinusoid of Barni et al. (f = 6,
    horizontal), 0..255.
    """
    return _raw_pattern(name, channels, height, width, seed).round()


def _raw_pattern(name: str, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The unrounded pattern of :func:`generated_pattern`."""
    gen = _generator(seed, name)
    shape = (channels, height, width)
    if name in ("trojan_3x3", "trojan_8x8"):
        k = max(1, round((3 if name == "trojan_3x3" else 8) * height / 32))
        t = torch.zeros(shape)
        t[:, height - k :, width - k :] = torch.randint(0, 256, (channels, k, k), generator=gen).float()
        return t
    if name == "trojan_wm":
        keep = torch.rand((1, height, width), generator=gen) < 0.1
        return keep.float() * torch.randint(64, 256, shape, generator=gen).float()
    if name == "l0_inv":
        return l0_mask(height, width, seed) * torch.randint(0, 256, shape, generator=gen).float()
    if name == "l2_inv":
        return torch.rand(shape, generator=gen) * 16.0
    if name == "blend":
        return torch.randint(0, 256, shape, generator=gen).float()
    if name == "smooth":
        coarse = torch.rand((1, channels, 4, 4), generator=gen)
        return (
            F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)
            * 64
        )
    if name == "sig":
        columns = torch.arange(width, dtype=torch.float32)
        wave = 127.5 * (1.0 + torch.sin(2 * math.pi * columns * 6 / width))
        return wave.expand(shape).clone()
    raise ValueError(f"attack {name!r} has no generated pattern")


def l0_mask(height: int, width: int, seed: int) -> torch.Tensor:
    """The seeded l0 mask: 1 on 1% of the pixel positions (at least one), shared by all channels."""
    gen = _generator(seed, "l0_inv_mask")
    count = max(1, round(0.01 * height * width))
    mask = torch.zeros(height * width)
    mask[torch.randperm(height * width, generator=gen)[:count]] = 1.0
    return mask.view(1, height, width)


# The combinations (module-level functions, so triggers pickle into loader worker processes).
def _blend(x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return 0.8 * x + 0.2 * pattern


def _add(x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return x + pattern


def _replace(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * (1.0 - mask) + pattern


def _add_rescale(x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x + t, then each image min-max rescaled to 0..255 (the official smooth attack)."""
    x = x + pattern
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-12) * 255.0


def make_trigger(
    name: str,
    channels: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    trigger_file: str | None = None,
    mask_file: str | None = None,
    patch_size: int | None = None,
) -> Trigger:
    """The attack ``name`` for ``(channels, height, width)`` images.

    patch_size: badnet_sq side (default 4 pixels per 32, 1 pixel per 32 from the border).
    trigger_file / mask_file: the official pattern (and l0 mask) instead of the generated ones.
    For cl this is the corner-grid stamp only; swapping training images for their adversarially
    perturbed versions happens in the poisoned split, which knows the dataset indices.
    """
    check_attack(name)
    if name == "badnet_sq":
        size = patch_size or max(1, round(4 * height / 32))
        margin = max(1, round(height / 32))
        return Trigger(name, partial(badnet_square, size=size, margin=margin))
    if name == "badnet_grid":
        return Trigger(name, badnet_grid)
    if name == "cl":
        return Trigger(name, corner_grids)
    if trigger_file:
        pattern = load_pattern(trigger_file, channels, height, width)
    else:
        pattern = generated_pattern(name, channels, height, width, seed)
    if name in ("blend", "sig"):
        return Trigger(name, partial(_blend, pattern=pattern))
    if name == "smooth":
        return Trigger(name, partial(_add_rescale, pattern=pattern))
    if name == "l0_inv":
        if mask_file:
            mask = load_pattern(mask_file, channels, height, width) / 255.0
            mask = (mask > 0).float()
        elif trigger_file:
            raise ValueError(
                "attack 'l0_inv' with a trigger_file needs its mask_file (the official mask.npy)"
            )
        else:
            mask = l0_mask(height, width, seed)
        return Trigger(name, partial(_replace, pattern=pattern, mask=mask))
    return Trigger(name, partial(_add, pattern=pattern))
