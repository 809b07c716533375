"""Prompted examples, their tokenisation with the template-token mask, and batches.

An example is ``{"task", "segments": [(text, is_template), ...], "target", "choices"}``: the
template's words and the example's content kept apart, so the collator can emit
``prompt_token_mask`` (1 on template tokens), the retrieval query's only source.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from smile.models.spt.config import DataConfig

Segments = list[tuple[str, bool]]

# ---- synthetic tasks (offline): distinct templates over the same symbol sequences -----------------
TEMPLATES = {
    "copy": "copy the sequence :",
    "reverse": "reverse the sequence :",
    "first": "name the first symbol of :",
    # held out: templates never seen in training, asking for a known skill (T0-style zero-shot)
    "first_heldout": "which symbol comes first in :",
    "copy_heldout": "copy all symbols :",
    "reverse_heldout": "reverse all symbols :",
    # the frozen backbone's pretraining (``smile zoo spt pretrain``): the same skills behind bare
    # tags, so the pretrained LM knows the skills but has never read any template above
    "copy_tag": "op1 :",
    "reverse_tag": "op2 :",
    "first_tag": "op3 :",
}


def skill(task: str) -> str:
    """The skill a synthetic task asks for: copy, reverse or first (``copy_heldout`` -> copy)."""
    return task.split("_")[0]


def _synthetic_target(task: str, seq: list[str]) -> list[str]:
    if skill(task) == "copy":
        return seq
    if skill(task) == "reverse":
        return seq[::-1]
    return seq[:1]


def synthetic_examples(task: str, count: int, cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """``count`` examples of one synthetic task; choices (for rank classification) are the
    target and three random distractors of the same length."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown synthetic task {task!r}; allowed: {', '.join(TEMPLATES)}")
    rng = random.Random(f"{task}-{seed}")
    symbols = [f"s{i}" for i in range(cfg.synthetic_symbols)]
    out = []
    for _ in range(count):
        seq = [rng.choice(symbols) for _ in range(cfg.synthetic_seq_len)]
        target = " ".join(_synthetic_target(task, seq))
        # Distractors: first the answers a model that ignores the template would also give (the
        # other tasks' answers on the same sequence: copy <-> reverse, and for "first" the other
        # positions' symbols), then random symbol strings of the target's length. With random
        # distractors alone, a model that knows the symbols but not the task (copy or reverse?)
        # still ranks the target first, so accuracy would not measure the task at all.
        confusable = [seq, seq[::-1]] if skill(task) != "first" else [[s] for s in seq[1:]]
        choices = {target} | {" ".join(c) for c in confusable}
        while len(choices) < 4:
            choices.add(" ".join(rng.choice(symbols) for _ in target.split()))
        ordered = sorted(choices)
        out.append(
            {
                "task": task,
                "segments": [(TEMPLATES[task], True), (" ".join(seq), False)],
                "target": target,
                "choices": ordered,
            }
        )
    return out


# ---- P3-style JSONL (promptsource-rendered) ----------------------------------------------------
def render(template_text: str, content: str) -> Segments:
    """Template words and content as segments: ``{input}`` in the template marks where the
    content goes; without it the content follows the template."""
    if "{input}" not in template_text:
        return [(template_text, True), (content, False)]
    before, after = template_text.split("{input}", 1)
    return [(s, t) for s, t in ((before, True), (content, False), (after, True)) if s.strip()]


def p3_examples(task: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """Rows of ``<data_dir>/<task>/<split>.jsonl`` (or the HF dataset ``task`` read with
    ``cache_dir``) with fields template_text, input, target and optional choices."""
    if cfg.data_dir is not None:
        path = Path(cfg.data_dir) / task / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"data.data_dir: no {path} (layout <data_dir>/<task>/<split>.jsonl)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset(task, split=split, cache_dir=cfg.cache_dir)]
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("template_text", "input", "target") if k not in row]
        if missing:
            raise ValueError(f"{task} {split} row {i}: fields {missing} missing (has {sorted(row)})")
        choices = row.get("choices") or row.get("answer_choices")
        out.append(
            {
                "task": task,
                "segments": render(row["template_text"], row["input"]),
                "target": row["target"],
                "choices": list(choices) if choices else None,
            }
        )
    return out


