"""Controllable generation by classifier guidance on the latents, as Diffusion-LM (the paper's
Sec. 3.4): a classifier p(c | x_t, t) is trained on noised latents of the frozen diffusion model,
and at each reverse step a few gradient steps move x_{t-1} up
``log p(c | x_{t-1}) - fluency * ||x_{t-1} - x_{t-1}^0||^2 / 2`` (the fluency term keeps the latent
near the diffusion model's proposal x_{t-1}^0).

Tasks: ``content`` (the sample must contain a target word: E2E's semantic-content control, where
the field values are words) uses the classifier; ``length`` needs none here, because lengths are
set by the sampling mask (diffusion.py), so it is met exactly by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smile.models.masked_diffuse_lm.denoiser import timestep_embedding
from smile.models.masked_diffuse_lm.diffusion import Guidance, MaskedDiffuseLM


class LatentClassifier(nn.Module):
    """p(c | x_t, t): a per-token MLP over [x_t, time], attention-pooled over the real tokens."""

    def __init__(self, emb_dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.token = nn.Sequential(nn.Linear(emb_dim + hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.attn = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.out.weight.dtype)
        time = timestep_embedding(t, self.hidden)[:, None].expand(-1, x_t.shape[1], -1)
        h = self.token(torch.cat([x_t, time.to(x_t.dtype)], dim=-1))
        scores = self.attn(h).squeeze(-1).masked_fill(~mask.bool(), -1e4)
        pooled = (scores.softmax(-1)[..., None] * h).sum(1)
        return self.out(pooled)


def contains_labels(ids: torch.Tensor, mask: torch.Tensor, target_id: int) -> torch.Tensor:
    """1 where the sentence contains the target word, else 0."""
    return ((ids == target_id) & mask.bool()).any(-1).long()


def classifier_loss(
    classifier: LatentClassifier, diffusion: MaskedDiffuseLM, batch: dict[str, torch.Tensor], target_id: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE of the classifier on x_t of the frozen diffusion model (t uniform in 1..T)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = torch.randint(1, diffusion.T + 1, (ids.shape[0],), device=ids.device)
        x_t = diffusion.q_sample(diffusion.embeddings()[ids], t, diffusion.buckets(ids, mask))
    labels = contains_labels(ids, mask, target_id)
    logits = classifier(x_t, t, mask)
    loss = F.cross_entropy(logits, labels)
    return loss, {"clf_acc": (logits.argmax(-1) == labels).float().mean().detach()}


def guidance(
    classifier: LatentClassifier,
    target: int = 1,
    step_size: float = 0.1,
    steps: int = 3,
    fluency: float = 0.01,
) -> Guidance:
    """The gradient-ascent step on x_{t-1} that Diffusion-LM applies after each reverse step."""

    def guide(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        anchor = x.detach()
        x = anchor.clone().requires_grad_(True)
        for _ in range(steps):
            log_p = classifier(x, t, mask).log_softmax(-1)[:, target].sum()
            objective = log_p - fluency * 0.5 * (x - anchor).square().sum()
            (grad,) = torch.autograd.grad(objective, x)
            x = (x + step_size * grad * mask[..., None]).detach().requires_grad_(True)
        return x.detach()

    return guide
