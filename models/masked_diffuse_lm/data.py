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
POS_TAGS = ("DET", "ADJ", "NOUN", "VERB")  # the grammar's parts of speech, in tie-break order
SPAN_LABELS = ("S", "NP", "VP")  # its phrase labels
UNKNOWN_TAG = "X"  # a word outside the lexicon ([UNK], [PAD])
Span = tuple[int, int, str]  # (first, last, label): word positions 0-based, both inclusive


@dataclass(frozen=True)
class Parse:
    """A sentence's parts of speech and its constituents ``(first, last, label)``."""

    tags: tuple[str, ...]
    spans: frozenset[Span]


@dataclass(frozen=True)
class Grammar:
    """``S -> NP VP; NP -> det [adj] noun; VP -> verb [NP]``, every content word of a sentence from
    one of two topics: 20 words, in-grammar bigrams known exactly (a cross-topic pair is out of
    grammar). The grammar is unambiguous: a sentence has at most one parse (tested)."""

    dets: tuple[str, ...] = ("the", "a")
    adjs: tuple[tuple[str, ...], ...] = (("red", "big", "old"), ("blue", "small", "new"))
    nouns: tuple[tuple[str, ...], ...] = (("cat", "dog", "bird"), ("car", "ship", "train"))
    verbs: tuple[tuple[str, ...], ...] = (("eats", "sees", "likes"), ("moves", "stops", "hits"))

    def derive(self, rng: random.Random) -> tuple[list[str], Parse]:
        """One sentence and its gold derivation (the tags and phrases the generator chose)."""
        k = rng.randrange(2)
        subject = [("DET", rng.choice(self.dets))] + (
            [("ADJ", rng.choice(self.adjs[k]))] if rng.random() < 0.7 else []
        )
        subject.append(("NOUN", rng.choice(self.nouns[k])))
        tagged = subject + [("VERB", rng.choice(self.verbs[k]))]
        if rng.random() < 0.5:
            tagged += [("DET", rng.choice(self.dets))] + (
                [("ADJ", rng.choice(self.adjs[k]))] if rng.random() < 0.5 else []
            )
            tagged.append(("NOUN", rng.choice(self.nouns[k])))
        return [w for _, w in tagged], _tree([t for t, _ in tagged], len(subject))

    def sentence(self, rng: random.Random) -> list[str]:
        return self.derive(rng)[0]

    def bigrams(self) -> set[tuple[str, str]]:
        allowed = set()
        for k in range(2):
            for d in self.dets:
                allowed |= {(d, a) for a in self.adjs[k]} | {(d, n) for n in self.nouns[k]}
            allowed |= {(a, n) for a in self.adjs[k] for n in self.nouns[k]}
            allowed |= {(n, v) for n in self.nouns[k] for v in self.verbs[k]}
            allowed |= {(v, d) for v in self.verbs[k] for d in self.dets}
        return allowed

    def _categories(self, k: int) -> dict[str, set[str]]:
        """The words each part of speech may take in a sentence of topic ``k``."""
        return {"DET": set(self.dets), "ADJ": set(self.adjs[k]), "NOUN": set(self.nouns[k]),
                "VERB": set(self.verbs[k])}  # fmt: skip

    def lexicon(self) -> dict[str, str]:
        """word -> part of speech. A word listed under several parts of speech gets the first of
        them in ``POS_TAGS`` order (DET, ADJ, NOUN, VERB), so tagging is deterministic; the default
        grammar has no such word (its four word lists are disjoint)."""
        lexicon: dict[str, str] = {}
        for tag in POS_TAGS:
            for k in range(len(self.nouns)):
                for word in sorted(self._categories(k)[tag]):
                    lexicon.setdefault(word, tag)
        return lexicon

    def tag(self, words: list[str]) -> list[str]:
        """Each word's part of speech by the lexicon; ``X`` outside it."""
        lexicon = self.lexicon()
        return [lexicon.get(w, UNKNOWN_TAG) for w in words]

    def parses(self, words: list[str]) -> list[Parse]:
        """Every parse of ``words`` (the recogniser: empty when the sentence is out of grammar),
        in a fixed order: topic, then a subject with an adjective before one without."""
        n, found = len(words), []
        for k in range(len(self.nouns)):
            cat = self._categories(k)
            for subject in (["DET", "ADJ", "NOUN"], ["DET", "NOUN"]):
                rest = n - len(subject) - 1
                objects = [[]] if rest == 0 else [o for o in (["DET", "ADJ", "NOUN"], ["DET", "NOUN"])
                                                  if len(o) == rest]  # fmt: skip
                for obj in objects:
                    tags = subject + ["VERB"] + obj
                    if all(w in cat[tag] for w, tag in zip(words, tags, strict=True)):
                        found.append(_tree(tags, len(subject)))
        return found

    def parse(self, words: list[str]) -> Parse | None:
        """The parse of ``words`` by the grammar's own recogniser, or None if out of grammar."""
        found = self.parses(words)
        return found[0] if found else None


def _tree(tags: list[str], subject_len: int) -> Parse:
    """The constituents of ``NP(subject) VP(verb [NP(object)])`` over ``tags``."""
    last, verb = len(tags) - 1, subject_len
    spans = {(0, last, "S"), (0, subject_len - 1, "NP"), (verb, last, "VP")}
    if last > verb:
        spans.add((verb + 1, last, "NP"))
    return Parse(tuple(tags), frozenset(spans))


def grammar_treebank(
    n: int, seed: int, grammar: Grammar | None = None
) -> dict[str, list[tuple[list[str], Parse]]]:
    """``grammar_corpus`` with each sentence's gold derivation: split -> [(words, parse)]."""
    grammar = grammar or Grammar()
    rng = random.Random(seed)
    derived = [grammar.derive(rng) for _ in range(n)]
    cut = max(1, n // 10)
    return {
        "train": derived[: n - 2 * cut],
        "valid": derived[n - 2 * cut : n - cut],
        "test": derived[n - cut :],
    }


def grammar_corpus(n: int, seed: int, grammar: Grammar | None = None) -> dict[str, list[list[str]]]:
    return {split: [words for words, _ in rows] for split, rows in grammar_treebank(n, seed, grammar).items()}


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
    """Fixed-shape padded batches of one rank's share; every rank yields the same number.
    ``with_rows`` adds ``rows``, the batch's indices into ``rows`` (to look up per-sentence
    annotations, which do not fit a fixed-shape tensor)."""

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
        with_rows: bool = False,
    ) -> None:
        self.with_rows = with_rows
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
            index = mine[b * self.batch_size : (b + 1) * self.batch_size]
            ids, mask = self.vocab.pad([self.rows[i] for i in index], self.max_len)
            batch = {"input_ids": ids, "attention_mask": mask}
            yield {**batch, "rows": torch.tensor(index)} if self.with_rows else batch


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
