"""Word importance (paper, Sec. 3.1): tf-idf relevance plus unigram entropy, and the buckets it
sorts a sentence into. Informative words are noised first, so they are generated last.

Importance of word w in sentence d (each term normalised over the sentence, then summed)::

    I(w, d) = tfidf(w, d) / sum_{w' in d} tfidf(w', d)  +  H(w) / sum_{w' in d} H(w')
    tfidf(w, d) = tf(w, d) * log(N / df(w)),      H(w) = -p(w) log p(w)

Decision (the spec marks the normalisation "unverified"): the paper sums the two terms after
normalising each over the sentence with equal weights, so neither scale (log N vs. probabilities)
dominates; we do exactly that. A word in every sentence has idf 0, an unseen word the largest
idf (df counted as 1). The statistics are fit on the train split only and live in the model as
buffers (``idf``, ``entropy``), so they are saved with every checkpoint.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch


class ImportanceScorer:
    """Fit on tokenised sentences (ids or words), then score sentences; serialisable to JSON."""

    def __init__(self) -> None:
        self.idf: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.idf is not None

    def fit(self, corpus: Iterable[list[int]], vocab_size: int) -> ImportanceScorer:
        """Document frequencies and unigram probabilities over ``corpus`` (lists of token ids)."""
        df: Counter[int] = Counter()
        counts: Counter[int] = Counter()
        n_docs = 0
        for sentence in corpus:
            n_docs += 1
            counts.update(sentence)
            df.update(set(sentence))
        if n_docs == 0:
            raise ValueError("ImportanceScorer.fit: the corpus is empty")
        total = sum(counts.values())
        idf, entropy = torch.zeros(vocab_size), torch.zeros(vocab_size)
        for i in range(vocab_size):
            idf[i] = math.log(n_docs / max(df[i], 1))
            p = counts[i] / total
            entropy[i] = -p * math.log(p) if p > 0 else 0.0
        self.idf, self.entropy = idf, entropy
        return self

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("ImportanceScorer: call fit(train corpus) (or load a fitted one) before score")

    def score(self, tokens: list[int]) -> torch.Tensor:
        """Importance of each token of one sentence."""
        self._check()
        ids = torch.tensor([tokens], dtype=torch.long)
        return importance(ids, torch.ones_like(ids), self.idf, self.entropy)[0]

    def state_dict(self) -> dict[str, list[float]]:
        self._check()
        return {"idf": self.idf.tolist(), "entropy": self.entropy.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[float]]) -> ImportanceScorer:
        scorer = cls()
        scorer.idf = torch.tensor(state["idf"], dtype=torch.float32)
        scorer.entropy = torch.tensor(state["entropy"], dtype=torch.float32)
        return scorer

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict()))

    @classmethod
    def load(cls, path: str | Path) -> ImportanceScorer:
        return cls.from_state_dict(json.loads(Path(path).read_text()))


def _normalised(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values * mask
    total = values.sum(-1, keepdim=True)
    return torch.where(total > 0, values / total.clamp_min(1e-12), torch.zeros_like(values))


def importance(
    ids: torch.Tensor, mask: torch.Tensor, idf: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:
    """Batched I(w, d) for (B, L) ids; padding (mask 0) scores 0. Depends only on the token and
    the sentence's multiset of tokens, so it is permutation-equivariant."""
    mask = mask.float()
    same = (ids[:, :, None] == ids[:, None, :]).float() * mask[:, None, :]
    tf = same.sum(-1) / mask.sum(-1, keepdim=True).clamp_min(1.0)
    tfidf = tf * idf.to(ids.device)[ids]
    ent = entropy.to(ids.device)[ids]
    return (_normalised(tfidf, mask) + _normalised(ent, mask)) * mask


def buckets(scores: torch.Tensor, mask: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of each token: its sentence's tokens sorted by importance (descending; ties by
    position) are cut into ``n_buckets`` near-equal ordered groups, bucket 0 the most important.
    Padding goes to the last bucket (it is masked everywhere anyway)."""
    length = mask.sum(-1, keepdim=True).clamp_min(1)
    keyed = torch.where(mask.bool(), scores, torch.full_like(scores, -float("inf")))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    bucket = (rank * n_buckets) // length
    return torch.where(mask.bool(), bucket, torch.full_like(bucket, n_buckets - 1)).clamp_max(n_buckets - 1)
