"""Evaluation through the Trainer: exact accuracy, ROC-AUC or quadratic kappa, and loss over all
ranks' rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from smile.models.lemda.batches import WEIGHT
from smile.models.lemda.model import LABEL


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (0/1) ranked by ``scores`` (ties count half)."""
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"ROC-AUC needs both classes; got {positives} positive and {negatives} negative rows"
        )
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def quadratic_kappa(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2 / (C - 1)^2`` over ordinal class indices
    (PetFinder's metric: a prediction two grades off costs four times one grade off)."""
    if len(np.unique(labels)) < 2:
        raise ValueError("quadratic kappa needs at least two distinct labels in the evaluated rows")
    observed = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(observed, (labels.astype(np.int64), predictions.astype(np.int64)), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
    return float(1.0 - (weights * observed).sum() / (weights * expected).sum())


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype) -> Any:
    if torch.is_tensor(batch):
        batch = batch.to(device)
        return batch.to(float_dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    return batch


def make_eval_fn(metric: str) -> Callable[[nn.Module, Iterable, Any], dict[str, float]]:
    """The Trainer's ``eval_fn``: weighted sums reduced over ranks, so padding rows never count."""

    def eval_fn(model: nn.Module, source: Iterable, ctx: Any) -> dict[str, float]:
        dtype = next(model.parameters()).dtype
        sums = torch.zeros(3, dtype=torch.float64)
        scores, preds, labels = [], [], []
        num_classes = 0
        for raw in source:
            batch = to_device(raw, ctx.device, dtype)
            logits = model(batch).float()
            y, w = batch[LABEL], batch[WEIGHT].float()
            sums[0] += float(((logits.argmax(-1) == y).float() * w).sum())
            sums[1] += float((F.cross_entropy(logits, y, reduction="none") * w).sum())
            sums[2] += float(w.sum())
            if metric == "roc_auc" and logits.shape[-1] != 2:
                raise ValueError(f"metric 'roc_auc' needs 2 classes, the model has {logits.shape[-1]}")
            keep = w > 0
            scores.append(logits.softmax(-1)[keep, -1].cpu())
            preds.append(logits.argmax(-1)[keep].cpu())
            labels.append(y[keep].cpu())
            num_classes = logits.shape[-1]
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
            total = sums.to(device)
            dist.all_reduce(total)
            sums = total.cpu()
        out = {"accuracy": float(sums[0] / sums[2]), "loss": float(sums[1] / sums[2])}
        if metric == "accuracy":
            return out
        local = [torch.cat(part).tolist() for part in (scores, preds, labels)]
        parts = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        all_scores, all_preds, all_labels = (
            np.array([v for part in parts for v in part[i]]) for i in range(3)
        )
        if metric == "roc_auc":
            out["roc_auc"] = roc_auc(all_scores, all_labels)
        else:
            out["quadratic_kappa"] = quadratic_kappa(all_preds, all_labels, num_classes)
        return out

    return eval_fn
