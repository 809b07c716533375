"""Clean accuracy (CA) and attack success rate (ASR).

CA: accuracy on the clean test set. ASR: the share of triggered non-target test images that the
model assigns to the target class.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def predictions(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> tuple:
    """(predicted classes, labels) over ``batches`` in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    try:
        for batch in batches:
            dtype = next(model.parameters()).dtype
            logits, _ = model(batch["image"].to(device=device, dtype=dtype))
            preds.append(logits.argmax(1).cpu())
            labels.append(batch["label"])
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def clean_accuracy(model: nn.Module, clean: Iterable[dict], device: torch.device) -> float:
    pred, labels = predictions(model, clean, device)
    return float((pred == labels).double().mean())


def attack_success_rate(
    model: nn.Module, triggered: Iterable[dict], target: int, device: torch.device
) -> float:
    pred, labels = predictions(model, triggered, device)
    if bool((labels == target).any()):
        raise ValueError("the ASR set must exclude target-class images")
    return float((pred == target).double().mean())


def ca_asr(
    model: nn.Module, clean: Iterable[dict], triggered: Iterable[dict], target: int, device: torch.device
) -> dict[str, float]:
    return {
        "ca": clean_accuracy(model, clean, device),
        "asr": attack_success_rate(model, triggered, target, device),
    }
