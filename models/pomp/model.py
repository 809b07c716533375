"""POMPModel: frozen CLIP encoders around a trainable shared prompt context."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask

from smile.models.pomp.prompt import PromptLearner


class POMPModel(nn.Module):
    """``s(x, c) = exp(tau) <f(x), g(P_c)>`` with f, g and tau frozen; only the prompt learns."""

    def __init__(self, clip: CLIPModel, learner: PromptLearner) -> None:
        super().__init__()
        # DeepSpeed's initial broadcast views each parameter as bytes, which fails on 0-dim
        # tensors: CLIP's frozen logit scale is kept as a 1-element parameter instead.
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1), requires_grad=False)
        self.clip = clip.requires_grad_(False).eval()
        self.prompt_learner = learner

    def train(self, mode: bool = True) -> POMPModel:
        """CLIP stays in eval mode (no dropout) while the prompt trains."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def n_classes(self) -> int:
        return self.prompt_learner.n_classes

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.detach().float().exp().clamp(max=100.0)[0]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised image features; no graph (the image side has nothing to train)."""
        with torch.no_grad():
            pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
            return nn.functional.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def encode_text(self, class_ids: Tensor) -> Tensor:
        """L2-normalised features of the selected classes' prompts: CLIP's text transformer run
        on embeddings (HF's CLIPTextModel only takes ids), causal mask, EOS pooling, projection."""
        text = self.clip.text_model
        embeds = self.prompt_learner.embed(class_ids, text.embeddings.token_embedding)
        hidden = text.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[
            torch.arange(len(class_ids), device=hidden.device), self.prompt_learner.eos_index[class_ids]
        ]
        return nn.functional.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def class_features(self, chunk: int = 1000) -> Tensor:
        """Every class's text features, encoded once for inference (in chunks)."""
        ids = torch.arange(self.n_classes, device=self.prompt_learner.ctx.device)
        return torch.cat([self.encode_text(part) for part in ids.split(chunk)])

    def forward(self, pixel_values: Tensor, text_features: Tensor | None = None) -> Tensor:
        """Zero-shot logits over all classes (cached ``text_features`` if given); no sampling."""
        text_features = self.class_features() if text_features is None else text_features
        return self.logit_scale * self.encode_image(pixel_values) @ text_features.t()
