"""GLUE / SuperGLUE tasks (and two offline keyword tasks) as T5 text-to-text or RoBERTa classification.

Each task names its input columns, its label words (the ClassLabel names of the HF datasets,
which T5 generates as targets) and the metric the benchmark reports. T5 inputs follow the T5
paper's style, ``"<task> <column>: <text> <column>: <text>"``.
"""

from __future__ import annotations

from dataclasses import dataclass

BENCHMARKS: tuple[str, ...] = ("glue", "super_glue", "keywords")


@dataclass(frozen=True)
class TaskSpec:
    benchmark: str
    name: str
    fields: tuple[str, ...]
    labels: tuple[str, ...]  # label words by class id; empty for regression (STS-B)
    metric: str  # accuracy | matthews | f1 | macro_f1 | pearson
    eval_split: str = "validation"

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    def t5_source(self, example: dict) -> str:
        prefix = self.name.split(".")[0]
        return " ".join([prefix] + [f"{f}: {example[f]}" for f in self.fields])

    def t5_target(self, label: float | int) -> str:
        if self.regression:
            return f"{round(float(label) * 5) / 5:.1f}"  # STS-B in steps of 0.2, as in T5
        return self.labels[int(label)]

    def pair(self, example: dict, sep: str) -> tuple[str, str | None]:
        """RoBERTa input: the first column, and the others joined by the separator token."""
        rest = [str(example[f]) for f in self.fields[1:]]
        return str(example[self.fields[0]]), (f" {sep} ".join(rest) if rest else None)


_ENT2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")
TASKS: dict[tuple[str, str], TaskSpec] = {
    (t.benchmark, t.name): t
    for t in (
        TaskSpec("glue", "cola", ("sentence",), ("unacceptable", "acceptable"), "matthews"),
        TaskSpec("glue", "sst2", ("sentence",), ("negative", "positive"), "accuracy"),
        TaskSpec("glue", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
        TaskSpec("glue", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
        TaskSpec("glue", "stsb", ("sentence1", "sentence2"), (), "pearson"),
        TaskSpec(
            "glue",
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            eval_split="validation_matched",
        ),
        TaskSpec("glue", "qnli", ("question", "sentence"), _ENT2, "accuracy"),
        TaskSpec("glue", "rte", ("sentence1", "sentence2"), _ENT2, "accuracy"),
        TaskSpec("glue", "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy"),
        TaskSpec("super_glue", "boolq", ("question", "passage"), _BOOL, "accuracy"),
        TaskSpec(
            "super_glue",
            "cb",
            ("premise", "hypothesis"),
            ("entailment", "contradiction", "neutral"),
            "macro_f1",
        ),
        TaskSpec(
            "super_glue",
            "copa",
            ("premise", "question", "choice1", "choice2"),
            ("choice1", "choice2"),
            "accuracy",
        ),
        TaskSpec("super_glue", "multirc", ("paragraph", "question", "answer"), _BOOL, "f1"),
        TaskSpec("super_glue", "rte", ("premise", "hypothesis"), _ENT2, "accuracy"),
        TaskSpec("super_glue", "wic", ("word", "sentence1", "sentence2"), _BOOL, "accuracy"),
        TaskSpec("super_glue", "wsc.fixed", ("text", "span1_text", "span2_text"), _BOOL, "accuracy"),
        TaskSpec("keywords", "keywords", ("sentence",), ("negative", "positive"), "accuracy"),
        TaskSpec("keywords", "topics", ("sentence",), ("animal", "vehicle"), "accuracy"),
    )
}


def task_spec(benchmark: str, name: str) -> TaskSpec:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"data.benchmark={benchmark!r} unknown; allowed: {', '.join(BENCHMARKS)}")
    spec = TASKS.get((benchmark, name))
    if spec is None:
        allowed = sorted(n for b, n in TASKS if b == benchmark)
        raise ValueError(
            f"data.task={name!r} is not a supported {benchmark} task; allowed: {', '.join(allowed)}"
        )
    return spec
