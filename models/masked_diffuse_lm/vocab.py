"""Word-level vocabulary and tokenizer: diffusion runs over one embedding per word, so the unit of
noise (and of importance) is a word, as in the paper and Diffusion-LM."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

PAD, UNK = "[PAD]", "[UNK]"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (Diffusion-LM uses spaCy; a regex keeps this offline)."""
    return _WORD.findall(text.lower())


class Vocab:
    """Token <-> id. Id 0 is ``[PAD]``; ``unk`` (``[UNK]``) is optional: without it an unknown word
    is an error, not silently merged."""

    def __init__(self, tokens: Iterable[str], unk: bool = True) -> None:
        words = [t for t in tokens if t not in (PAD, UNK)]
        self.tokens = [PAD] + ([UNK] if unk else []) + list(dict.fromkeys(words))
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.unk_id = self.index.get(UNK)

    @classmethod
    def build(cls, corpus: Iterable[list[str]], min_count: int = 1, unk: bool = True) -> Vocab:
        counts = Counter(w for sentence in corpus for w in sentence)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, unk=unk)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """One token per line (``[PAD]`` / ``[UNK]`` lines are the special tokens)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab_path: no vocabulary file {path} (one token per line)")
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if line], unk=UNK in lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.tokens) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def special_ids(self) -> list[int]:
        return [0] if self.unk_id is None else [0, self.unk_id]

    def encode(self, words: list[str], max_len: int, truncate: bool = False) -> list[int]:
        """Ids of ``words``; longer than ``max_len`` is an error unless ``truncate``; an unknown
        word maps to ``[UNK]``, or raises KeyError naming it when the vocabulary has none."""
        if len(words) > max_len:
            if not truncate:
                raise ValueError(
                    f"sequence of {len(words)} tokens is longer than max_len={max_len}; "
                    "raise max_len or set truncate=true"
                )
            words = words[:max_len]
        ids = []
        for w in words:
            i = self.index.get(w, self.unk_id)
            if i is None:
                raise KeyError(f"token {w!r} is not in the vocabulary and no [UNK] is configured (unk=false)")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids if i != 0]

    def pad(self, rows: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of shape (len(rows), max_len), padded with id 0."""
        ids = torch.zeros(len(rows), max_len, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        return ids, (torch.arange(max_len)[None, :] < lengths[:, None]).long()
