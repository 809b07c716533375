"""Data for the PEFT jobs: GLUE / SuperGLUE through HF ``datasets``, an offline keyword task,
tokenisation for T5 (text-to-text) or RoBERTa (classification), and rank-sharded batches.

Real runs load ``nyu-mll/glue`` / ``aps/super_glue`` from the hub (or the HF cache), or from
``data_dir``: a local copy of the hub repository, ``<data_dir>/<task>/<split>-*.parquet``
(what ``huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir <data_dir>``
writes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from smile.models.peft_design_spaces.tasks import TaskSpec, task_spec

HUB_REPOS = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}


@dataclass
class DataConfig:
    """Which task and how it is tokenised.

    benchmark / task: e.g. glue / sst2, super_glue / boolq, or keywords / keywords and
        keywords / topics (offline, synthetic: a sentence of filler words holding one class
        keyword; the two tasks differ in their keywords).
    data_dir: local copy of the benchmark's hub repository (parquet files); None loads by hub id.
    cache_dir: HF datasets cache directory.
    max_length / max_target_length: token limits of the input and of T5's target.
    max_train_samples / max_eval_samples: subsample (first N) for quick runs.
    keywords_train / keywords_eval: sizes of the synthetic keyword task's splits.
    """

    benchmark: Literal["glue", "super_glue", "keywords"] = "glue"
    task: str = "sst2"
    data_dir: str | None = None
    cache_dir: str | None = None
    max_length: int = 128
    max_target_length: int = 8
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    keywords_train: int = 1024
    keywords_eval: int = 256

    def validate(self, where: str = "data") -> None:
        task_spec(self.benchmark, self.task)
        for name in ("max_length", "max_target_length", "keywords_train", "keywords_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def spec(self) -> TaskSpec:
        return task_spec(self.benchmark, self.task)


# ---- raw examples ---------------------------------------------------------------------------------
# The offline benchmark's two tasks: the same sentence shape, different class keywords, so the search
# can average over more than one task without any download.
KEYWORDS = {
    "keywords": {0: ("dull", "awful", "bleak", "poor"), 1: ("bright", "superb", "lovely", "great")},
    "topics": {0: ("cat", "horse", "owl", "fox"), 1: ("car", "train", "boat", "plane")},
}
FILLER = tuple(f"w{i}" for i in range(48))


def keyword_examples(count: int, seed: int, task: str = "keywords") -> list[dict[str, Any]]:
    """A balanced two-class task: 5-11 filler words with one class keyword at a random place."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 11))]
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[task][label]))
        out.append({"sentence": " ".join(words), "label": label})
    rng.shuffle(out)
    return out


