"""AIM's bottleneck adapters, their mixture-of-adapters (MoE) variant and DropPath."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from smile.moe import MoEConfig, MoELayer, Topology


def hidden_width(dim: int, ratio: float) -> int:
    """Bottleneck width ``int(D * ratio)`` as in the official code (192 for D=768, ratio 0.25)."""
    return max(1, int(dim * ratio))


class Adapter(nn.Module):
    """``fc2(gelu(fc1(x)))`` (+ x with ``skip``). fc2 starts at zero, so the adapter starts as
    the identity (skip) or as zero (no skip): the wrapped model starts as the image model."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = hidden_width(dim, ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.D_fc2(self.act(self.D_fc1(x)))
        return x + out if self.skip else out


class MoEAdapter(nn.Module):
    """The joint adapter as a top-1 mixture of bottleneck adapters on smile's MoE layer (no skip,
    as the dense MLP_Adapter). Expert output weights start at zero, so the model still starts as
    the image model; the layer's load-balance loss is picked up by the Trainer."""

    def __init__(self, dim: int, ratio: float, moe: MoEConfig, topology: Topology | None = None) -> None:
        super().__init__()
        cfg = dataclasses.replace(moe, d_model=dim, d_ff=hidden_width(dim, ratio))
        self.moe = MoELayer(cfg, topology=topology)
        with torch.no_grad():
            self.moe.experts.w_out.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out, _aux = self.moe(x)  # aux is kept by the layer for smile.moe.collect_aux_loss
        return out


class DropPath(nn.Module):
    """Stochastic depth per frame (dim 0 of (B*T, N, D)), on the temporal and joint branches
    only; the spatial branch has none, kept for parity. The official code applies timm's
    DropPath to (N, B*T, D) tensors, i.e. it drops tokens; here, as stochastic depth on an
    image model, whole frames (each of the B*T images) are dropped."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
