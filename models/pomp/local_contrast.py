"""Local contrast and local correction (POMP §3): the method's loss, as pure functions.

Each step scores every image against its true class and K-1 classes drawn once for the whole
(global) batch; the drawn negatives are shifted by ``log((N-1)/k_i)`` so that the sampled
partition function is an unbiased estimate of the full one, and a drawn class equal to the row's
true label is masked out (and not counted in k_i).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED_LOGIT = -1e6  # a colliding negative: softmax probability exp(-1e6) == 0
LOG_BASES = ("e", "10")


def check_sampling(n_classes: int, k: int) -> None:
    """K counts the positive: 2 <= K <= N."""
    if not 2 <= k <= n_classes:
        raise ValueError(
            f"num_sampled_classes={k} must be in [2, N] for N={n_classes} classes "
            "(K counts the true class plus K-1 sampled negatives)"
        )


def step_generator(seed: int, step: int) -> torch.Generator:
    """The negatives' RNG, a pure function of (seed, step): every rank draws the same classes
    without communicating, and a resumed run draws what the uninterrupted one would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def sample_negatives(n_classes: int, k: int, generator: torch.Generator) -> Tensor:
    """K-1 class ids drawn uniformly without replacement from all N (the true labels included)."""
    check_sampling(n_classes, k)
    return torch.randperm(n_classes, generator=generator)[: k - 1]


def correction_shift(n_classes: int, kept: Tensor, log_base: str = "e") -> Tensor:
    """``log((N-1)/k_i)``, natural log as in the paper; ``log_base="10"`` reproduces the official
    code's ``torch.log10`` for parity runs. ``kept`` is k_i (rows with k_i = 0 are fully masked)."""
    if log_base not in LOG_BASES:
        raise ValueError(f"correction_log_base={log_base!r} is not allowed; allowed values: e, 10")
    shift = torch.log((n_classes - 1) / kept.clamp(min=1).double())
    return (shift / math.log(10.0) if log_base == "10" else shift).float()


def local_contrast_logits(
    img_f: Tensor,
    txt_pos: Tensor,
    txt_neg: Tensor,
    labels: Tensor,
    neg_ids: Tensor,
    n_classes: int,
    correction: bool = True,
    *,
    logit_scale: Tensor | float = 1.0,
    log_base: str = "e",
) -> Tensor:
    """Logits ``[s(x_i, y_i) | s(x_i, n_1..n_{K-1})]`` (B, K); the target is column 0.

    img_f (B, D) and txt_pos (B, D, row i's true class) / txt_neg (K-1, D) are L2-normalised.
    Computed in fp32 whatever the encoders ran in (the official AMP path is broken, see README).
    """
    img_f, txt_pos, txt_neg = img_f.float(), txt_pos.float(), txt_neg.float()
    pos = logit_scale * (img_f * txt_pos).sum(-1, keepdim=True)
    neg = logit_scale * img_f @ txt_neg.t()
    collide = labels[:, None] == neg_ids[None, :].to(labels.device)
    if correction:
        kept = neg_ids.numel() - collide.sum(1)
        neg = neg + correction_shift(n_classes, kept, log_base).to(neg.device)[:, None]
    return torch.cat([pos, neg.masked_fill(collide, MASKED_LOGIT)], dim=1)


def local_contrast_loss(logits: Tensor) -> Tensor:
    """Cross-entropy with the true class in column 0."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
