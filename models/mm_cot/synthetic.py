"""Offline synthetic tasks in ScienceQA's schema, and a word-level tokenizer built locally.

``image_vqa``: the question text is constant and the answer letter is the argmax of the image's
first four channels, so only the image carries the answer (fusion vs gate-0 ablation).
``shift``: the image shows one of four shapes (value a), the question names a shift b; the answer
is option (a + b) mod 4. The rationale ("Solution: the image is a star") states the shape, the
intermediate fact that direct answering has to infer silently and combine with b.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

SYNTHETIC_TASKS = ("image_vqa", "shift")
SHAPES = ("circle", "square", "triangle", "star")
SHIFTS = ("zero", "one", "two", "three")
SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0 (also decoder start), eos 1


def make_task(
    task: str, n: int, patch_shape: tuple[int, int], seed: int, signal: float = 3.0
) -> tuple[dict[str, dict], list[str], dict[str, np.ndarray]]:
    """``(problems, pids, features)`` for ``n`` problems of ``task``."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(SYNTHETIC_TASKS)}")
    m, p = patch_shape
    need = 4
    if p < need:
        raise ValueError(f"synthetic task {task!r} needs patch_shape[1] >= {need}, got {p}")
    rng = np.random.default_rng(seed)
    problems, feats = {}, {}
    for i in range(n):
        pid = f"{task}_{seed}_{i}"
        feat = rng.standard_normal((m, p)).astype(np.float32)
        if task == "image_vqa":
            answer = int(rng.integers(4))
            feat[:, answer] += signal
            choices, question = ["one", "two", "three", "four"], "Which option does the image show?"
            solution = f"the image shows option {choices[answer]}"
        else:
            shape, shift = int(rng.integers(4)), int(rng.integers(4))
            feat[:, shape] += signal
            answer = (shape + shift) % 4
            choices = ["one", "two", "three", "four"]
            question = f"Shift the image by {SHIFTS[shift]}: which option?"
            solution = f"the image is a {SHAPES[shape]}"
        problems[pid] = {
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": "",
            "image": "image.png",
            "lecture": "",
            "solution": solution,
            "subject": "natural science",
            "grade": "grade3",
        }
        feats[pid] = feat
    return problems, list(problems), feats


def word_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level T5-compatible tokenizer (pad 0, eos 1, unk 2) over the words of ``texts``;
    decoding joins words with spaces, which the answer parser tolerates ("( B )")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({w: i + len(SPECIAL) for i, w in enumerate(w for w in words if w not in vocab)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def task_texts(problems: dict[str, dict]) -> list[str]:
    """Every text the prompts can contain, for the tokenizer's vocabulary."""
    from smile.models.mm_cot.prompts import PROMPT_FORMATS, build_source, build_target, gold_rationale

    texts = ["Solution: Answer: The answer is (A) (B) (C) (D) (E). N/A"]
    for problem in problems.values():
        texts.append(build_source(problem, "QCMG-A", gold_rationale(problem, True)))
        texts += [build_target(problem, f) for f in PROMPT_FORMATS]
    return texts
