"""Controllable generation by classifier guidance on the latents, as Diffusion-LM (the paper's
Sec. 3.4): a classifier p(c | x_t, t) is trained on noised latents of the frozen diffusion model,
and at each reverse step a few gradient steps move x_{t-1} up
``log p(c | x_{t-1}) - fluency * ||x_{t-1} - x_{t-1}^0||^2 / 2`` (the fluency term keeps the latent
near the diffusion model's proposal x_{t-1}^0).

Tasks: ``content`` (the sample must contain a target word: E2E's semantic-content control, where
the field values are words) uses the classifier; ``length`` needs none here, because lengths are
set by the sampling mask (diffusion.py), so it is met exactly by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smile.models.masked_diffuse_lm.denoiser import timestep_embedding
from smile.models.masked_diffuse_lm.diffusion import Guidance, MaskedDiffuseLM
from smile.runtime import ConfigError

# log p(c | x, t, mask) per sample: what guidance climbs
LogProb = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LatentClassifier(nn.Module):
    """p(c | x_t, t): a per-token MLP over [x_t, time], attention-pooled over the real tokens."""

    def __init__(self, emb_dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.token = nn.Sequential(nn.Linear(emb_dim + hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.attn = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.out.weight.dtype)
        time = timestep_embedding(t, self.hidden)[:, None].expand(-1, x_t.shape[1], -1)
        h = self.token(torch.cat([x_t, time.to(x_t.dtype)], dim=-1))
        scores = self.attn(h).squeeze(-1).masked_fill(~mask.bool(), -1e4)
        pooled = (scores.softmax(-1)[..., None] * h).sum(1)
        return self.out(pooled)


def contains_labels(ids: torch.Tensor, mask: torch.Tensor, target_id: int) -> torch.Tensor:
    """1 where the sentence contains the target word, else 0."""
    return ((ids == target_id) & mask.bool()).any(-1).long()


def classifier_loss(
    classifier: LatentClassifier, diffusion: MaskedDiffuseLM, batch: dict[str, torch.Tensor], target_id: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE of the classifier on x_t of the frozen diffusion model (t uniform in 1..T)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = torch.randint(1, diffusion.T + 1, (ids.shape[0],), device=ids.device)
        x_t = diffusion.q_sample(diffusion.embeddings()[ids], t, diffusion.buckets(ids, mask))
    labels = contains_labels(ids, mask, target_id)
    logits = classifier(x_t, t, mask)
    loss = F.cross_entropy(logits, labels)
    return loss, {"clf_acc": (logits.argmax(-1) == labels).float().mean().detach()}


class TokenEncoder(nn.Module):
    """Per-token features of x_t in context: an MLP over [x_t, time] plus a position embedding,
    then one self-attention layer over the real tokens (a part of speech or a phrase boundary
    depends on the neighbours, which a per-token MLP cannot see)."""

    def __init__(self, emb_dim: int, hidden: int, max_len: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.token = nn.Sequential(nn.Linear(emb_dim + hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.position = nn.Embedding(max_len, hidden)
        self.mix = nn.TransformerEncoderLayer(
            hidden, 1, 2 * hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.position.weight.dtype)
        time = timestep_embedding(t, self.hidden)[:, None].expand(-1, x_t.shape[1], -1)
        h = self.token(torch.cat([x_t, time.to(x_t.dtype)], dim=-1)) + self.position.weight[: x_t.shape[1]]
        return self.mix(h, src_key_padding_mask=~mask.bool())


class POSClassifier(nn.Module):
    """p(tag_i | x_t, t) at every position: logits (B, L, n_tags)."""

    def __init__(self, emb_dim: int, hidden: int, max_len: int, n_tags: int) -> None:
        super().__init__()
        self.encoder = TokenEncoder(emb_dim, hidden, max_len)
        self.out = nn.Linear(hidden, n_tags)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x_t, t, mask))


class SpanClassifier(nn.Module):
    """p(positions i..j form a constituent of type X | x_t, t) for every span (i, j) and label X
    at once: logits (B, L, L, n_labels) from the two boundary tokens' features (a pairwise
    scorer, so every sentence supervises all its spans, not one sampled query)."""

    def __init__(self, emb_dim: int, hidden: int, max_len: int, n_labels: int) -> None:
        super().__init__()
        self.encoder = TokenEncoder(emb_dim, hidden, max_len)
        self.first, self.last = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, n_labels))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x_t, t, mask)
        return self.out(self.first(h)[:, :, None] + self.last(h)[:, None, :])


def _noised(diffusion: MaskedDiffuseLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) of the frozen diffusion model for a batch, t uniform in 1..T."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = torch.randint(1, diffusion.T + 1, (ids.shape[0],), device=ids.device)
        return diffusion.q_sample(diffusion.embeddings()[ids], t, diffusion.buckets(ids, mask)), t


def pos_loss(
    classifier: POSClassifier, diffusion: MaskedDiffuseLM, batch: dict[str, torch.Tensor], tags: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token CE of the tag classifier on x_t; ``tags`` (B, L) gold tag ids, -100 at padding."""
    x_t, t = _noised(diffusion, batch)
    logits = classifier(x_t, t, batch["attention_mask"])
    loss = F.cross_entropy(logits.transpose(1, 2), tags, ignore_index=-100)
    real = tags != -100
    acc = ((logits.argmax(-1) == tags) & real).sum() / real.sum().clamp_min(1)
    return loss, {"clf_acc": acc.detach()}


