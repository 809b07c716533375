"""Late fusion: encoders -> per-modality adapters -> concatenation f -> task network h.

The task network h (fusion MLP and head) is its own module, so LeMDA can run it on f, on f',
and with frozen parameters for the consistency term.
"""

from __future__ import annotations

import torch
from torch import nn

from smile.models.lemda.encoders import ACTIVATIONS


class TaskNetwork(nn.Module):
    """h: fusion MLP units (LayerNorm -> Linear -> act -> dropout), then a linear head."""

    def __init__(
        self, in_features: int, hidden: list[int], num_classes: int, activation: str, dropout: float
    ) -> None:
        super().__init__()
        units: list[nn.Module] = []
        width = in_features
        for out in hidden:
            units.append(
                nn.Sequential(
                    nn.LayerNorm(width), nn.Linear(width, out), ACTIVATIONS[activation](), nn.Dropout(dropout)
                )
            )
            width = out
        self.fusion_mlp = nn.Sequential(*units)
        self.head = nn.Linear(width, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion_mlp(f))


class LateFusionClassifier(nn.Module):
    """Per-modality encoders, adapters to a common width d, f = concat (B, M*d), logits = h(f).

    ``encoders`` maps modality names (keys of the batch) to modules with ``out_features``.
    ``adapter``: "max"/"min" of the encoders' widths, or an explicit width.
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        num_classes: int,
        fusion_hidden: list[int] | int = 128,
        adapter: str | int = "max",
        activation: str = "leaky_relu",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("LateFusionClassifier needs at least one encoder")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        widths = {name: int(enc.out_features) for name, enc in encoders.items()}
        if adapter == "max":
            d = max(widths.values())
        elif adapter == "min":
            d = min(widths.values())
        else:
            d = int(adapter)
        self.encoders = nn.ModuleDict(encoders)
        self.adapters = nn.ModuleDict({name: nn.Linear(width, d) for name, width in widths.items()})
        self.d, self.num_classes = d, num_classes
        hidden = [fusion_hidden] if isinstance(fusion_hidden, int) else list(fusion_hidden)
        self.task = TaskNetwork(d * len(encoders), hidden, num_classes, activation, dropout)
        self._batchnorm = sorted(
            name
            for name, enc in encoders.items()
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def features(self, batch: dict) -> torch.Tensor:
        """f: the concatenated adapted features, (B, M*d)."""
        missing = [name for name in self.encoders if name not in batch]
        if missing:
            raise KeyError(
                f"batch has no modality {missing[0]!r}; expected {self.modalities}, got {sorted(batch)}"
            )
        parts = []
        for name, encoder in self.encoders.items():
            if self.training and name in self._batchnorm and _rows(batch[name]) == 1:
                raise ValueError(
                    f"a training batch of 1 row reached encoder {name!r}, which has BatchNorm layers "
                    "(they need more than one row per batch): use a batch size >= 2, drop incomplete "
                    "batches, or a LayerNorm encoder"
                )
            x = self.adapters[name](encoder(batch[name]))
            if parts and x.shape[0] != parts[0].shape[0]:
                raise ValueError(
                    f"modality {name!r} has {x.shape[0]} rows, the first one {parts[0].shape[0]}"
                )
            parts.append(x)
        return torch.cat(parts, dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits h(f) (inference: no augmentation)."""
        return self.task(self.features(batch))


def _rows(inputs: torch.Tensor | dict) -> int:
    tensor = inputs if torch.is_tensor(inputs) else next(v for v in inputs.values() if torch.is_tensor(v))
    return int(tensor.shape[0])
