"""Prompt formats, the answer parser and ScienceQA's per-category accuracy (after the official
``utils_prompt.py`` / ``utils_evaluate.py``).

A format is ``<input>-<output>``: Q question, C context, M options, G a generated rationale; the
output A answer, E rationale ("Solution: ..."), LE lecture + solution. Stage 1 is QCM-E (or
QCM-LE), stage 2 QCMG-A; QCM-A is direct answering without a rationale (the paper's baseline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

OPTIONS = "ABCDE"
FAILED = "FAILED"
STAGE_FORMATS = {"rationale": ("QCM-E", "QCM-LE"), "answer": ("QCMG-A", "QCM-A")}
PROMPT_FORMATS = tuple(f for formats in STAGE_FORMATS.values() for f in formats)
_ANSWER = re.compile(r"The answer is \(\s*([A-Z])\s*\)")


def check_prompt_format(prompt_format: str, stage: str | None = None) -> None:
    allowed = STAGE_FORMATS[stage] if stage in STAGE_FORMATS else PROMPT_FORMATS
    if prompt_format not in allowed:
        where = f" for stage {stage!r}" if stage else ""
        raise ValueError(f"unknown prompt_format {prompt_format!r}{where}; valid: {', '.join(allowed)}")


def context_text(problem: Mapping[str, Any], use_caption: bool = False) -> str:
    text = " ".join(
        [problem.get("hint") or "", (problem.get("caption") or "") if use_caption else ""]
    ).strip()
    return text or "N/A"


def choice_text(problem: Mapping[str, Any]) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))


def answer_letter(problem: Mapping[str, Any]) -> str:
    return OPTIONS[int(problem["answer"])]


def gold_rationale(problem: Mapping[str, Any], with_lecture: bool = False) -> str:
    """The stage-1 target; also stage 2's rationale while training (the official code trains
    stage 2 on gold rationales and evaluates it on generated ones)."""
    solution = (problem.get("solution") or "").replace("\n", "\\n")
    if with_lecture:
        lecture = (problem.get("lecture") or "").replace("\n", "\\n")
        return f"Solution: {lecture} {solution}.".replace("  ", " ")
    return f"Solution: {solution}"


def build_source(
    problem: Mapping[str, Any], prompt_format: str, rationale: str | None = None, use_caption: bool = False
) -> str:
    """The model input; for QCMG the rationale text is appended verbatim."""
    check_prompt_format(prompt_format)
    source = (
        f"Question: {problem['question']}\nContext: {context_text(problem, use_caption)}\n"
        f"Options: {choice_text(problem)}\n"
    )
    if prompt_format.startswith("QCMG"):
        if rationale is None:
            raise ValueError("prompt_format QCMG-A needs a rationale for every example")
        source += f"{rationale}\n"
    return source.strip()


def build_target(problem: Mapping[str, Any], prompt_format: str) -> str:
    output = prompt_format.split("-")[1]
    if output == "A":
        return f"Answer: The answer is ({answer_letter(problem)})."
    return gold_rationale(problem, with_lecture=output == "LE")


def extract_answer(text: str) -> str:
    """The letter in "The answer is (X)" (exactly one such phrase), else FAILED (counted wrong)."""
    found = _ANSWER.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _grade(problem: Mapping[str, Any]) -> int | None:
    digits = re.sub(r"\D", "", str(problem.get("grade", "")))
    return int(digits) if digits else None


def categories(problem: Mapping[str, Any]) -> list[str]:
    """The ScienceQA columns this problem counts in: subject, context modality, grade band."""
    subject = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
    cats = [subject[problem["subject"]]] if problem.get("subject") in subject else []
    hint, image = bool(problem.get("hint")), bool(problem.get("image"))
    cats += ["TXT"] * hint + ["IMG"] * image + ["NO"] * (not hint and not image)
    grade = _grade(problem)
    if grade is not None:
        cats.append("G1-6" if grade <= 6 else "G7-12")
    return cats


SCIENCEQA_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def category_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy (%) per ScienceQA column and on average from records with ``correct`` and
    ``categories``; columns with no example are left out."""
    out: dict[str, float] = {}
    for col in SCIENCEQA_COLUMNS:
        hits = [r["correct"] for r in records if col in r.get("categories", ())]
        if hits:
            out[f"acc_{col}"] = 100.0 * sum(hits) / len(hits)
    if records:
        out["acc"] = 100.0 * sum(r["correct"] for r in records) / len(records)
    return out