def load_examples(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """Rows of one split as dicts (``split`` is "train" or "eval")."""
    spec = cfg.spec
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if spec.benchmark == "keywords":
        count = cfg.keywords_train if split == "train" else cfg.keywords_eval
        rows = keyword_examples(count, 0 if split == "train" else 1, spec.name)
    else:
        rows = _load_hf(cfg, "train" if split == "train" else spec.eval_split)
    return rows[:limit] if limit is not None else rows


def holdout_split(
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    spec: TaskSpec,
    fraction: float,
    seed: int,
    max_samples: int | None = None,
) -> tuple[list[int], list[int]]:
    """Indices of ``train_rows`` as (search-train, held-out) for the design-space search.

    The held-out part is carved from the training split with a seeded permutation (``fraction`` of
    it, at most ``max_samples``), so the search never scores on the eval split the final report
    uses. A training row whose inputs also occur in the eval split is never held out (GLUE's
    splits share some sentences), which keeps the held-out set disjoint from the eval split by
    content, not only by index.
    """
    seen_in_eval = {tuple(str(r[f]) for f in spec.fields) for r in eval_rows}
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    size = max(1, int(len(train_rows) * fraction))
    size = min(size, max_samples) if max_samples is not None else size
    held: list[int] = []
    for i in order:
        if len(held) == size:
            break
        if tuple(str(train_rows[i][f]) for f in spec.fields) not in seen_in_eval:
            held.append(i)
    if not held:
        raise ValueError(f"{spec.benchmark}/{spec.name}: every training row also occurs in the eval split")
    chosen = set(held)
    return [i for i in range(len(train_rows)) if i not in chosen], sorted(held)


def _load_hf(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    spec = cfg.spec
    if cfg.data_dir is not None:
        folder = Path(cfg.data_dir) / spec.name
        files = sorted(str(f) for f in folder.glob(f"{split}-*.parquet"))
        if not files:
            present = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
            raise FileNotFoundError(
                f"data.data_dir: no {split}-*.parquet under {folder} (found {present or 'nothing'}); "
                "expected a "
                f"local copy of the {HUB_REPOS[spec.benchmark]} dataset repository"
            )
        ds = load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cfg.cache_dir)
    else:
        ds = load_dataset(HUB_REPOS[spec.benchmark], spec.name, split=split, cache_dir=cfg.cache_dir)
    missing = [c for c in (*spec.fields, "label") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{spec.benchmark}/{spec.name} {split}: columns {missing} missing (has {ds.column_names})"
        )
    names = getattr(ds.features["label"], "names", None)
    if names is not None and tuple(names) != spec.labels:
        raise ValueError(
            f"{spec.benchmark}/{spec.name}: label names {names} differ from expected {spec.labels}"
        )
    return [dict(row) for row in ds]


# ---- tokenisation ----------------------------------------------------------------------------------
_SPECIALS = {
    "roberta": {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "cls_token": "<s>",
        "sep_token": "</s>",
    },
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def word_tokenizer(texts: list[str], family: str):
    """A word-level tokenizer over ``texts`` (for randomly initialised backbones, offline).

    Special tokens take RoBERTa's or T5's ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 / ``<pad>`` 0,
    ``</s>`` 1), so the tiny models use their families' usual configs.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[family]
    order = list(dict.fromkeys(specials.values()))
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(order))
    vocab = {tok: i for i, tok in enumerate(order + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    if family == "roberta":
        single, pair = "<s> $A </s>", "<s> $A </s> </s> $B </s>"
        special = [("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    else:
        single, pair = "$A </s>", "$A </s> $B </s>"
        special = [("</s>", vocab["</s>"])]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def encode(rows: list[dict[str, Any]], spec: TaskSpec, tokenizer, family: str, cfg: DataConfig) -> list[dict]:
    """Token ids and targets of each row (T5: target ids and the gold label; RoBERTa: the label)."""
    out = []
    for row in rows:
        label = row["label"]
        if family == "t5":
            ids = tokenizer(spec.t5_source(row), truncation=True, max_length=cfg.max_length)["input_ids"]
            target = tokenizer(spec.t5_target(label), truncation=True, max_length=cfg.max_target_length)
            out.append({"input_ids": ids, "target_ids": target["input_ids"], "label": label})
        else:
            a, b = spec.pair(row, tokenizer.sep_token)
            ids = tokenizer(a, b, truncation=True, max_length=cfg.max_length)["input_ids"]
            out.append({"input_ids": ids, "label": label})
    return out


# ---- batches -----------------------------------------------------------------------------------------
class Batches:
    """This rank's batches of one split.

    Training: a fresh shuffle per epoch (same permutation on every rank), then rank r takes every
    W-th example, and incomplete batches are dropped, so all ranks run the same number of
    forward passes (MoE layers communicate inside forward). Evaluation: every example exactly
    once; shorter shards are padded with copies flagged ``valid=False``.
    """

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.epoch = 0
        if train and len(examples) // world_size < batch_size:
            raise ValueError(
                f"{len(examples)} training examples over {world_size} ranks cannot fill one batch "
                f"of {batch_size}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[tuple[int, bool]]:
        n, w = len(self.examples), self.world_size
        if self.train:
            order = list(range(n))
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
            per_rank = (n // w) // self.batch_size * self.batch_size
            return [(i, True) for i in order[self.rank :: w][:per_rank]]
        mine = [(i, True) for i in range(self.rank, n, w)]
        return mine + [(0, False)] * (-(-n // w) - len(mine))

    def __len__(self) -> int:
        return -(-len(self._order()) // self.batch_size)

    def __iter__(self):
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield self._collate(order[start : start + self.batch_size])

    def _collate(self, chunk: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        rows = [self.examples[i] for i, _ in chunk]
        batch = {"valid": torch.tensor([v for _, v in chunk])}
        batch["input_ids"], batch["attention_mask"] = _pad([r["input_ids"] for r in rows], self.pad_id)
        if "target_ids" in rows[0]:
            batch["labels"], _ = _pad([r["target_ids"] for r in rows], -100)
            batch["gold"] = torch.tensor([float(r["label"]) for r in rows])
        else:
            label = [r["label"] for r in rows]
            batch["labels"] = torch.tensor(
                label, dtype=torch.float if isinstance(label[0], float) else torch.long
            )
        return batch


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def majority_accuracy(train_labels: list, eval_labels: list) -> float:
    """Accuracy of always predicting the most frequent training label."""
    majority = max(set(train_labels), key=train_labels.count)
    return sum(label == majority for label in eval_labels) / len(eval_labels)
