"""Backbones split into a stem, a light classification head and an image-reconstruction decoder.

WRN-16-1 (CIFAR-10/GTSRB) and ResNet-34 (ImageNet-12) in plain torch, cut where the paper cuts
them (``stem_end_block``): the stem is shared by the head and the decoder in stage 1; stage 2
freezes it and trains a fresh head (:func:`replace_head`). Block structure, activations and
initialisation follow the official code (FixMatch-style WRN units with LeakyReLU 0.1 and biased
convolutions; torchvision-style ResNet basic blocks).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_WRN = re.compile(r"^wrn(\d+)_(\d+)$")
RESNET34_STEM_ENDS = (27, 29, 31, 33)


# ---------------------------------------------------------------------------------------------
# Wide ResNet
# ---------------------------------------------------------------------------------------------
class WRNUnit(nn.Module):
    """Pre-activation wide-ResNet unit (BN-LeakyReLU-conv x2 with a 1x1 shortcut on a shape change).

    As in the official (FixMatch) unit, a shape-changing unit without ``activate_before_residual``
    feeds the raw input to its first conv, so its ``bn1`` is computed but unused.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=True)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=True)
        )
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equal_in_out and self.activate_before_residual:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equal_in_out else x)))
        out = self.conv2(out)
        return (x if self.equal_in_out else self.conv_shortcut(x)) + out


class WRNHead(nn.Module):
    """The remaining WRN units, dropout (stage-2 head only), final BN, LeakyReLU, average pool, FC."""

    def __init__(self, units: list[nn.Module], channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.units = nn.Sequential(*units)
        self.dropout = dropout
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.units(h)
        # Dropout sits before the final BN, as on the official stage-2 branch.
        h = F.dropout(h, p=self.dropout, training=self.training)
        h = F.leaky_relu(self.bn(h), negative_slope=0.1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _wrn_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


def wrn_stem_ends(depth: int) -> tuple[int, ...]:
    """Valid ``stem_end_block`` values of a WRN: the stem ends inside or after the third block
    (4, 5, 6 for WRN-16, as in the official code)."""
    units = (depth - 4) // 6
    return tuple(range(2 * units, 3 * units + 1))


def _wrn_units(depth: int, widen: int, base: int) -> tuple[list[tuple[int, int, int, bool]], list[int]]:
    n = (depth - 4) // 6
    channels = [base, base * widen, 2 * base * widen, 4 * base * widen]
    specs = []
    for block, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            c_in = channels[block - 1] if i == 0 else channels[block]
            specs.append((c_in, channels[block], stride if i == 0 else 1, block == 1))
    return specs, channels


# ---------------------------------------------------------------------------------------------
# ResNet-34
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (conv-BN-ReLU-conv-BN + shortcut, ReLU)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetHead(nn.Module):
    """The remaining layer4 blocks, dropout (stage-2 head only), average pool, FC."""

    def __init__(self, blocks: list[nn.Module], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.dropout = dropout
        self.fc = nn.Linear(512, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.blocks(h), p=self.dropout, training=self.training)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _resnet_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> list[nn.Module]:
    return [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]


# ---------------------------------------------------------------------------------------------
# The split network
# ---------------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so the data (and the reconstruction target)
    stay in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StemHeadDecoder(nn.Module):
    """Shared stem feeding a classification head and (stage 1) a reconstruction decoder.

    ``forward(x) -> (logits, recon)``; ``recon`` is None once the decoder is gone (stage 2).
    While the stem is frozen it stays in eval mode (BN statistics fixed) whatever ``train()`` says.
    """

    def __init__(
        self,
        normalize: Normalize,
        stem: nn.Module,
        head: nn.Module,
        decoder: nn.Module | None,
        make_head: Callable[[float], nn.Module],
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.head = head
        self.decoder = decoder
        self.make_head = make_head
        self.stem_frozen = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.stem(self.normalize(x))
        recon = None if self.decoder is None else self.decoder(features)
        return self.head(features), recon

    def train(self, mode: bool = True) -> StemHeadDecoder:
        super().train(mode)
        if self.stem_frozen:
            self.stem.eval()
        return self


def replace_head(model: StemHeadDecoder, dropout: float = 0.5) -> StemHeadDecoder:
    """Stage 2: drop the (possibly poisoned) head and the decoder, freeze the stem with its BN
    statistics, and attach a freshly initialised head of the same architecture."""
    model.head = model.make_head(dropout)
    model.decoder = None
    model.stem.requires_grad_(False)
    model.stem_frozen = True
    model.train(model.training)
    return model


def _decoder(channels: int, hidden: int, out_channels: int, stride: int) -> nn.Sequential:
    """The official WRN decoder: ConvT(k4, s2) -> ReLU -> ConvT (k4, s2 for a stride-4 stem;
    k3, s1 for a stride-2 stem) -> Sigmoid, back to the input resolution."""
    if stride == 4:
        last = nn.ConvTranspose2d(hidden, out_channels, 4, stride=2, padding=1)
    elif stride == 2:
        last = nn.ConvTranspose2d(hidden, out_channels, 3, stride=1, padding=1)
    else:
        raise ValueError(f"no decoder for a stem of stride {stride}")
    return nn.Sequential(
        nn.ConvTranspose2d(channels, hidden, 4, stride=2, padding=1), nn.ReLU(), last, nn.Sigmoid()
    )


def _resnet_decoder(stem_end_block: int) -> nn.Sequential:
    """The official ResNet-34 decoders (x16 after layer3, x32 after layer4 blocks). The official
    code declares InstanceNorm2d(256)/(128) on 128/32 channels; without affine parameters the
    channel count does not enter the computation, so the true counts are used here."""
    if stem_end_block == 27:
        return nn.Sequential(
            nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1),
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),
            nn.InstanceNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 3, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )
    return nn.Sequential(
        nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1),
        nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1),
        nn.InstanceNorm2d(128),
        nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
        nn.InstanceNorm2d(32),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1),
        nn.Sigmoid(),
    )


