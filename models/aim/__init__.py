"""AIM (Yang et al., ICLR 2023): a frozen CLIP image ViT adapted to video with spatial, temporal
and joint adapters, on a transformers CLIPVisionModel. ``smile zoo aim train|eval``."""

from smile.models.aim.adapter import Adapter, MoEAdapter
from smile.models.aim.config import AIMConfig, VideoData
from smile.models.aim.model import AIMBlock, AIMVideoViT, load_clip_vision, trainable_count

__all__ = [
    "AIMBlock",
    "AIMConfig",
    "AIMVideoViT",
    "Adapter",
    "MoEAdapter",
    "VideoData",
    "load_clip_vision",
    "trainable_count",
]
