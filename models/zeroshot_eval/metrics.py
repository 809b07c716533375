"""Metrics of the study: accuracy (classification and reasoning), entity-level micro-F1
(CoNLL03), ROUGE-1/2/L F (SAMSum; the paper's figure reports their average).

Every metric takes parallel lists of parsed predictions (``None`` = failed parse, counted wrong)
and gold targets, and returns fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

NUMERIC_TOLERANCE = 1e-6


def is_correct(pred: object, gold: object) -> bool:
    """One example: numbers within 1e-6, anything else equal; a failed parse is wrong."""
    if pred is None:
        return False
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return isinstance(pred, (int, float)) and abs(float(pred) - float(gold)) <= NUMERIC_TOLERANCE
    return pred == gold


def accuracy(preds: Sequence[object], golds: Sequence[object]) -> dict[str, float]:
    correct = sum(is_correct(p, g) for p, g in zip(preds, golds, strict=True))
    return {"accuracy": correct / len(golds) if golds else 0.0}


def entity_f1(preds: Sequence[object], golds: Sequence[object]) -> dict[str, float]:
    """Micro-F1 over (type, span) pairs; a partial span or a wrong type is a miss."""
    tp = n_pred = n_gold = 0
    for pred, gold in zip(preds, golds, strict=True):
        pred_set = {tuple(e) for e in pred or ()}
        gold_set = {tuple(e) for e in gold}
        tp += len(pred_set & gold_set)
        n_pred += len(pred_set)
        n_gold += len(gold_set)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f(overlap: float, n_pred: int, n_gold: int) -> float:
    if not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_gold
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_scores(pred: str, gold: str) -> dict[str, float]:
    """ROUGE-1/2/L F of one summary (lower-cased alphanumeric tokens, no stemming; sentence-level
    LCS for ROUGE-L)."""
    p, g = _tokens(pred or ""), _tokens(gold)
    scores = {}
    for n in (1, 2):
        pn, gn = _ngrams(p, n), _ngrams(g, n)
        scores[f"rouge{n}"] = _f(sum((pn & gn).values()), sum(pn.values()), sum(gn.values()))
    scores["rougeL"] = _f(_lcs(p, g), len(p), len(g))
    return scores


def rouge(preds: Sequence[object], golds: Sequence[object]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F over examples, and their average ("rouge_avg", the paper's figure)."""
    per = [rouge_scores(str(p) if p is not None else "", str(g)) for p, g in zip(preds, golds, strict=True)]
    out = {k: sum(s[k] for s in per) / len(per) if per else 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    out["rouge_avg"] = (out["rouge1"] + out["rouge2"] + out["rougeL"]) / 3
    return out


METRICS = {"accuracy": accuracy, "entity_f1": entity_f1, "rouge": rouge}
HEADLINE = {"accuracy": "accuracy", "entity_f1": "f1", "rouge": "rouge_avg"}  # the report's number
