"""Rank classification (T0 protocol): score each answer choice by the summed log-likelihood of
its tokens under the model and pick the highest (no length normalisation, as in T0)."""

from __future__ import annotations

import torch
from torch import nn

from smile.models.spt.data import pad


@torch.no_grad()
def choice_scores(
    model: nn.Module, inputs: dict[str, torch.Tensor], choices: list[list[int]]
) -> torch.Tensor:
    """Summed log p(choice | input) for each choice of ONE example (``inputs`` has batch 1)."""
    if not choices:
        raise ValueError("rank classification needs at least one answer choice, got an empty list")
    n = len(choices)
    expanded = {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items() if k != "labels"}
    labels = pad(choices, -100).to(inputs["input_ids"].device)
    logits = model(**expanded, labels=labels).logits.float()
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def rank_classify(
    model: nn.Module, inputs: dict[str, torch.Tensor], choices: list[list[list[int]]]
) -> list[int]:
    """The index of the best choice for every example of a batch (``choices[i]``: token ids of
    example i's choices)."""
    if len(choices) != inputs["input_ids"].shape[0]:
        raise ValueError(f"{len(choices)} choice lists for a batch of {inputs['input_ids'].shape[0]}")
    preds = []
    for i, options in enumerate(choices):
        one = {k: v[i : i + 1] for k, v in inputs.items() if k != "labels"}
        preds.append(int(choice_scores(model, one, options).argmax()))
    return preds
