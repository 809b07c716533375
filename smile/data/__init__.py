"""Corpora, tokenizers and resumable per-rank loaders for MoE pretraining (causal LM, T5 span corruption).

Typical use::

    cfg = DataConfig(source="embedded", objective="span_corruption", seq_len=512, batch_size=8)
    loader = build_dataloader(cfg, dp_rank, dp_size)
    batch = next(loader)               # dict of LongTensors
    state = loader.state_dict()        # save with the checkpoint; later: loader.load_state_dict(state)
"""

from smile.data.config import DataConfig, DataConfigError
from smile.data.loader import PretrainLoader, build_dataloader
from smile.data.objectives import compute_input_and_target_lengths, random_spans_noise_mask, span_corrupt
from smile.data.sources import DocumentSource, ListSource, StreamSource, open_source
from smile.data.tokenizer import TextTokenizer, build_tokenizer

__all__ = [
    "DataConfig",
    "DataConfigError",
    "DocumentSource",
    "ListSource",
    "PretrainLoader",
    "StreamSource",
    "TextTokenizer",
    "build_dataloader",
    "build_tokenizer",
    "compute_input_and_target_lengths",
    "open_source",
    "random_spans_noise_mask",
    "span_corrupt",
]