def span_table(
    gold: Sequence[Iterable[tuple[int, int, int]]], lengths: Sequence[int], max_len: int, n_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid) of shape (B, L, L, n_labels): 1 where (i, j, label id) is a gold
    constituent; valid marks the spans 0 <= i <= j < length of each sentence."""
    targets = torch.zeros(len(lengths), max_len, max_len, n_labels)
    for b, spans in enumerate(gold):
        for i, j, label in spans:
            targets[b, i, j, label] = 1.0
    n = torch.tensor(list(lengths))[:, None, None]
    pos = torch.arange(max_len)
    valid = (pos[:, None] <= pos[None, :]) & (pos[None, :] < n)
    return targets, valid[..., None].expand(-1, -1, -1, n_labels)


def span_loss(
    classifier: SpanClassifier,
    diffusion: MaskedDiffuseLM,
    batch: dict[str, torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Binary CE of the span classifier on x_t over every valid (span, label) cell."""
    x_t, t = _noised(diffusion, batch)
    logits = classifier(x_t, t, batch["attention_mask"])[valid]
    loss = F.binary_cross_entropy_with_logits(logits, targets[valid])
    gold = targets[valid] > 0
    recall = ((logits > 0) & gold).sum() / gold.sum().clamp_min(1)
    return loss, {"clf_acc": ((logits > 0) == gold).float().mean().detach(), "clf_recall": recall.detach()}


def steer(log_prob: LogProb, step_size: float = 0.1, steps: int = 3, fluency: float = 0.01) -> Guidance:
    """The gradient-ascent step on x_{t-1} that Diffusion-LM applies after each reverse step, up
    ``log_prob(x) - fluency * ||x - x^0||^2 / 2``."""

    def guide(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        anchor = x.detach()
        x = anchor.clone().requires_grad_(True)
        for _ in range(steps):
            objective = log_prob(x, t, mask).sum() - fluency * 0.5 * (x - anchor).square().sum()
            (grad,) = torch.autograd.grad(objective, x)
            x = (x + step_size * grad * mask[..., None]).detach().requires_grad_(True)
        return x.detach()

    return guide


def guidance(
    classifier: LatentClassifier,
    target: int = 1,
    step_size: float = 0.1,
    steps: int = 3,
    fluency: float = 0.01,
) -> Guidance:
    """Guidance toward class ``target`` of a sentence-level classifier (content control)."""
    return steer(
        lambda x, t, mask: classifier(x, t, mask).log_softmax(-1)[:, target], step_size, steps, fluency
    )


def pos_guidance(
    classifier: POSClassifier,
    target: Sequence[int],
    step_size: float = 0.1,
    steps: int = 3,
    fluency: float = 0.01,
) -> Guidance:
    """Guidance toward a tag sequence: the sum over its positions of log p(tag_i | x)."""

    def log_prob(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logp = classifier(x, t, mask).log_softmax(-1)[:, : len(target)]
        tags = torch.tensor(list(target), device=x.device)
        return logp.gather(-1, tags.expand(x.shape[0], -1)[..., None]).squeeze(-1).sum(-1)

    return steer(log_prob, step_size, steps, fluency)


def span_guidance(
    classifier: SpanClassifier,
    target: tuple[int, int, int],
    step_size: float = 0.1,
    steps: int = 3,
    fluency: float = 0.01,
) -> Guidance:
    """Guidance toward "positions i..j form a constituent of label X": log sigmoid of its logit."""

    def log_prob(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(classifier(x, t, mask)[:, target[0], target[1], target[2]])

    return steer(log_prob, step_size, steps, fluency)


def parse_pos_target(text: str | None, tags: Sequence[str], max_len: int) -> list[str]:
    """``"DET NOUN VERB"`` -> its tags; an unknown tag or a sequence longer than max_len is an
    error naming ``control.target`` and the allowed tags."""
    allowed = ", ".join(tags)
    words = (text or "").replace(",", " ").split()
    if not words:
        raise ConfigError(
            f"control.target={text!r}: a POS target is a space-separated tag sequence "
            f"(e.g. 'DET NOUN VERB'); allowed tags: {allowed}"
        )
    unknown = [w for w in words if w not in tags]
    if unknown:
        raise ConfigError(f"control.target={text!r}: unknown POS tag(s) {unknown}; allowed tags: {allowed}")
    if len(words) > max_len:
        raise ConfigError(f"control.target={text!r}: {len(words)} tags, more than max_len={max_len}")
    return words


def parse_span_target(text: str | None, labels: Sequence[str], max_len: int) -> tuple[int, int, str]:
    """``"i,j,LABEL"`` (words i..j, 0-based, inclusive) -> (i, j, LABEL); a bad format, order,
    position or label is an error naming ``control.target`` and the allowed values."""
    parts = [p.strip() for p in (text or "").split(",")]
    form = f"'i,j,LABEL' with 0 <= i <= j < max_len={max_len} and LABEL one of {', '.join(labels)}"
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ConfigError(f"control.target={text!r}: a span target is {form}")
    i, j, label = int(parts[0]), int(parts[1]), parts[2]
    if not i <= j < max_len or label not in labels:
        raise ConfigError(f"control.target={text!r}: a span target is {form}")
    return i, j, label
