"""Per-modality encoders: a tabular MLP, and transformers backbones for text and images.

Each encoder maps its part of the batch to one vector per row and exposes ``out_features``.
Backbones load from a local ``from_pretrained`` directory or are built randomly from a config
dict; nothing is downloaded.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from smile.models.lemda.config import EncoderConfig

ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "gelu": nn.GELU}


class TabularMLP(nn.Module):
    """Numerical columns and embedded categorical codes -> norm -> Linear -> act -> dropout units.

    Inputs: ``{"numerical": (B, n_numerical) float, "categorical": (B, n_categorical) long}``
    (either may be absent when the encoder has no such column). Code 0 is "unknown".
    """

    def __init__(
        self,
        n_numerical: int,
        cardinalities: list[int],
        hidden: int = 128,
        num_layers: int = 1,
        norm: str = "layer",
        dropout: float = 0.1,
        activation: str = "leaky_relu",
        cat_dim: int = 16,
    ) -> None:
        super().__init__()
        if n_numerical == 0 and not cardinalities:
            raise ValueError("a tabular encoder needs at least one numerical or categorical column")
        self.n_numerical = n_numerical
        self.cardinalities = list(cardinalities)
        self.embeddings = nn.ModuleList(nn.Embedding(c, cat_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        width = n_numerical + cat_dim * len(cardinalities)
        for _ in range(num_layers):
            layers += [
                nn.BatchNorm1d(width) if norm == "batch" else nn.LayerNorm(width),
                nn.Linear(width, hidden),
                ACTIVATIONS[activation](),
                nn.Dropout(dropout),
            ]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.n_numerical:
            numerical = inputs["numerical"]
            if numerical.dim() != 2 or numerical.shape[1] != self.n_numerical:
                raise ValueError(
                    f"tabular encoder expects numerical features of shape (B, {self.n_numerical}), "
                    f"got {tuple(numerical.shape)}"
                )
            parts.append(numerical)
        if self.cardinalities:
            codes = inputs["categorical"]
            if codes.dim() != 2 or codes.shape[1] != len(self.cardinalities):
                raise ValueError(
                    f"tabular encoder expects categorical codes of shape (B, {len(self.cardinalities)}), "
                    f"got {tuple(codes.shape)}"
                )
            for i, (embedding, size) in enumerate(zip(self.embeddings, self.cardinalities)):
                column = codes[:, i]
                if column.numel() and (int(column.min()) < 0 or int(column.max()) >= size):
                    raise ValueError(
                        f"categorical column {i}: codes must lie in [0, {size}), got {column.tolist()}"
                    )
                parts.append(embedding(column).to(parts[0].dtype if parts else embedding.weight.dtype))
        return self.mlp(torch.cat(parts, dim=-1))


class HFEncoder(nn.Module):
    """A transformers backbone pooled to one vector: the first token ("cls"), the mean over
    (unmasked) positions, or the backbone's own pooled output ("pooler")."""

    def __init__(self, model: nn.Module, kind: str, pooling: str) -> None:
        super().__init__()
        if pooling != "pooler" and getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: its parameters would never receive a gradient
        self.model, self.kind, self.pooling = model, kind, pooling
        self._accepts = set(inspect.signature(model.forward).parameters)
        config = model.config
        hidden = getattr(config, "hidden_size", None)
        if hidden is None and getattr(config, "hidden_sizes", None):
            hidden = config.hidden_sizes[-1]
        if hidden is None:
            raise ValueError(f"cannot tell the feature width of a {type(model).__name__} backbone")
        self.out_features = int(hidden)

    def _check(self, inputs: dict[str, torch.Tensor]) -> None:
        config = self.model.config
        if self.kind == "image":
            pixels = inputs["pixel_values"]
            channels = getattr(config, "num_channels", 3)
            if pixels.dim() != 4 or pixels.shape[1] != channels:
                raise ValueError(
                    f"image encoder expects pixel_values (B, {channels}, H, W), got {tuple(pixels.shape)}"
                )
            size = getattr(config, "image_size", None)
            if isinstance(size, int) and tuple(pixels.shape[2:]) != (size, size):
                raise ValueError(f"image encoder expects {size}x{size} images, got {tuple(pixels.shape[2:])}")
        else:
            ids = inputs["input_ids"]
            vocab = getattr(config, "vocab_size", None)
            if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
                raise ValueError(
                    f"text encoder: token id {int(ids.max())} is outside the backbone's vocab_size={vocab}; "
                    "the tokenizer and the backbone do not match"
                )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check(inputs)
        out = self.model(**{k: v for k, v in inputs.items() if k in self._accepts})
        if self.pooling == "pooler":
            pooled = out.pooler_output
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        if hidden.dim() != 3:
            raise ValueError(f"pooling={self.pooling!r} needs a sequence output; use pooling='pooler'")
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def load_backbone(cfg: EncoderConfig) -> nn.Module:
    """The transformers model of a text/image encoder: local weights, or a random config."""
    from transformers import AutoConfig, AutoModel

    if cfg.path is not None:
        return AutoModel.from_pretrained(cfg.path, local_files_only=True)
    options = dict(cfg.hf_config)
    model_type = options.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **options))


def build_encoder(cfg: EncoderConfig, cardinalities: list[int] | None = None) -> nn.Module:
    """The encoder of one modality; ``cardinalities`` are the categorical columns' code counts."""
    if cfg.kind == "tabular":
        return TabularMLP(
            n_numerical=len(cfg.numerical),
            cardinalities=cardinalities or [],
            hidden=cfg.hidden,
            num_layers=cfg.num_layers,
            norm=cfg.norm,
            dropout=cfg.dropout,
            activation=cfg.activation,
            cat_dim=cfg.cat_dim,
        )
    return HFEncoder(load_backbone(cfg), cfg.kind, cfg.pooling)
