"""A tiny CLIP vision tower "pre-trained" here on single frames, the offline stand-in for a CLIP
ViT: the image task is locating the bright square (regressing its centre from the CLS feature),
so the frozen image model knows *where* things are, never how they move.

``python -m smile.models.aim.tiny_vit runs/aim/tiny_vit [--steps 300]`` writes a
``CLIPVisionModel.save_pretrained`` directory that ``vit_path`` can name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from smile.models.aim.synthetic import random_frames


def tiny_config(**overrides) -> CLIPVisionConfig:
    """The spec's tiny ViT: hidden 32, 2 layers, 2 heads, image 32, patch 8."""
    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    return CLIPVisionConfig(**{**base, **overrides})


def pretrain_tiny_vit(steps: int = 300, seed: int = 0, batch: int = 64) -> CLIPVisionModel:
    """Train a tiny ViT + linear probe to regress the square's centre on single frames."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_config())
    probe = nn.Linear(model.config.hidden_size, 2)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images, centres = random_frames(batch, model.config.image_size, generator=gen)
        loss = nn.functional.mse_loss(probe(model(pixel_values=images).pooler_output), centres)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pretrain_tiny_vit(args.steps, args.seed).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
