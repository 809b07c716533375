"""The augmentation network G: a VAE in feature space that returns f' = f + dec(z).

Two architectures, as in the paper (Sec. 3.3) and the official code: an MLP VAE over the
concatenated modality features, and a transformer VAE over the modality tokens. The decoder's
last Linear is zero-initialised, so f' == f at initialisation.

The official code puts a ReLU (and dropout) after that zero-initialised Linear: with weight and
bias 0 the ReLU input is exactly 0, its gradient there is 0, so the layer never receives a
gradient and the augmenter never produces a perturbation (f' stays f); even if it did, the ReLU
would force the noise to be >= 0. Here the last Linear has no activation and no dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from smile.models.lemda.config import LeMDAConfig


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-scale``.

    f' enters the task loss through it: the task network descends the loss on f' while the
    augmenter receives ``-scale`` times that gradient, i.e. ascends the task loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradReverse.apply(x, scale)


class Unit(nn.Sequential):
    """LayerNorm -> Linear -> ReLU -> Dropout (the official code's MLP unit)."""

    def __init__(self, d_in: int, d_out: int, dropout: float) -> None:
        super().__init__(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout))


def narrowing_widths(d: int, z_dim: int, n_layer: int) -> list[int]:
    """``n_layer`` widths spaced linearly strictly between ``d`` and ``z_dim``."""
    step = (d - z_dim) / (n_layer + 1)
    return [round(d - i * step) for i in range(1, n_layer + 1)]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class MLPVAE(nn.Module):
    """Encoder units narrowing from d to z_dim, mu/logvar heads, mirrored decoder, f' = f + dec(z)."""

    def __init__(self, d: int, z_dim: int, n_layer: int, dropout: float) -> None:
        super().__init__()
        widths = narrowing_widths(d, z_dim, n_layer)
        dims = [d, *widths]
        self.encoder = nn.Sequential(*(Unit(a, b, dropout) for a, b in zip(dims[:-1], dims[1:])))
        self.mu = nn.Linear(widths[-1], z_dim)
        self.logvar = nn.Linear(widths[-1], z_dim)
        up = [z_dim, *reversed(widths)]
        self.decoder = nn.Sequential(*(Unit(a, b, dropout) for a, b in zip(up[:-1], up[1:])))
        self.norm_out = nn.LayerNorm(widths[0])
        self.out = nn.Linear(widths[0], d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(f)
        mu, logvar = self.mu(hidden), self.logvar(hidden)
        noise = self.out(self.norm_out(self.decoder(reparameterize(mu, logvar))))
        return f + noise, mu, logvar


class TransformerVAE(nn.Module):
    """Pre-norm transformer encoder over the M modality tokens, per-token mu/logvar, a
    transformer decoder from z, and a zero-initialised Linear giving each token's perturbation."""

    def __init__(self, d: int, n_modalities: int, z_dim: int, n_layer: int, n_head: int, hidden: int) -> None:
        super().__init__()
        if d % n_head:
            raise ValueError(
                f"trans_vae: the feature width per modality {d} is not divisible by n_head={n_head}"
            )
        self.n_modalities, self.d = n_modalities, d

        def stack() -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(d, n_head, hidden, batch_first=True, norm_first=True)
            return nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)

        self.encoder = stack()
        self.mu = nn.Linear(d, z_dim)
        self.logvar = nn.Linear(d, z_dim)
        self.from_z = nn.Linear(z_dim, d)
        self.decoder = stack()
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = f.reshape(f.shape[0], self.n_modalities, self.d)
        hidden = self.encoder(tokens)
        mu, logvar = self.mu(hidden), self.logvar(hidden)
        noise = self.out(self.decoder(self.from_z(reparameterize(mu, logvar))))
        return (tokens + noise).reshape(f.shape), mu, logvar


class FeatureAugmenter(nn.Module):
    """G: maps the fused features f (B, M*d) to (f', mu, logvar)."""

    def __init__(self, config: LeMDAConfig, n_modalities: int, d: int) -> None:
        super().__init__()
        self.in_features = n_modalities * d
        if config.arch == "mlp_vae":
            if config.z_dim >= self.in_features:
                raise ValueError(
                    f"lemda.z_dim={config.z_dim} must be smaller than the augmenter's input width "
                    f"{self.in_features} ({n_modalities} modalities x {d})"
                )
            self.net: nn.Module = MLPVAE(self.in_features, config.z_dim, config.n_layer, config.dropout)
        else:
            if config.z_dim >= d:
                raise ValueError(
                    f"lemda.z_dim={config.z_dim} must be smaller than the per-modality width {d} (trans_vae)"
                )
            self.net = TransformerVAE(
                d, n_modalities, config.z_dim, config.n_layer, config.n_head, config.tran_hidden
            )

    @property
    def last_layer(self) -> nn.Linear:
        """The zero-initialised Linear that produces the perturbation."""
        return self.net.out

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if f.dim() != 2 or f.shape[1] != self.in_features:
            raise ValueError(
                f"augmenter expects fused features of shape (B, {self.in_features}), got {tuple(f.shape)}"
            )
        return self.net(f)
