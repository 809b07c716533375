"""The study's tasks: per dataset its category, source, prompt template, triggers, parser, metric
and label space, in one registry (``TASKS``).

Prompts follow Kojima et al.'s zero-shot(-CoT) protocol, which the study uses for reasoning and
applies to every category here: ``template`` renders "Q: <input>\nA:"; zero-shot appends the
answer trigger without "Therefore, " ("The answer (arabic numerals) is"); zero-shot-CoT appends
``cot_trigger``, generates the reasoning, then appends it and ``answer_trigger``
("Therefore, the answer (arabic numerals) is") for the answer (see ``evaluate.py``).

The study's 20 datasets, as read here (the spec lists 18 and LogiQA; the paper's dataset table was
not available to verify): arithmetic MultiArith, GSM8K, AddSub, AQuA, SingleEq, SVAMP;
commonsense CSQA, StrategyQA, COPA; symbolic Last Letter Concatenation, Coin Flip; logical Date
Understanding, Tracking Shuffled Objects; NLI RTE, CB; QA BoolQ; dialogue MuTual; summarisation
SAMSum; NER CoNLL03; sentiment SST-2. LogiQA is registered too, outside ``PAPER_TASKS``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smile.models.zeroshot_eval import metrics as metrics_module
from smile.models.zeroshot_eval import parsers
from smile.models.zeroshot_eval.parsers import Parser

COT_TRIGGER = "Let's think step by step."
Row = dict[str, Any]


@dataclass(frozen=True)
class HFSource:
    """A HF ``datasets`` dataset, read from the local cache only (never downloaded here)."""

    path: str
    name: str | None = None
    split: str = "test"


@dataclass(frozen=True)
class Task:
    """One dataset of the study.

    ``local``: file names under the user's ``data_dir`` (tried first: the dataset's own release
    format, or ``<task>.jsonl`` with the HF columns); ``hf``: the HF dataset otherwise (None: local
    only). ``convert(row) -> (input text, gold target)``. ``label_space``: the allowed targets of
    a classification task (empty for open answers).
    """

    name: str
    category: str
    convert: Callable[[Row], tuple[str, Any]]
    answer_trigger: str
    parser: Parser
    metric: str = "accuracy"
    label_space: tuple[str, ...] = ()
    instruction: str = ""
    hf: HFSource | None = None
    local: tuple[str, ...] = ()
    cot_trigger: str = COT_TRIGGER
    paper: bool = True

    @property
    def zs_trigger(self) -> str:
        """Kojima's zero-shot answer trigger: the CoT one without "Therefore, "."""
        trigger = self.answer_trigger.removeprefix("Therefore, ")
        return trigger[:1].upper() + trigger[1:]

    def template(self, text: str) -> str:
        """The prompt before any trigger: optional instruction, "Q: <input>", "A:"."""
        head = f"{self.instruction}\n" if self.instruction else ""
        return f"{head}Q: {text}\nA:"

    def local_files(self) -> tuple[str, ...]:
        return (*self.local, f"{self.name}.jsonl", f"{self.name}.json")


# ---- row converters -----------------------------------------------------------------------------------
def _choices(letters: str, options: Sequence[str]) -> str:
    return "Answer Choices: " + " ".join(f"({k}) {o}" for k, o in zip(letters, options))


def _num(value: Any) -> float:
    return float(str(value).replace(",", ""))


def _arith(row: Row) -> tuple[str, Any]:  # MultiArith, AddSub, SingleEq (Kojima's JSON)
    return row["sQuestion"].strip(), _num(row["lSolutions"][0])


def _gsm8k(row: Row) -> tuple[str, Any]:
    return row["question"].strip(), _num(row["answer"].split("####")[-1].strip())


def _svamp(row: Row) -> tuple[str, Any]:
    body = row["Body"].strip()
    return f"{body}{'' if body.endswith('.') else '.'} {row['Question'].strip()}", _num(row["Answer"])


def _aqua(row: Row) -> tuple[str, Any]:
    options = [re.sub(r"^[A-E]\)", "", o).strip() for o in row["options"]]
    return f"{row['question'].strip()} {_choices('ABCDE', options)}", row["correct"]


def _csqa(row: Row) -> tuple[str, Any]:
    return f"{row['question'].strip()} {_choices('ABCDE', row['choices']['text'])}", row["answerKey"]


def _bigbench_choice(row: Row) -> tuple[str, Any]:  # Date Understanding, Tracking Shuffled Objects
    options, scores = list(row["target_scores"]), list(row["target_scores"].values())
    letters = "ABCDEFG"[: len(options)]
    return f"{row['input'].strip()} {_choices(letters, options)}", letters[scores.index(1)]


