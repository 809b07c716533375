"""Training objectives that turn a window of the token stream into one example.

- ``causal_lm``: a window of ``seq_len + 1`` tokens gives ``input_ids = w[:-1]`` and
  ``labels = w[1:]`` (labels are already the next token: the model must not shift again);
  consecutive windows overlap by one token so every token is predicted exactly once.
- ``span_corruption`` (T5): a window of ``tokens_length`` raw tokens gets a random noise mask
  (density ``noise_density``, mean span ``mean_span_length``); each noise span is replaced in the
  inputs by a sentinel and the targets list the sentinels each followed by its span, both ended
  by eos. ``tokens_length`` is chosen as in T5's ``compute_input_and_target_lengths`` so inputs
  fit ``seq_len`` and every target has the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpanCounts:
    """Noise / non-noise tokens and spans of one ``tokens_length`` window."""

    noise_tokens: int
    nonnoise_tokens: int
    noise_spans: int

    @property
    def inputs_length(self) -> int:
        return self.nonnoise_tokens + self.noise_spans + 1  # one sentinel per span, then eos

    @property
    def targets_length(self) -> int:
        return self.noise_tokens + self.noise_spans + 1


def span_counts(tokens_length: int, noise_density: float, mean_span_length: float) -> SpanCounts:
    """T5's counts, with at least one noise and one non-noise token so the mask is never empty."""
    noise = int(round(tokens_length * noise_density))
    noise = min(max(noise, 1), tokens_length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    return SpanCounts(noise_tokens=noise, nonnoise_tokens=tokens_length - noise, noise_spans=spans)


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """Raw tokens per example and target length such that inputs fit ``inputs_length`` (T5).

    Returns ``(tokens_length, targets_length)``; e.g. 512, 0.15, 3.0 gives (568, 114).
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        counts = span_counts(tokens_length, noise_density, mean_span_length)
        return counts.inputs_length, counts.targets_length

    tokens_length = inputs_length - 1
    while tokens_length > 2 and lengths(tokens_length)[0] > inputs_length:  # only for tiny lengths
        tokens_length -= 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    targets_length = lengths(tokens_length)[1]
    # T5's tweak: at density 0.5 make targets no longer than inputs (likely a round number).
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` non-empty segments partitioning ``num_items``, uniformly at random."""
    first_in_segment = np.zeros(num_items, dtype=bool)
    first_in_segment[1 + rng.permutation(num_items - 1)[: num_segments - 1]] = True
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean noise mask of ``length`` tokens: alternating non-noise / noise spans, non-noise first."""
    counts = span_counts(length, noise_density, mean_span_length)
    if counts.noise_spans > counts.nonnoise_tokens:
        raise ValueError(
            f"{counts.noise_spans} noise spans need as many non-noise tokens, only {counts.nonnoise_tokens}: "
            "lower DataConfig.noise_density or raise DataConfig.mean_span_length"
        )
    noise_lengths = _random_segmentation(counts.noise_tokens, counts.noise_spans, rng)
    nonnoise_lengths = _random_segmentation(counts.nonnoise_tokens, counts.noise_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_index = np.repeat(np.arange(interleaved.size), interleaved)
    return span_index % 2 == 1


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: tuple[int, ...], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """T5 inputs and targets: noise spans -> sentinels in inputs; sentinel + span in targets."""
    inputs = _replace_spans(tokens, noise_mask, sentinel_ids)
    targets = _replace_spans(tokens, ~noise_mask, sentinel_ids)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: tuple[int, ...]) -> np.ndarray:
    """Each run of masked tokens becomes the next sentinel; unmasked tokens are kept."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_number = np.cumsum(starts) - 1
    if starts.sum() > len(sentinel_ids):
        raise ValueError(
            f"{int(starts.sum())} spans need as many sentinels, the tokenizer has {len(sentinel_ids)}: "
            "raise DataConfig.n_sentinels or lower DataConfig.seq_len"
        )
    out = tokens.copy()
    out[starts] = np.asarray(sentinel_ids, dtype=tokens.dtype)[span_number[starts]]
    return out[~mask | starts]
