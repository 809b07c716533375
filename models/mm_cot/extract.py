"""Image features for Multimodal-CoT: a local ViT's last hidden states, one ``<pid>.npy`` each.

The paper's ViT features are (145, 1024): ViT-large with 32-pixel patches at 384 pixels gives
12 x 12 patches + CLS. Any local ``from_pretrained`` vision model with ``last_hidden_state``
works; ``patch_shape`` must match what it produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from smile.models.mm_cot.config import MMCoTConfig


def _images(cfg: MMCoTConfig, split: str, image_root: str | None) -> list[tuple[str, Any]]:
    """(pid, PIL image) for the split's problems that have an image."""
    from PIL import Image

    data = cfg.data
    if data.source == "hf":
        import datasets

        from smile.models.mm_cot.data import HF_SPLITS

        rows = datasets.load_dataset(
            data.hf_path, split=HF_SPLITS.get(split, split), cache_dir=data.cache_dir
        )
        return [(f"{split}_{i}", row["image"]) for i, row in enumerate(rows) if row.get("image") is not None]
    from smile.models.mm_cot.data import load_local_scienceqa

    problems, pids = load_local_scienceqa(data.root, split)
    root = Path(image_root or Path(data.root) / "images")
    out = []
    for pid in pids[: data.limit] if data.limit else pids:
        name = problems[pid].get("image")
        if name:
            path = root / split / pid / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {path} not found (ScienceQA layout <image_root>/<split>/<pid>/{name})"
                )
            out.append((pid, Image.open(path).convert("RGB")))
    return out


@torch.no_grad()
def extract_features(cfg: MMCoTConfig, image_root: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Write ``<features_dir>/<pid>.npy`` for every split's images; returns counts per split."""
    from transformers import AutoImageProcessor, AutoModel

    if not cfg.data.vit_path or not cfg.data.features_dir:
        raise ValueError("mm_cot extract needs data.vit_path (a local ViT) and data.features_dir")
    processor = AutoImageProcessor.from_pretrained(cfg.data.vit_path)
    vit = AutoModel.from_pretrained(cfg.data.vit_path).eval()
    out = Path(cfg.data.features_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.eval_split, cfg.data.test_split)):
        items = _images(cfg, split, image_root)
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            pixels = processor(images=[img for _, img in chunk], return_tensors="pt")["pixel_values"]
            hidden = vit(pixel_values=pixels).last_hidden_state.float().numpy()
            if hidden.shape[1:] != tuple(cfg.patch_shape):
                raise ValueError(
                    f"ViT features have shape {hidden.shape[1:]} but patch_shape is {tuple(cfg.patch_shape)}"
                )
            for (pid, _), feat in zip(chunk, hidden, strict=True):
                np.save(out / f"{pid}.npy", feat.astype(np.float32))
        counts[split] = len(items)
    return {"features_dir": str(out), "images": counts, "patch_shape": list(cfg.patch_shape)}
