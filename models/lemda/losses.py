"""LeMDA's augmenter objectives: the VAE prior term and the confidence-masked consistency."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vae_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(q(z|f) || N(0, I))`` summed over the batch, divided by ``B * z_dim`` (the official
    normalisation; for trans_vae the sum also runs over the modality tokens)."""
    total = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return total / (mu.shape[0] * mu.shape[-1])


def consistency_loss(aug_logits: torch.Tensor, orig_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mean_i[ 1{max p(f_i) > threshold} * KL(p(f'_i) || p(f_i)) ]``.

    p(f) is treated as a constant (no gradient through ``orig_logits``). The direction
    KL(p_aug || p_orig) is the official code's; the mean runs over all rows, masked ones count 0.
    """
    orig_logits = orig_logits.detach()
    log_p_aug = F.log_softmax(aug_logits, dim=-1)
    log_p_orig = F.log_softmax(orig_logits, dim=-1)
    kl = torch.sum(log_p_aug.exp() * (log_p_aug - log_p_orig), dim=-1)
    confident = log_p_orig.exp().max(dim=-1).values > threshold
    return torch.mean(kl * confident.to(kl.dtype))
