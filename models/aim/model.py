"""AIMVideoViT: a frozen transformers CLIP vision tower turned into a video model by adapters.

The frozen attention is called twice per block: along time (temporal adaptation) and along
space (spatial adaptation); the frozen MLP gets a parallel adapter (joint adaptation). Every
adapter's last layer and the temporal embedding start at zero, so at init each frame's CLS
feature is exactly the image model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from smile.models.aim.adapter import Adapter, DropPath, MoEAdapter
from smile.models.aim.config import AIMConfig, check_model_options
from smile.moe import MoEConfig, Topology

TRAINABLE_KEYS = ("Adapter", "temporal_embedding", "ln_post", "head")


class AIMBlock(nn.Module):
    """One CLIP encoder layer with temporal, spatial and joint adaptation (x: (B*T, N, D))."""

    def __init__(
        self,
        layer: nn.Module,
        num_frames: int,
        ratio: float = 0.25,
        joint_scale: float = 0.5,
        num_tadapter: int = 1,
        drop_path: float = 0.0,
        temporal: bool = True,
        moe: MoEConfig | None = None,
        topology: Topology | None = None,
    ) -> None:
        super().__init__()
        dim = layer.layer_norm1.normalized_shape[0]
        self.num_frames, self.num_tadapter, self.scale = num_frames, num_tadapter, joint_scale
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            layer.layer_norm1,
            layer.self_attn,
            layer.layer_norm2,
            layer.mlp,
        )
        self.temporal = temporal
        if temporal:
            if num_tadapter == 2:
                self.T_Adapter_in = Adapter(dim, ratio, skip=True)
            self.T_Adapter = Adapter(dim, ratio, skip=False)
        self.S_Adapter = Adapter(dim, ratio, skip=True)
        self.MLP_Adapter = (
            Adapter(dim, ratio, skip=False) if moe is None else MoEAdapter(dim, ratio, moe, topology)
        )
        self.drop_path = DropPath(drop_path)

    def attention(self, x: Tensor) -> Tensor:
        return self.attn(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        bt, n, d = x.shape
        if self.temporal:  # the frozen attention along time: (B*T, N, D) -> (B*N, T, D)
            t = self.num_frames
            xt = x.view(bt // t, t, n, d).transpose(1, 2).reshape(-1, t, d)
            xt = self.ln_1(xt)
            if self.num_tadapter == 2:
                xt = self.T_Adapter_in(xt)
            xt = self.T_Adapter(self.attention(xt))
            xt = xt.view(bt // t, n, t, d).transpose(1, 2).reshape(bt, n, d)
            x = x + self.drop_path(xt)
        x = x + self.S_Adapter(self.attention(self.ln_1(x)))  # no DropPath here (official code)
        xn = self.ln_2(x)
        return x + self.mlp(xn) + self.drop_path(self.scale * self.MLP_Adapter(xn))


class AIMVideoViT(nn.Module):
    """(B, C, T, H, W) clips -> class logits; only adapters, the temporal embedding, ln_post and
    the head are trainable (an explicit set, not name matching in the training script)."""

    def __init__(self, vision: CLIPVisionModel, cfg: AIMConfig, topology: Topology | None = None) -> None:
        super().__init__()
        check_model_options(cfg.adapter_ratio, cfg.num_tadapter, cfg.num_frames)
        tower = getattr(vision, "vision_model", vision)  # transformers 5 flattens the tower
        vcfg: CLIPVisionConfig = vision.config
        dim = vcfg.hidden_size
        self.num_frames, self.patch_size, self.image_size = cfg.num_frames, vcfg.patch_size, vcfg.image_size
        self.temporal = cfg.temporal
        tower.requires_grad_(False)
        self.embeddings, self.ln_pre = tower.embeddings, tower.pre_layrnorm
        if cfg.temporal:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, dim))
        depth = len(tower.encoder.layers)
        rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.blocks = nn.ModuleList(
            AIMBlock(
                layer,
                cfg.num_frames,
                cfg.adapter_ratio,
                cfg.joint_scale,
                cfg.num_tadapter,
                rate,
                cfg.temporal,
                cfg.moe,
                topology,
            )  # fmt: skip
            for layer, rate in zip(tower.encoder.layers, rates)
        )
        self.ln_post = copy.deepcopy(tower.post_layernorm).requires_grad_(True)  # the source stays frozen
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(dim, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.01)  # I3DHead's init_std
        nn.init.zeros_(self.head.bias)
        self.frozen_modules = [self.embeddings, self.ln_pre] + [
            m for b in self.blocks for m in (b.ln_1, b.attn, b.ln_2, b.mlp)
        ]

    @classmethod
    def from_clip_vision(
        cls, vision: CLIPVisionModel, cfg: AIMConfig, topology: Topology | None = None
    ) -> AIMVideoViT:
        """Wrap ``vision`` (its attention and MLP modules are reused, frozen)."""
        return cls(vision, cfg, topology)

    def train(self, mode: bool = True) -> AIMVideoViT:
        """The frozen CLIP modules stay in eval mode while the adapters train."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def check_input(self, video: Tensor) -> None:
        if video.ndim != 5:
            raise ValueError(f"AIM expects video of shape (B, C, T, H, W), got {tuple(video.shape)}")
        _, c, t, h, w = video.shape
        if t != self.num_frames:
            raise ValueError(
                f"clip has T={t} frames but the model was built with num_frames={self.num_frames} "
                "(the temporal embedding has a fixed size)"
            )
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        if c != 3:
            raise ValueError(f"AIM expects 3 channels, got C={c}")

    def frame_features(self, video: Tensor) -> Tensor:
        """ln_post of each frame's CLS token: (B, T, D)."""
        self.check_input(video)
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        interpolate = (h, w) != (self.image_size, self.image_size)
        x = self.embeddings(frames, interpolate_pos_encoding=interpolate)  # CLS + positions
        n, d = x.shape[1:]
        if self.temporal:  # one learnable vector per frame, added to every spatial token
            x = (x.view(b, t, n, d) + self.temporal_embedding.to(x.dtype)[:, :, None]).view(b * t, n, d)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]).view(b, t, d)

    def forward(self, video: Tensor) -> Tensor:
        """Logits: per-frame CLS averaged over T, dropout, linear head."""
        return self.head(self.dropout(self.frame_features(video).mean(1)))


def is_trainable_name(name: str) -> bool:
    return any(key in name for key in TRAINABLE_KEYS)


def load_clip_vision(path: str | Path, dtype: torch.dtype | None = None) -> CLIPVisionModel:
    """The frozen CLIP vision tower from a local directory (a CLIPVisionModel or a whole CLIPModel
    save); a missing directory is a FileNotFoundError: there is no hub fallback."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"vit_path={str(path)!r} is not a local CLIP directory (no config.json); "
            "save one with CLIPVisionModel.save_pretrained (the hub is never used)"
        )
    model = CLIPVisionModel.from_pretrained(root, local_files_only=True, dtype=dtype)
    return model.requires_grad_(False).eval()


def trainable_count(cfg: AIMConfig, dim: int, layers: int) -> int:
    """The spec's count (dense adapters): adapters + temporal embedding + ln_post + head."""
    hidden = max(1, int(dim * cfg.adapter_ratio))
    per_adapter = 2 * dim * hidden + hidden + dim
    adapters = 2 + (cfg.num_tadapter if cfg.temporal else 0)
    temporal = cfg.num_frames * dim if cfg.temporal else 0
    return layers * adapters * per_adapter + temporal + 2 * dim + dim * cfg.num_classes + cfg.num_classes
