"""The frozen CLIP: loaded only from a local ``from_pretrained`` directory, never the hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FrozenCLIP:
    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_clip(path: str | Path, dtype: torch.dtype | None = None) -> FrozenCLIP:
    """CLIP, its tokenizer and its image normalisation from ``path``; every weight frozen.

    A missing directory or config.json is a FileNotFoundError: there is no hub fallback."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"clip_path={str(path)!r} is not a local CLIP directory (no config.json); "
            "save one with CLIPModel.save_pretrained (the hub is never used)"
        )
    model = CLIPModel.from_pretrained(root, local_files_only=True, dtype=dtype)
    model.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    processor = root / "preprocessor_config.json"
    if processor.is_file():
        spec = json.loads(processor.read_text())
        mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
    return FrozenCLIP(model, tokenizer, model.config.vision_config.image_size, mean, std)
