"""The pretraining loader: per-rank batches, deterministic, disjoint across ranks, resumable.

``build_dataloader(cfg, dp_rank, dp_size)`` returns a :class:`PretrainLoader`, an iterator of
``dict[str, torch.LongTensor]`` batches of ``cfg.batch_size`` examples for that rank:

- causal_lm: ``input_ids``, ``attention_mask`` (all ones: sequences are packed, documents
  separated by eos, attention not reset at document boundaries) and ``labels``, already the
  next token of each position; all ``[batch, seq_len]``.
- span_corruption: ``input_ids`` and ``attention_mask`` ``[batch, seq_len]`` (inputs are
  right-padded with pad when T5's length arithmetic leaves them shorter), ``labels`` and
  ``decoder_input_ids`` ``[batch, targets_length]`` where ``decoder_input_ids`` is ``labels``
  shifted right behind pad (T5's decoder start), so models need not build it.

``state_dict()`` is a flat dict of ints and strings (JSON-serialisable); a loader built with the
same config and tokenizer and given it via ``load_state_dict()`` yields exactly the batches the
saved one would have yielded next. With ``cfg.epochs`` set the loader stops at the end of the
data, dropping the last partial example and batch; ranks may then yield different numbers of
batches, so training jobs should leave ``epochs`` unset and stop after a step count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smile.data.config import DataConfig
from smile.data.objectives import (
    compute_input_and_target_lengths,
    random_spans_noise_mask,
    span_corrupt,
    span_counts,
)
from smile.data.sources import DocumentSource, open_source
from smile.data.token_stream import Position, TokenCursor
from smile.data.tokenizer import TextTokenizer, build_tokenizer

STATE_FORMAT = 1
# State entries that must match between the saving and the resuming loader.
_IDENTITY = ("objective", "source", "seed", "seq_len", "dp_rank", "dp_size", "tokenizer")
_POSITION = ("epoch", "doc", "offset", "examples", "batches")


class PretrainLoader:
    """Iterator over one data-parallel rank's batches; see the module docstring for the tensors."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: TextTokenizer,
        dp_rank: int = 0,
        dp_size: int = 1,
        source: DocumentSource | None = None,
    ) -> None:
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be an integer in [0, {dp_size}), got {dp_rank!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.targets_length: int | None = None
        if cfg.objective == "span_corruption":
            self.tokens_per_example, self.targets_length = compute_input_and_target_lengths(
                cfg.seq_len, cfg.noise_density, cfg.mean_span_length
            )
            self._check_span_corruption()
        else:
            self.tokens_per_example = cfg.seq_len + 1
        self._source = source if source is not None else open_source(cfg)
        self._start = Position(0, 0, 0)
        self._examples = 0
        self._batches = 0
        self._cursor: TokenCursor | None = None

    def _check_span_corruption(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        counts = span_counts(self.tokens_per_example, cfg.noise_density, cfg.mean_span_length)
        if tok.pad_id is None:
            raise ValueError(
                f"DataConfig.tokenizer={tok.path!r} has no pad token, needed for span_corruption"
            )
        if counts.noise_spans > len(tok.sentinel_ids):
            raise ValueError(
                f"span_corruption with seq_len={cfg.seq_len} makes {counts.noise_spans} spans but "
                f"DataConfig.tokenizer={tok.path!r} has {len(tok.sentinel_ids)} sentinels "
                "(<extra_id_i>): lower DataConfig.seq_len or raise DataConfig.n_sentinels"
            )
        if counts.noise_spans > counts.nonnoise_tokens:
            raise ValueError(
                f"DataConfig.noise_density={cfg.noise_density} with mean_span_length={cfg.mean_span_length} "
                "leaves fewer non-noise tokens than spans; lower noise_density"
            )

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._cursor is None:
            self._cursor = TokenCursor(
                self._source, self.tokenizer, self.dp_rank, self.dp_size, self.cfg.epochs, self._start
            )
        if self.cfg.objective == "causal_lm":
            batch = self._causal_batch(self._cursor)
        else:
            batch = self._span_batch(self._cursor)
        self._batches += 1
        return batch

    def _windows(self, cursor: TokenCursor) -> list[np.ndarray]:
        """``batch_size`` windows; causal windows overlap by the one token predicted last."""
        step = self.cfg.seq_len if self.cfg.objective == "causal_lm" else self.tokens_per_example
        windows = []
        for _ in range(self.cfg.batch_size):
            window = cursor.window(self.tokens_per_example)
            if window is None:
                raise StopIteration
            cursor.advance(step)
            windows.append(window)
        return windows

    def _causal_batch(self, cursor: TokenCursor) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack(self._windows(cursor)))
        self._examples += ids.shape[0]
        inputs = ids[:, :-1].contiguous()
        labels = ids[:, 1:].contiguous()
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}

    def _span_batch(self, cursor: TokenCursor) -> dict[str, torch.Tensor]:
        cfg, tok = self.cfg, self.tokenizer
        windows = self._windows(cursor)
        inputs = np.full((len(windows), cfg.seq_len), tok.pad_id, dtype=np.int64)
        mask = np.zeros_like(inputs)
        labels = np.empty((len(windows), self.targets_length), dtype=np.int64)
        for row, window in enumerate(windows):
            rng = np.random.default_rng([cfg.seed, self.dp_rank, self._examples])
            noise = random_spans_noise_mask(window.size, cfg.noise_density, cfg.mean_span_length, rng)
            enc, dec = span_corrupt(window, noise, tok.sentinel_ids, tok.eos_id)
            inputs[row, : enc.size] = enc
            mask[row, : enc.size] = 1
            labels[row] = dec
            self._examples += 1
        decoder_inputs = np.concatenate([np.full((len(windows), 1), tok.pad_id), labels[:, :-1]], axis=1)
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
            "decoder_input_ids": torch.from_numpy(decoder_inputs),
        }

    def state_dict(self) -> dict[str, int | str]:
        """Where this rank's data stands: plain ints and strings, JSON-serialisable."""
        position = self._cursor.position if self._cursor is not None else self._start
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "epoch": position.epoch,
            "doc": position.doc,
            "offset": position.offset,
            "examples": self._examples,
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; it must come from a loader with the same identity fields."""
        missing = [k for k in ("format", *_IDENTITY, *_POSITION) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"loader state format {state['format']!r} is not {STATE_FORMAT}")
        for key, value in self._identity().items():
            if state[key] != value:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r}, this loader has {key}={value!r}"
                )
        self._start = Position(int(state["epoch"]), int(state["doc"]), int(state["offset"]))
        self._examples = int(state["examples"])
        self._batches = int(state["batches"])
        self._cursor = None

    def _identity(self) -> dict[str, int | str]:
        cfg = self.cfg
        return {
            "objective": cfg.objective,
            "source": cfg.source,
            "seed": cfg.seed,
            "seq_len": cfg.seq_len,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "tokenizer": self.tokenizer.fingerprint,
        }


def build_dataloader(
    cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, tokenizer: TextTokenizer | None = None
) -> PretrainLoader:
    """The loader of ``cfg`` for data-parallel rank ``dp_rank`` of ``dp_size``.

    Pass ``tokenizer`` to share one across loaders; otherwise :func:`build_tokenizer` makes it.
    """
    return PretrainLoader(cfg, tokenizer if tokenizer is not None else build_tokenizer(cfg), dp_rank, dp_size)