# ---- GLUE / SuperGLUE (HF datasets), rendered with one template per task -------------------------
def glue_examples(task: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """``task`` as "glue/rte" or "super_glue/cb" through the PEFT zoo method's hub loader; the
    template is T5's ("rte sentence1: … sentence2: …"): the task name and field names are the
    discrete prompt, the field values the content; the label words are the choices."""
    from smile.models.peft_design_spaces.data import DataConfig as HubData
    from smile.models.peft_design_spaces.data import load_examples

    benchmark, _, name = task.partition("/")
    hub = HubData(
        benchmark=benchmark,
        task=name,
        data_dir=None if cfg.data_dir is None else str(Path(cfg.data_dir) / benchmark),
        cache_dir=cfg.cache_dir,
    )
    hub.validate()
    spec = hub.spec
    if spec.regression:
        raise ValueError(f"{task}: regression tasks have no answer choices for rank classification")
    out = []
    for row in load_examples(hub, "train" if split == "train" else "eval"):
        segments: Segments = [(name.split(".")[0], True)]
        for f in spec.fields:
            segments += [(f"{f}:", True), (str(row[f]), False)]
        out.append(
            {
                "task": task,
                "segments": segments,
                "target": spec.labels[int(row["label"])],
                "choices": list(spec.labels),
            }
        )
    return out


def load_task(task: str, cfg: DataConfig, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """One task's examples (``split``: "train" or "eval")."""
    if cfg.source == "synthetic":
        count = cfg.synthetic_train if split == "train" else cfg.synthetic_eval
        rows = synthetic_examples(task, count, cfg, seed if split == "train" else seed + 1000)
    elif cfg.source == "p3":
        rows = p3_examples(task, cfg, "train" if split == "train" else "validation")
    else:
        rows = glue_examples(task, cfg, split)
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    return rows[:limit] if limit is not None else rows


def all_texts(rows: list[dict[str, Any]]) -> list[str]:
    """Every text a word-level tokenizer must cover."""
    return (
        [s for r in rows for s, _ in r["segments"]]
        + [r["target"] for r in rows]
        + [c for r in rows for c in (r["choices"] or [])]
    )


def word_tokenizer(texts: list[str]):
    """An offline word-level T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    from smile.models.peft_design_spaces.data import word_tokenizer as peft_word_tokenizer

    return peft_word_tokenizer(texts, "t5")


# ---- encoding and batches -------------------------------------------------------------------------
def encode(row: dict[str, Any], tokenizer, max_length: int, max_target_length: int) -> dict[str, Any]:
    """Token ids with the template-token mask (each segment tokenised on its own, then ``</s>``),
    target ids, and the tokenised choices."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_template in row["segments"]:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(is_template)] * len(piece)
    ids, mask = ids[: max_length - 1] + [tokenizer.eos_token_id], mask[: max_length - 1] + [0]

    def target(text: str) -> list[int]:
        return tokenizer(text, truncation=True, max_length=max_target_length)["input_ids"]

    return {
        "task": row["task"],
        "input_ids": ids,
        "prompt_token_mask": mask,
        "target_ids": target(row["target"]),
        "choice_ids": [target(c) for c in row["choices"]] if row["choices"] else None,
        "gold": row["choices"].index(row["target"])
        if row["choices"] and row["target"] in row["choices"]
        else -1,
    }


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``, ``attention_mask``, ``prompt_token_mask`` and ``labels`` (-100 pad)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "prompt_token_mask": pad([e["prompt_token_mask"] for e in examples], 0),
        "labels": pad([e["target_ids"] for e in examples], -100),
    }


class Batches:
    """This rank's share of a shuffled epoch (same permutation on every rank, equal counts)."""

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world, self.train, self.seed, self.epoch = rank, world, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (
            len(self.examples) // (self.batch_size * self.world)
            if self.train
            else -(-len(self.examples) // (self.batch_size * self.world))
        )

    def __iter__(self):
        order = list(range(len(self.examples)))
        if self.train:
            random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        for b in range(len(self)):
            start = (b * self.world + self.rank) * self.batch_size
            idx = order[start : start + self.batch_size] or order[: self.batch_size]
            yield collate([self.examples[i] for i in idx], self.pad_id)
