"""LeMDA (Liu et al., ICLR 2023): a late-fusion classifier trained jointly with a feature augmenter.

One training step (Algorithm 1), with f the fused features of a batch of B rows:

* the augmenter G sees ``f.detach()`` and returns f' = f + dec(z);
* task loss ``CE(h([f; f']), [y; y])``: h sees 2B rows with tiled labels; f' passes a gradient
  reversal of scale ``adv_scale``, so G ascends the task loss (tiny weight) while h descends it;
* G's own losses: ``reg_w * MSE(f', f) + kl_w * KL / (B z_dim) + cons_w * consistency``, the
  consistency comparing h(f') with a constant h(f) on rows where h is confident.

All terms are summed into one loss and one backward; the task network and the augmenter are
updated by their own optimizers (the runtime's multi-optimizer support).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from smile.models.lemda.augmenter import FeatureAugmenter, grad_reverse
from smile.models.lemda.config import LeMDAConfig
from smile.models.lemda.fusion import LateFusionClassifier
from smile.models.lemda.losses import consistency_loss, vae_kl

LABEL = "label"


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters treated as constants: gradients reach only ``x``."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


class LeMDA(nn.Module):
    """The classifier (task network) and, when ``config.augment``, the augmentation network;
    without it, ``config.noise_std`` > 0 trains the Gaussian-noise ablation in G's place."""

    def __init__(self, classifier: LateFusionClassifier, config: LeMDAConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.classifier = classifier
        self.augmenter = (
            FeatureAugmenter(config, len(classifier.encoders), classifier.d) if config.augment else None
        )

    def forward(self, batch: dict) -> torch.Tensor:
        """Inference: the augmenter is dropped, logits are h(f)."""
        return self.classifier(batch)

    def labels(self, batch: dict) -> torch.Tensor:
        """The batch's class indices, checked against [0, num_classes)."""
        if LABEL not in batch:
            raise KeyError(f"batch has no {LABEL!r} entry; keys: {sorted(batch)}")
        labels = batch[LABEL]
        classes = self.classifier.num_classes
        if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"labels must lie in [0, {classes}), got min {int(labels.min())} max {int(labels.max())}"
            )
        return labels.long()

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """All losses of one step; ``loss`` is their weighted sum (backpropagate that)."""
        labels = self.labels(batch)
        f = self.classifier.features(batch)
        h = self.classifier.task
        if self.augmenter is None and self.config.noise_std > 0:
            f_in = f.detach()
            scale = f_in.std(dim=0, correction=0, keepdim=True)
            f_noise = f_in + self.config.noise_std * scale * torch.randn_like(f_in)
            task = F.cross_entropy(h(torch.cat([f, f_noise], dim=0)), labels.repeat(2))
            return {"loss": task, "task": task}
        if self.augmenter is None:
            task = F.cross_entropy(h(f), labels)
            return {"loss": task, "task": task}
        cfg = self.config
        f_in = f.detach()
        f_aug, mu, logvar = self.augmenter(f_in)
        reg = F.mse_loss(f_aug, f_in)
        kl = vae_kl(mu, logvar)
        with torch.no_grad():
            orig_logits = h(f_in)
        # The paper's task objective has no consistency term, so h is frozen in it; the official
        # code (cons_updates_task=True) lets it update h too.
        aug_logits = h(f_aug) if cfg.cons_updates_task else frozen_call(h, f_aug)
        cons = consistency_loss(aug_logits, orig_logits, cfg.cons_threshold)
        logits = h(torch.cat([f, grad_reverse(f_aug, cfg.adv_scale)], dim=0))
        task = F.cross_entropy(logits, labels.repeat(2))
        loss = task + cfg.reg_w * reg + cfg.kl_w * kl + cfg.cons_w * cons
        shift = (f_aug - f_in).detach().norm(dim=-1).mean()
        return {"loss": loss, "task": task, "reg": reg, "kl": kl, "cons": cons, "aug_shift": shift}
