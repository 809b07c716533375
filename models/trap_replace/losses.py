"""The two stages' losses, as runtime loss functions ``loss_fn(model, batch, ctx)``.

Stage 1 (bait and trap): ``CE(head(stem(x)), y) + rec_weight * MSE(dec(stem(x)), x) +
tv_weight * TV(dec(stem(x)))`` on the poisoned training set, x in [0, 1].
Stage 2 (replace): CutMix (official rand_bbox, lambda corrected to the pasted area) with
label-smoothing CE on mixed batches and plain CE otherwise, on the clean holdout only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def total_variation(img: torch.Tensor) -> torch.Tensor:
    """``(sum (dh img)^2 + sum (dw img)^2) / (B C H W)``, the official TV term."""
    b, c, h, w = img.shape
    tv_h = (img[:, :, 1:, :] - img[:, :, :-1, :]).pow(2).sum()
    tv_w = (img[:, :, :, 1:] - img[:, :, :, :-1]).pow(2).sum()
    return (tv_h + tv_w) / (b * c * h * w)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


class Stage1Loss:
    """CE + rec_weight MSE + tv_weight TV; with both weights 0 it is plain CE (no defense).

    The first batch is checked to lie in [0, 1] when the reconstruction loss is on: the decoder
    ends in a sigmoid, so a normalised or 0..255 target would silently wreck the trap.
    """

    def __init__(self, rec_weight: float, tv_weight: float) -> None:
        self.rec_weight, self.tv_weight = rec_weight, tv_weight
        self._checked = False

    def __call__(self, model, batch: dict[str, torch.Tensor], ctx) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch["image"], batch["label"]
        use_rec = self.rec_weight > 0 or self.tv_weight > 0
        if use_rec and not self._checked:
            low, high = float(x.min()), float(x.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"stage 1 reconstructs the input, which must be scaled to [0, 1]; the first batch spans "
                    f"[{low:.3f}, {high:.3f}] (normalise inside the model with data.mean/std instead)"
                )
            self._checked = True
        logits, recon = model(x)
        ce = F.cross_entropy(logits.float(), y)
        metrics: dict[str, Any] = {"ce": ce.detach(), "acc": accuracy(logits, y), "samples": len(y)}
        loss = ce
        if use_rec:
            if recon is None:
                raise ValueError("rec_weight/tv_weight > 0 but the model has no decoder")
            recon = recon.float()
            rec = F.mse_loss(recon, x.float())
            tv = total_variation(recon)
            loss = ce + self.rec_weight * rec + self.tv_weight * tv
            metrics.update(rec=rec.detach(), tv=tv.detach())
        return loss, metrics


def rand_bbox(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The CutMix box (official ``rand_bbox``): side ratio sqrt(1 - lam), uniform centre, clipped."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, x1, y2, x2


def cutmix(
    x: torch.Tensor, y: torch.Tensor, beta: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(mixed images, labels a, labels b, lambda = share of the image still from a)."""
    lam = float(rng.beta(beta, beta))
    perm = torch.as_tensor(rng.permutation(len(y)), device=x.device)
    h, w = x.shape[-2:]
    y1, x1, y2, x2 = rand_bbox(h, w, lam, rng)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, y, y[perm], lam


class Stage2Loss:
    """CutMix (probability ``cutmix_prob``, Beta(beta, beta)) with label-smoothing CE; plain CE on
    unmixed batches, as in the official code. The draws are seeded by (seed, step, micro-step,
    rank), so a resumed run mixes exactly as an uninterrupted one."""

    def __init__(self, beta: float, prob: float, smoothing: float, seed: int) -> None:
        self.beta, self.prob, self.smoothing, self.seed = beta, prob, smoothing, seed

    def __call__(self, model, batch: dict[str, torch.Tensor], ctx) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch["image"], batch["label"]
        rng = np.random.default_rng([self.seed, ctx.step, ctx.micro_step, ctx.topology.rank])
        if self.beta > 0 and rng.random() < self.prob:
            mixed, y_a, y_b, lam = cutmix(x, y, self.beta, rng)
            logits, _ = model(mixed)
            logits = logits.float()
            loss = lam * F.cross_entropy(logits, y_a, label_smoothing=self.smoothing) + (
                1 - lam
            ) * F.cross_entropy(logits, y_b, label_smoothing=self.smoothing)
        else:
            logits, _ = model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
        return loss, {"samples": len(y)}