def _strategyqa(row: Row) -> tuple[str, Any]:  # BIG-bench task.json, or HF rows with a bool answer
    if "target_scores" in row:
        return row["input"].strip(), "yes" if row["target_scores"].get("Yes") == 1 else "no"
    return row["question"].strip(), "yes" if row["answer"] else "no"


def _qa(row: Row) -> tuple[str, Any]:  # Last Letters, Coin Flip (Kojima's JSON)
    answer = str(row["answer"]).strip()
    return row["question"].strip(), answer.lower() if answer.lower() in ("yes", "no") else answer


def _copa(row: Row) -> tuple[str, Any]:
    ask = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    text = f"{row['premise'].strip()} {ask} {_choices('AB', [row['choice1'], row['choice2']])}"
    return text, "AB"[row["label"]]


def _logiqa(row: Row) -> tuple[str, Any]:
    text = f"{row['context'].strip()} {row['query'].strip()} {_choices('ABCD', row['options'])}"
    return text, "ABCD"[row["correct_option"]]


RTE_LABELS = ("entailment", "not_entailment")
CB_LABELS = ("entailment", "contradiction", "neutral")


def _nli(labels: tuple[str, ...]) -> Callable[[Row], tuple[str, Any]]:
    def convert(row: Row) -> tuple[str, Any]:
        text = f"Premise: {row['premise'].strip()} Hypothesis: {row['hypothesis'].strip()}"
        return text, labels[row["label"]]

    return convert


def _boolq(row: Row) -> tuple[str, Any]:
    text = f"Passage: {row['passage'].strip()} Question: {row['question'].strip()}?"
    return text, "yes" if row["label"] else "no"


def _mutual(row: Row) -> tuple[str, Any]:
    return f"Dialogue: {row['article'].strip()} {_choices('ABCD', row['options'])}", row["answers"]


def _samsum(row: Row) -> tuple[str, Any]:
    return f"Dialogue: {row['dialogue'].strip()}", row["summary"].strip()


CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def bio_entities(tokens: Sequence[str], tags: Sequence[int | str]) -> list[list[str]]:
    """BIO tags (CoNLL03's ids or strings) -> sorted [TYPE, span] entities."""
    entities, kind, span = set(), None, []
    for token, tag in [*zip(tokens, tags), ("", "O")]:
        tag = CONLL_TAGS[tag] if isinstance(tag, int) else tag
        if tag.startswith("I-") and kind == tag[2:]:
            span.append(token)
            continue
        if kind:
            entities.add((kind, " ".join(span)))
        kind, span = (tag[2:], [token]) if tag != "O" else (None, [])
    return sorted([k, s] for k, s in entities)


def _conll(row: Row) -> tuple[str, Any]:
    return f"Sentence: {' '.join(row['tokens'])}", bio_entities(row["tokens"], row["ner_tags"])


def _sst2(row: Row) -> tuple[str, Any]:
    return f"Sentence: {row['sentence'].strip()}", ("negative", "positive")[row["label"]]


# ---- the registry ----------------------------------------------------------------------------------
NUMERALS = "Therefore, the answer (arabic numerals) is"
YES_NO = "Therefore, the answer (Yes or No) is"


def _among(letters: str) -> str:
    return f"Therefore, among A through {letters[-1]}, the answer is"


def _labels(*labels: str, **aliases: str) -> Parser:
    words = {label: label for label in labels}
    words.update({k.replace("_", " "): v for k, v in aliases.items()})
    return parsers.label_parser(words)


def _task(name: str, category: str, convert: Callable, trigger: str, parser: Parser, **kw: Any) -> Task:
    return Task(name, category, convert, trigger, parser, **kw)


NER_INSTRUCTION = (
    "List the named entities in the sentence, one per line as 'type: entity', with types person, "
    "organization, location and miscellaneous; answer 'none' if there is none."
)

