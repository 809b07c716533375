"""Corpora (an offline synthetic grammar, E2E through HF ``datasets``, ROCStories from local CSV
files), the per-rank batches the Trainer iterates, and the generation metrics.

Nothing is downloaded unless the config names a hub dataset (``data.hf_path`` without a local
``data_dir`` or cache holding it).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from smile.models.masked_diffuse_lm.vocab import Vocab, tokenize

SPLITS = ("train", "valid", "test")


# ---- the offline synthetic grammar ---------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """``det [adj] noun verb [det [adj] noun]``, every content word from one of two topics: 20
    words, in-grammar bigrams known exactly (a cross-topic pair is out of grammar)."""

    dets: tuple[str, ...] = ("the", "a")
    adjs: tuple[tuple[str, ...], ...] = (("red", "big", "old"), ("blue", "small", "new"))
    nouns: tuple[tuple[str, ...], ...] = (("cat", "dog", "bird"), ("car", "ship", "train"))
    verbs: tuple[tuple[str, ...], ...] = (("eats", "sees", "likes"), ("moves", "stops", "hits"))

    def sentence(self, rng: random.Random) -> list[str]:
        k = rng.randrange(2)
        words = [rng.choice(self.dets)] + ([rng.choice(self.adjs[k])] if rng.random() < 0.7 else [])
        words += [rng.choice(self.nouns[k]), rng.choice(self.verbs[k])]
        if rng.random() < 0.5:
            words += [rng.choice(self.dets)] + ([rng.choice(self.adjs[k])] if rng.random() < 0.5 else [])
            words.append(rng.choice(self.nouns[k]))
        return words

    def bigrams(self) -> set[tuple[str, str]]:
        allowed = set()
        for k in range(2):
            for d in self.dets:
                allowed |= {(d, a) for a in self.adjs[k]} | {(d, n) for n in self.nouns[k]}
            allowed |= {(a, n) for a in self.adjs[k] for n in self.nouns[k]}
            allowed |= {(n, v) for n in self.nouns[k] for v in self.verbs[k]}
            allowed |= {(v, d) for v in self.verbs[k] for d in self.dets}
        return allowed


def grammar_corpus(n: int, seed: int, grammar: Grammar | None = None) -> dict[str, list[list[str]]]:
    grammar = grammar or Grammar()
    rng = random.Random(seed)
    sentences = [grammar.sentence(rng) for _ in range(n)]
    cut = max(1, n // 10)
    return {
        "train": sentences[: n - 2 * cut],
        "valid": sentences[n - 2 * cut : n - cut],
        "test": sentences[n - cut :],
    }


# ---- real data ----------------------------------------------------------------------------------
def load_e2e(data_dir: str | None, hf_path: str, cache_dir: str | None) -> dict[str, list[list[str]]]:
    """E2E NLG (``human_reference`` texts) from a ``save_to_disk`` folder (``data_dir``) or through
    ``datasets.load_dataset(hf_path, cache_dir=...)`` (a hub id reads the local cache first)."""
    import datasets

    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(
                f"data.data_dir: no E2E dataset folder {data_dir} (datasets.save_to_disk layout)"
            )
        ds = datasets.load_from_disk(data_dir)
    else:
        ds = datasets.load_dataset(hf_path, cache_dir=cache_dir)
    names = {"train": "train", "valid": "validation" if "validation" in ds else "valid", "test": "test"}
    out = {}
    for split, name in names.items():
        if name not in ds:
            raise KeyError(f"E2E dataset {data_dir or hf_path} has no split {name!r}; it has {sorted(ds)}")
        if "human_reference" not in ds[name].column_names:
            raise KeyError(
                f"E2E split {name!r} has no 'human_reference' column; it has {ds[name].column_names}"
            )
        out[split] = [tokenize(text) for text in ds[name]["human_reference"]]
    return out


ROC_COLUMNS = ("sentence1", "sentence2", "sentence3", "sentence4", "sentence5")


def load_roc(data_dir: str | None, seed: int = 0) -> dict[str, list[list[str]]]:
    """ROCStories from the official CSV files (storyid, storytitle, sentence1..sentence5) in
    ``data_dir``: ``train.csv`` / ``valid.csv`` / ``test.csv`` if present, else every ``*.csv``
    split 90/5/5 by a seeded shuffle. One story (five sentences) is one sequence."""
    folder = Path(data_dir or "")
    if data_dir is None or not folder.is_dir():
        raise FileNotFoundError(f"data.data_dir: no ROCStories folder {data_dir} (official *.csv files)")

    def read(path: Path) -> list[list[str]]:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ROC_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise KeyError(
                    f"{path}: missing ROCStories columns {missing}; expected {', '.join(ROC_COLUMNS)}"
                )
            return [tokenize(" ".join(row[c] for c in ROC_COLUMNS)) for row in reader]

    if (folder / "train.csv").is_file():
        return {s: read(folder / f"{s}.csv") if (folder / f"{s}.csv").is_file() else [] for s in SPLITS}
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"data.data_dir: {folder} holds no *.csv ROCStories files")
    stories = [s for path in files for s in read(path)]
    random.Random(seed).shuffle(stories)
    cut = max(1, len(stories) // 20)
    return {"train": stories[2 * cut :], "valid": stories[:cut], "test": stories[cut : 2 * cut]}


# ---- batches ------------------------------------------------------------------------------------
class Batches:
    """Fixed-shape padded batches of one rank's share; every rank yields the same number."""

    def __init__(
        self,
        rows: list[list[int]],
        vocab: Vocab,
        batch_size: int,
        max_len: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.rows, self.vocab, self.batch_size, self.max_len = rows, vocab, batch_size, max_len
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world_size
        self.epoch = 0
        self.per_rank = len(rows) // world_size // batch_size
        if self.per_rank == 0:
            raise ValueError(
                f"{len(rows)} sentences cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        mine = order[self.rank :: self.world]
        for b in range(self.per_rank):
            chunk = [self.rows[i] for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]
            ids, mask = self.vocab.pad(chunk, self.max_len)
            yield {"input_ids": ids, "attention_mask": mask}


# ---- metrics ------------------------------------------------------------------------------------
def bigram_rate(samples: list[list[str]], allowed: set[tuple[str, str]]) -> float:
    """Share of the samples' adjacent word pairs that are allowed (in-grammar / seen in train)."""
    pairs = [(a, b) for s in samples for a, b in zip(s, s[1:])]
    return sum(p in allowed for p in pairs) / max(len(pairs), 1)


def train_bigrams(corpus: list[list[str]]) -> set[tuple[str, str]]:
    return {(a, b) for s in corpus for a, b in zip(s, s[1:])}


def distinct_n(samples: list[list[str]], n: int = 2) -> float:
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)
