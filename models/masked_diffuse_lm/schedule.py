"""The soft-masking noise schedule: each importance bucket is noised during its own band of steps.

The T steps are cut into ``n_buckets`` consecutive bands; bucket b (0 = most important) is clean
before its band, follows Diffusion-LM's noise schedule within it, and stays fully noised after
it. So important words are corrupted early in the forward process and restored late in the
reverse one. ``n_buckets=1`` is exactly Diffusion-LM's uniform noise (one band = all T steps):
the ablation.

Decision (spec: bucket mapping "unverified"): disjoint bands of near-equal length
``[floor(bT/n), floor((b+1)T/n)]``, each with the whole base schedule compressed into it, so
every token passes through every noise level once and the levels of two tokens never cross in
the wrong order. The base schedule is Diffusion-LM's ``sqrt``: alpha_bar(tau) = 1 - sqrt(tau + s),
s = 1e-4, clipped below at ``ALPHA_MIN`` (Diffusion-LM clips beta at 0.999 for the same reason:
1 - sqrt(1 + s) < 0); tau = 0 is exactly clean (alpha_bar = 1, the band has not started).
"""

from __future__ import annotations

import torch

SCHEDULES = ("sqrt", "linear")
ALPHA_MIN = 1e-4  # "fully noised": signal scale 0.01


def base_alpha_bar(tau: torch.Tensor, schedule: str = "sqrt", s: float = 1e-4) -> torch.Tensor:
    """alpha_bar at band progress tau in [0, 1]: 1 at tau = 0, ALPHA_MIN at tau = 1, monotone."""
    if schedule == "sqrt":
        value = 1.0 - torch.sqrt(tau + s)
    elif schedule == "linear":
        value = 1.0 - tau
    else:
        raise ValueError(f"schedule={schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
    value = value.clamp(ALPHA_MIN, 1.0)
    value = torch.where(tau <= 0, torch.ones_like(value), value)
    return torch.where(tau >= 1, torch.full_like(value, ALPHA_MIN), value)


class SoftMaskSchedule:
    """alpha_bar per (timestep, bucket) for T steps and ``n_buckets`` bands."""

    def __init__(self, T: int, n_buckets: int, schedule: str = "sqrt") -> None:
        if T < 1:
            raise ValueError(f"T={T} must be >= 1")
        if not 1 <= n_buckets <= T:
            raise ValueError(f"n_buckets={n_buckets} must be in [1, T={T}] (each bucket needs >= 1 step)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
        self.T, self.n_buckets, self.schedule = T, n_buckets, schedule
        edges = torch.tensor([(b * T) // n_buckets for b in range(n_buckets + 1)], dtype=torch.float32)
        self.start, self.length = edges[:-1], edges[1:] - edges[:-1]

    def alpha_bar(self, t: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        """alpha_bar for timesteps ``t`` (B,) and buckets (B, L) -> (B, L)."""
        start = self.start.to(bucket.device)[bucket]
        length = self.length.to(bucket.device)[bucket]
        tau = ((t.to(bucket.device).float()[:, None] - start) / length).clamp(0.0, 1.0)
        return base_alpha_bar(tau, self.schedule)

    def noise_level(self, t: int, bucket: int) -> float:
        """alpha_bar of one token of bucket ``bucket`` at step ``t`` (0 clean ... T fully noised)."""
        return float(self.alpha_bar(torch.tensor([t]), torch.tensor([[bucket]]))[0, 0])
