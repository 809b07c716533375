"""Gated vision fusion and the multimodal T5 of Multimodal-CoT (Zhang et al., 2023, Sec. 4).

The text encoder output ``H_lang`` attends once (single head) over projected image patch features
``H_vis``; a sigmoid gate on ``[H_lang; H_attn]`` mixes the two. The fused states replace the T5
encoder output, so the stock transformers decoder, loss and ``generate`` are used unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput


def check_image_feats(feats: torch.Tensor, patch_dim: int) -> None:
    """Image features must be (B, m, p) with p == patch_shape[1]; m (patches) may be anything."""
    if feats.dim() != 3:
        raise ValueError(f"image_feats must be (batch, patches, dim), got shape {tuple(feats.shape)}")
    if feats.shape[-1] != patch_dim:
        raise ValueError(
            f"image feature dim {feats.shape[-1]} != patch_shape[1] {patch_dim} "
            f"(feature shape {tuple(feats.shape)})"
        )


class GatedVisionFusion(nn.Module):
    """``H_fuse = (1 - λ) H_lang + λ H_attn`` with ``λ = sigmoid(W_l H_lang + W_v H_attn)``.

    ``gate_value`` fixes λ (0.0: the image is ignored, the ablation); ``vision_mask`` masks
    all-zero patches (and gives image-less samples λ = 0), an option the official code lacks.
    """

    def __init__(
        self, d_model: int, patch_dim: int, gate_value: float | None = None, vision_mask: bool = False
    ):
        super().__init__()
        self.patch_dim = patch_dim
        self.image_dense = nn.Linear(patch_dim, d_model)  # W_h: p -> d
        self.mha_layer = nn.MultiheadAttention(d_model, 1, batch_first=True)  # one head, own in/out proj
        self.gate_dense = nn.Linear(2 * d_model, d_model)  # [W_l; W_v] on the concatenation
        self.gate_value = gate_value
        self.vision_mask = vision_mask

    def attention(self, h_lang: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        """``H_attn = softmax(H_lang H_visᵀ / √d) H_vis`` (with the MHA's projections)."""
        check_image_feats(image_feats, self.patch_dim)
        h_vis = self.image_dense(image_feats.to(h_lang.dtype))
        pad = None
        if self.vision_mask:
            pad = image_feats.abs().sum(-1) == 0  # (B, m) True where a patch is padding
            pad = pad & ~pad.all(-1, keepdim=True)  # an image-less sample keeps its keys (gated off below)
        h_attn, _ = self.mha_layer(h_lang, h_vis, h_vis, key_padding_mask=pad, need_weights=False)
        return h_attn

    def forward(self, h_lang: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        h_attn = self.attention(h_lang, image_feats)
        if self.gate_value is not None:
            gate = torch.full_like(h_lang, float(self.gate_value))
        else:
            gate = torch.sigmoid(self.gate_dense(torch.cat([h_lang, h_attn], dim=-1)))
        if self.vision_mask:
            has_image = (image_feats.abs().sum((-1, -2)) > 0).to(gate.dtype)[:, None, None]
            gate = gate * has_image
        return (1 - gate) * h_lang + gate * h_attn


class T5ForMultimodalGeneration(T5ForConditionalGeneration):
    """Stock T5 with :class:`GatedVisionFusion` on the encoder output.

    ``forward(..., image_feats=...)`` fuses the encoder output (taken after the final layer norm and
    dropout) before the decoder sees it; ``generate(image_feats=...)`` threads the features to every
    decoding step through ``prepare_inputs_for_generation`` (as the official code, the cached plain
    encoder output is fused at each step). Missing features raise unless ``allow_missing_image``,
    which uses an all-zero (1, p) matrix, the paper's "no image" input.
    """

    def __init__(
        self,
        config: T5Config,
        patch_shape: tuple[int, int] = (145, 1024),
        gate_value: float | None = None,
        vision_mask: bool = False,
        allow_missing_image: bool = False,
    ):
        super().__init__(config)
        self.patch_shape = tuple(patch_shape)
        self.allow_missing_image = allow_missing_image
        self.fusion = GatedVisionFusion(config.d_model, self.patch_shape[1], gate_value, vision_mask)
        self.fusion.apply(self._init_fusion)

    @staticmethod
    def _init_fusion(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # T5's _init_weights does not know these layers
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def _image_feats(self, image_feats: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if image_feats is None:
            if not self.allow_missing_image:
                raise ValueError(
                    "image_feats missing: this model fuses image features (pass image_feats, or set "
                    "allow_missing_image=True to use all-zero features)"
                )
            return like.new_zeros(like.shape[0], 1, self.patch_shape[1])
        check_image_feats(image_feats, self.patch_shape[1])
        return image_feats

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_feats: torch.Tensor | None
    ) -> BaseModelOutput:
        """The fused encoder output ``H_fuse`` (B, n, d)."""
        h_lang = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.fusion(h_lang, self._image_feats(image_feats, h_lang)))

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_feats: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, image_feats)
        else:  # from generate: the plain T5 encoder output, fused here at each step
            h_lang = encoder_outputs[0]
            fused = self.fusion(h_lang, self._image_feats(image_feats, h_lang))
            encoder_outputs = BaseModelOutput(last_hidden_state=fused)
        return super().forward(attention_mask=attention_mask, encoder_outputs=encoder_outputs, **kwargs)

    def prepare_inputs_for_generation(
        self, *args: Any, image_feats: torch.Tensor | None = None, **kwargs: Any
    ):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["image_feats"] = image_feats
        return inputs

    def generate(self, *args: Any, image_feats: torch.Tensor | None = None, **kwargs: Any):  # type: ignore[override]
        """``generate`` with image features; the plain encoder runs once, fusion at every step."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if image_feats is None and not self.allow_missing_image:
            self._image_feats(None, input_ids)  # raises the one-line error
        if image_feats is not None:
            check_image_feats(image_feats, self.patch_shape[1])
        return super().generate(*args, image_feats=image_feats, **kwargs)


def build_model(
    t5_config: T5Config | None = None,
    *,
    base_model_path: str | None = None,
    patch_shape: tuple[int, int] = (145, 1024),
    gate_value: float | None = None,
    vision_mask: bool = False,
    allow_missing_image: bool = False,
) -> T5ForMultimodalGeneration:
    """From a local ``from_pretrained`` T5 directory (the fusion initialised fresh) or a T5Config."""
    extra = dict(
        patch_shape=tuple(patch_shape),
        gate_value=gate_value,
        vision_mask=vision_mask,
        allow_missing_image=allow_missing_image,
    )
    if base_model_path is not None:
        return T5ForMultimodalGeneration.from_pretrained(base_model_path, **extra)
    if t5_config is None:
        raise ValueError("build_model needs a T5Config or a base_model_path")
    return T5ForMultimodalGeneration(t5_config, **extra)