def valid_stem_ends(arch: str) -> tuple[int, ...]:
    """The ``stem_end_block`` values ``arch`` supports (ValueError for an unknown arch)."""
    if arch == "resnet34":
        return RESNET34_STEM_ENDS
    match = _WRN.match(arch)
    if match is None or (int(match.group(1)) - 4) % 6 or int(match.group(1)) < 10 or int(match.group(2)) < 1:
        raise ValueError(
            f"arch={arch!r} is not supported; allowed: 'resnet34' or 'wrn<depth>_<widen>' with "
            "depth = 6n + 4 >= 10 (e.g. 'wrn16_1', the paper's CIFAR-10/GTSRB backbone)"
        )
    return wrn_stem_ends(int(match.group(1)))


def build_network(
    arch: str,
    stem_end_block: int,
    num_classes: int,
    *,
    in_channels: int = 3,
    base_width: int = 16,
    decoder_channels: int = 32,
    with_decoder: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> StemHeadDecoder:
    """The stage-1 network: stem, light head (no dropout) and, if ``with_decoder``, the decoder."""
    valid = valid_stem_ends(arch)
    if stem_end_block not in valid:
        raise ValueError(
            f"stem_end_block={stem_end_block} is not supported by arch={arch!r}; valid values: {list(valid)}"
        )
    normalize = Normalize(mean or [0.0] * in_channels, std or [1.0] * in_channels)
    if arch == "resnet34":
        if in_channels != 3:
            raise ValueError(f"arch='resnet34' takes 3-channel images, got in_channels={in_channels}")
        return _build_resnet34(normalize, stem_end_block, num_classes, with_decoder)
    depth, widen = (int(g) for g in _WRN.match(arch).groups())
    specs, channels = _wrn_units(depth, widen, base_width)
    units = [WRNUnit(*spec) for spec in specs]
    stem = nn.Sequential(
        OrderedDict([("conv1", nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=True))])
    )
    for i, unit in enumerate(units[:stem_end_block]):
        stem.add_module(f"unit{i + 1}", unit)

    def make_head(dropout: float) -> nn.Module:
        head = WRNHead([WRNUnit(*spec) for spec in specs[stem_end_block:]], channels[3], num_classes, dropout)
        _wrn_init(head)
        return head

    stem_channels = specs[stem_end_block - 1][1]
    stride = 2 if stem_end_block == 2 * (len(specs) // 3) else 4
    decoder = _decoder(stem_channels, decoder_channels, in_channels, stride) if with_decoder else None
    _wrn_init(stem)
    model = StemHeadDecoder(normalize, stem, make_head(0.0), decoder, make_head)
    return model


def _build_resnet34(normalize: Normalize, stem_end_block: int, num_classes: int, with_decoder: bool):
    layer4 = _layer(256, 512, 3, 2)
    keep = (stem_end_block - 27) // 2
    stem = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
                ("bn1", nn.BatchNorm2d(64)),
                ("relu", nn.ReLU()),
                ("maxpool", nn.MaxPool2d(3, stride=2, padding=1)),
                ("layer1", nn.Sequential(*_layer(64, 64, 3, 1))),
                ("layer2", nn.Sequential(*_layer(64, 128, 4, 2))),
                ("layer3", nn.Sequential(*_layer(128, 256, 6, 2))),
                ("layer4", nn.Sequential(*layer4[:keep])),
            ]
        )
    )

    def make_head(dropout: float) -> nn.Module:
        fresh = _layer(256, 512, 3, 2)[keep:]
        head = ResNetHead(fresh, num_classes, dropout)
        _resnet_init(head)
        return head

    _resnet_init(stem)
    decoder = _resnet_decoder(stem_end_block) if with_decoder else None
    return StemHeadDecoder(normalize, stem, make_head(0.0), decoder, make_head)
