"""Rows of a table -> model batches, with statistics fitted on the train split.

Tabular: numerical columns standardised with the train mean/std (missing -> the mean);
categorical values coded 1..K by their sorted train values (0: missing or unseen). Text:
the encoder's columns joined with the tokenizer's separator, tokenized and padded per batch.
Images: the first image of the cell (a path, an array, a PIL image or HF's encoded dict),
through the backbone's image processor. Labels: the sorted distinct train labels -> 0..C-1.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smile.models.lemda.config import EncoderConfig
from smile.models.lemda.data import Table, as_float
from smile.models.lemda.model import LABEL


def _label_key(value: Any) -> Any:
    """Labels that all read as integers are integers (so "10" sorts after "9")."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def load_tokenizer(cfg: EncoderConfig):
    """A transformers tokenizer from the backbone's directory, a tokenizer dir, or a tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise ValueError(f"encoder {cfg.name!r}: no tokenizer (set tokenizer or path)")
    if Path(source).is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token is None:
        raise ValueError(f"encoder {cfg.name!r}: the tokenizer at {source} has no pad token")
    return tokenizer


def load_image_processor(cfg: EncoderConfig):
    """The backbone's own processor (local directory), else resize + normalise to its image_size."""
    import transformers

    if cfg.path is not None and (Path(cfg.path) / "preprocessor_config.json").is_file():
        return transformers.AutoImageProcessor.from_pretrained(cfg.path, local_files_only=True)
    size = int(cfg.hf_config.get("image_size", 224))
    # The PIL/numpy processor (transformers >= 5 names it ViTImageProcessorPil) needs no torchvision.
    processor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return processor(size={"height": size, "width": size})


class Featurizer:
    """Builds batches ``{encoder name: inputs, "label": (B,) long}`` from table rows."""

    def __init__(
        self, encoders: list[EncoderConfig], train: Table, label: str, image_root: Path | None
    ) -> None:
        self.encoders, self.label, self.image_root = encoders, label, image_root
        values = [_label_key(v) for v in train.column(label) if v is not None]
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            raise ValueError(f"label column {label!r} mixes value types {sorted(k.__name__ for k in kinds)}")
        self.classes = sorted(set(values))
        if len(self.classes) < 2:
            raise ValueError(
                f"label column {label!r} has {len(self.classes)} distinct value(s) in the train split"
            )
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.vocab: dict[str, list[dict[str, int]]] = {}
        self.tokenizers: dict[str, Any] = {}
        self.processors: dict[str, Any] = {}
        for enc in encoders:
            for column in enc.columns + enc.numerical + enc.categorical:
                if column not in train.columns:
                    raise KeyError(
                        f"encoder {enc.name!r}: the train split has no column {column!r}; "
                        f"columns: {train.columns}"
                    )
            if enc.kind == "tabular":
                self._fit_tabular(enc, train)
            elif enc.kind == "text":
                self.tokenizers[enc.name] = load_tokenizer(enc)
            else:
                self.processors[enc.name] = load_image_processor(enc)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def cardinalities(self, name: str) -> list[int]:
        """Code counts (including 0 for unknown) of a tabular encoder's categorical columns."""
        return [len(v) + 1 for v in self.vocab.get(name, [])]

    def _fit_tabular(self, enc: EncoderConfig, train: Table) -> None:
        if enc.numerical:
            x = np.array([[as_float(v) for v in train.column(c)] for c in enc.numerical], dtype=np.float64).T
            mean = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
            std = np.nanstd(x, axis=0) if len(x) else np.ones(x.shape[1])
            mean = np.where(np.isnan(mean), 0.0, mean)
            std = np.where(np.isnan(std) | (std < 1e-12), 1.0, std)
            self.stats[enc.name] = (mean, std)
        self.vocab[enc.name] = [
            {v: i + 1 for i, v in enumerate(sorted({str(x) for x in train.column(c) if x is not None}))}
            for c in enc.categorical
        ]

    # ---- batches ---------------------------------------------------------------------------
    def __call__(self, rows: dict[str, list[Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for enc in self.encoders:
            if enc.kind == "tabular":
                batch[enc.name] = self._tabular(enc, rows)
            elif enc.kind == "text":
                batch[enc.name] = self._text(enc, rows)
            else:
                batch[enc.name] = self._image(enc, rows)
        batch[LABEL] = self.encode_labels(rows[self.label])
        return batch

    def encode_labels(self, values: list[Any]) -> torch.Tensor:
        out = []
        for value in values:
            key = _label_key(value)
            if key not in self._class_index:
                raise ValueError(f"label {value!r} is not a train-split class; classes: {self.classes}")
            out.append(self._class_index[key])
        return torch.tensor(out, dtype=torch.long)

    def _tabular(self, enc: EncoderConfig, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {}
        if enc.numerical:
            mean, std = self.stats[enc.name]
            x = np.array([[as_float(v) for v in rows[c]] for c in enc.numerical], dtype=np.float64).T
            x = np.where(np.isnan(x), mean, x)
            inputs["numerical"] = torch.from_numpy((x - mean) / std).float()
        if enc.categorical:
            codes = [
                [vocab.get(str(v), 0) if v is not None else 0 for v in rows[c]]
                for c, vocab in zip(enc.categorical, self.vocab[enc.name])
            ]
            inputs["categorical"] = torch.tensor(codes, dtype=torch.long).T.contiguous()
        return inputs

    def _text(self, enc: EncoderConfig, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizers[enc.name]
        sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
        texts = [
            sep.join("" if _missing(v) else str(v) for v in values)
            for values in zip(*(rows[c] for c in enc.columns))
        ]
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt"
        )
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _image(self, enc: EncoderConfig, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [self._open_image(v) for v in rows[enc.columns[0]]]
        pixels = self.processors[enc.name](images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    def _open_image(self, value: Any):
        from PIL import Image

        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (dict, str)):
            path = Path((value.get("path") if isinstance(value, dict) else value).split(";")[0])
            if not path.is_absolute() and self.image_root is not None:
                path = self.image_root / path
            if not path.is_file():
                raise FileNotFoundError(f"image file {str(path)!r} does not exist")
            image = Image.open(path)
        else:
            raise ValueError(f"cannot read an image from a {type(value).__name__} cell ({value!r})")
        return image.convert("RGB")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