TASKS: dict[str, Task] = {t.name: t for t in (
    _task("multiarith", "arithmetic", _arith, NUMERALS, parsers.parse_number, local=("MultiArith.json",)),
    _task("gsm8k", "arithmetic", _gsm8k, NUMERALS, parsers.parse_number, hf=HFSource("openai/gsm8k", "main")),
    _task("addsub", "arithmetic", _arith, NUMERALS, parsers.parse_number, local=("AddSub.json",)),
    _task("aqua", "arithmetic", _aqua, _among("ABCDE"), parsers.option_parser("ABCDE"),
          label_space=tuple("ABCDE"), hf=HFSource("deepmind/aqua_rat", "raw")),
    _task("singleeq", "arithmetic", _arith, NUMERALS, parsers.parse_number,
          local=("SingleEq.json", "questions.json")),
    _task("svamp", "arithmetic", _svamp, NUMERALS, parsers.parse_number,
          hf=HFSource("ChilleD/SVAMP"), local=("SVAMP.json",)),
    _task("csqa", "commonsense", _csqa, _among("ABCDE"), parsers.option_parser("ABCDE"),
          label_space=tuple("ABCDE"), hf=HFSource("tau/commonsense_qa", split="validation")),
    _task("strategyqa", "commonsense", _strategyqa, YES_NO, parsers.parse_yes_no,
          label_space=("yes", "no"), local=("strategyqa_task.json",)),
    _task("copa", "commonsense", _copa, _among("AB"), parsers.option_parser("AB"),
          label_space=("A", "B"), hf=HFSource("aps/super_glue", "copa", "validation")),
    _task("last_letters", "symbolic", _qa, "Therefore, the answer is", parsers.parse_letters,
          local=("last_letters.json",)),
    _task("coin_flip", "symbolic", _qa, YES_NO, parsers.parse_yes_no, label_space=("yes", "no"),
          local=("coin_flip.json",)),
    _task("date_understanding", "logical", _bigbench_choice, _among("ABCDEF"),
          parsers.option_parser("ABCDEF"),
          label_space=tuple("ABCDEF"), local=("date_understanding_task.json",)),
    _task("tracking_shuffled_objects", "logical", _bigbench_choice, _among("ABC"),
          parsers.option_parser("ABC"),
          label_space=tuple("ABC"), local=("tracking_shuffled_objects_task.json",)),
    _task("logiqa", "logical", _logiqa, _among("ABCD"), parsers.option_parser("ABCD"),
          label_space=tuple("ABCD"),
          hf=HFSource("lucasmccabe/logiqa"), paper=False),
    _task("rte", "nli", _nli(RTE_LABELS), "Therefore, the answer (entailment or not_entailment) is",
          _labels(*RTE_LABELS, not_entailment="not_entailment"), label_space=RTE_LABELS,
          instruction="Does the premise entail the hypothesis?",
          hf=HFSource("aps/super_glue", "rte", "validation")),
    _task("cb", "nli", _nli(CB_LABELS), "Therefore, the answer (entailment, contradiction or neutral) is",
          _labels(*CB_LABELS), label_space=CB_LABELS,
          instruction="Does the premise entail, contradict, or neither (neutral) the hypothesis?",
          hf=HFSource("aps/super_glue", "cb", "validation")),
    _task("boolq", "qa", _boolq, YES_NO, parsers.parse_yes_no, label_space=("yes", "no"),
          hf=HFSource("aps/super_glue", "boolq", "validation")),
    _task("mutual", "dialogue", _mutual, _among("ABCD"), parsers.option_parser("ABCD"),
          label_space=tuple("ABCD"), instruction="Choose the most reasonable next utterance of the dialogue.",
          local=("mutual/dev", "mutual.jsonl")),
    _task("samsum", "summarization", _samsum, "Therefore, the summary is", parsers.parse_text, metric="rouge",
          instruction="Summarize the dialogue.", hf=HFSource("knkarthick/samsum")),
    _task("conll03", "ner", _conll, "Therefore, the entities are", parsers.parse_entities, metric="entity_f1",
          instruction=NER_INSTRUCTION, hf=HFSource("eriktks/conll2003")),
    _task("sst2", "sentiment", _sst2, "Therefore, the sentiment (positive or negative) is",
          _labels("positive", "negative"), label_space=("positive", "negative"),
          instruction="Is the sentiment of the sentence positive or negative?",
          hf=HFSource("nyu-mll/glue", "sst2", "validation")),
)}  # fmt: skip

PAPER_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.paper)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(task.category for task in TASKS.values()))


def get_tasks(names: Sequence[str] | None) -> list[Task]:
    """The tasks called ``names`` (None or ["all"]: the paper's 20; ["paper+"]: all registered);
    an unknown name raises ValueError listing the registered ones."""
    if not names or list(names) == ["all"]:
        return [TASKS[n] for n in PAPER_TASKS]
    if list(names) == ["paper+"]:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; registered tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def protocol_hash(tasks: Sequence[Task] = ()) -> str:
    """A short hash of the parsers, metrics and templates source: written into every result file
    so results made with different answer extraction are never compared unknowingly."""
    digest = hashlib.sha256()
    for module in (parsers, metrics_module, inspect.getmodule(Task)):
        digest.update(inspect.getsource(module).encode())
    for task in tasks:
        digest.update(repr((task.name, task.template("{x}"), task.cot_trigger, task.answer_trigger)).encode())
    return digest.hexdigest()[:12]
