"""ScienceQA-style problems, image features, tokenisation and per-rank batches.

Every source yields the same thing: ``{pid: problem}`` (ScienceQA's problems.json schema:
question, choices, answer index, hint, image, lecture, solution, subject, grade) plus a split's pid
list, and image features as ``<features_dir>/<pid>.npy`` arrays of shape (m, p). Problems without
an image get an all-zero (patch_shape) matrix, as in the paper.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smile.models.mm_cot.prompts import build_source, build_target, categories

HF_SPLITS = {"train": "train", "val": "validation", "minival": "validation", "test": "test"}


# ---- sources -------------------------------------------------------------------------------------
def load_local_scienceqa(root: str | Path, split: str) -> tuple[dict[str, dict], list[str]]:
    """``root/problems.json`` + ``root/pid_splits.json`` (the official ScienceQA release layout)."""
    root = Path(root)
    for name in ("problems.json", "pid_splits.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"ScienceQA: {root / name} not found (need problems.json and pid_splits.json)"
            )
    problems = json.loads((root / "problems.json").read_text())
    splits = json.loads((root / "pid_splits.json").read_text())
    if split not in splits:
        raise ValueError(
            f"ScienceQA split {split!r} not in {root / 'pid_splits.json'}; have: {', '.join(splits)}"
        )
    missing = [pid for pid in splits[split] if pid not in problems]
    if missing:
        raise ValueError(
            f"ScienceQA: {len(missing)} pids of split {split!r} missing from problems.json, e.g. {missing[0]}"
        )
    return problems, [str(pid) for pid in splits[split]]


def load_hf_scienceqa(
    path: str, split: str, cache_dir: str | None = None
) -> tuple[dict[str, dict], list[str]]:
    """A HF ``datasets`` copy (derek-thomas/ScienceQA schema); pids are ``<split>_<row>``."""
    import datasets

    rows = datasets.load_dataset(path, split=HF_SPLITS.get(split, split), cache_dir=cache_dir)
    problems = {}
    for i, row in enumerate(rows):
        problem = {k: row[k] for k in row if k != "image"}
        problem["image"] = "image.png" if row.get("image") is not None else None
        problems[f"{split}_{i}"] = problem
    return problems, list(problems)


def load_features(
    pids: Sequence[str],
    problems: Mapping[str, Mapping],
    features_dir: str | Path | None,
    patch_shape: tuple[int, int],
) -> dict[str, np.ndarray]:
    """``<features_dir>/<pid>.npy`` for problems with an image, zeros for the others."""
    feats = {}
    for pid in pids:
        if not problems[pid].get("image"):
            feats[pid] = np.zeros(patch_shape, dtype=np.float32)
            continue
        if features_dir is None:
            raise FileNotFoundError(f"problem {pid} has an image but data.features_dir is not set")
        path = Path(features_dir) / f"{pid}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"image features {path} not found (run `smile zoo mm_cot extract`)")
        array = np.load(path).astype(np.float32)
        if array.ndim != 2 or array.shape[1] != patch_shape[1]:
            raise ValueError(
                f"image features {path}: feature dim {array.shape[-1]} != patch_shape[1] {patch_shape[1]} "
                f"(shape {array.shape}, patch_shape {tuple(patch_shape)})"
            )
        feats[pid] = array
    return feats


def read_rationales(path: str | Path) -> dict[str, str]:
    """Stage-1 predictions ``{pid: rationale}``, written by the rationale stage's eval."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"rationale file {path} not found: run `smile zoo mm_cot eval --stage rationale` first"
        )
    return {str(k): v for k, v in json.loads(path.read_text())["preds"].items()}


def write_rationales(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"preds": {r["id"]: r["prediction"] for r in records}}, indent=1))
    return path


# ---- examples and batches ----------------------------------------------------------------------
@dataclass
class Example:
    pid: str
    input_ids: list[int]
    labels: list[int]
    feats: np.ndarray
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)


def make_examples(
    problems: Mapping[str, Mapping],
    pids: Sequence[str],
    feats: Mapping[str, np.ndarray],
    tokenizer: Any,
    prompt_format: str,
    input_len: int,
    output_len: int,
    rationales: Mapping[str, str] | None = None,
    use_caption: bool = False,
) -> list[Example]:
    """Tokenised examples; inputs longer than ``input_len`` are truncated with one warning."""
    from smile.models.mm_cot.prompts import answer_letter, gold_rationale

    examples, cut = [], 0
    for pid in pids:
        problem = problems[pid]
        rationale = None
        if prompt_format.startswith("QCMG"):  # generated rationale if given, else the gold one (training)
            rationale = (
                rationales[pid]
                if rationales is not None
                else gold_rationale(problem, bool(problem.get("lecture")))
            )
        source = build_source(problem, prompt_format, rationale, use_caption)
        target = build_target(problem, prompt_format)
        ids = tokenizer(source, truncation=False)["input_ids"]
        if len(ids) > input_len:
            cut += 1
            ids = ids[: input_len - 1] + [tokenizer.eos_token_id]
        labels = tokenizer(target, truncation=True, max_length=output_len)["input_ids"]
        reference = answer_letter(problem) if prompt_format.endswith("-A") else target
        meta = {"categories": categories(problem), "source": source}
        examples.append(Example(pid, ids, labels, feats[pid], reference, meta))
    if cut:
        warnings.warn(
            f"mm_cot: {cut} of {len(pids)} inputs longer than input_len={input_len} were truncated",
            stacklevel=2,
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    n, t = len(examples), max(len(e.input_ids) for e in examples)
    lt = max(len(e.labels) for e in examples)
    m = max(e.feats.shape[0] for e in examples)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, lt), -100, dtype=torch.long)
    feats = torch.zeros((n, m, examples[0].feats.shape[1]), dtype=torch.float32)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        feats[i, : e.feats.shape[0]] = torch.from_numpy(e.feats)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "image_feats": feats,
        "ids": [e.pid for e in examples],
        "references": [e.reference for e in examples],
        "meta": [e.meta for e in examples],
    }


class Batches:
    """This rank's batches: every rank gets the same number (the runtime requires it); training
    reshuffles each epoch (``set_epoch``) and drops the ragged tail; eval keeps every example,
    repeating a few to even the ranks out (generation records are deduplicated by pid)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        *,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.rank, self.world, self.train, self.seed, self.epoch = rank, world, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        n = len(self.examples)
        if self.train:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            ).tolist()
            per_rank = (n // (self.world * self.batch_size)) * self.batch_size
            if per_rank == 0:
                raise ValueError(
                    f"mm_cot: {n} training examples are fewer than one batch per rank "
                    f"({self.batch_size} x {self.world} ranks)"
                )
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_rank = -(-n // self.world)  # repeat the first examples so every rank has as many
        return [(self.rank + self.world * i) % n for i in range(per_rank)]

    def __len__(self) -> int:
        return -(-len(self._indices()) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        idx = self._indices()
        for i in range(0, len(idx), self.batch_size):
            yield collate([self.examples[j] for j in idx[i : i + self.batch_size]], self.pad_id)
