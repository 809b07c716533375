"""Answer parsers: turn a model's (stage-2) text into a prediction, or ``None`` when it holds none.

Answer extraction moves accuracy by points, so these follow Kojima et al.'s zero-shot-CoT
``answer_cleansing`` (the protocol the study uses) and every result file records a hash of this
module and the task templates (``tasks.protocol_hash``). ``None`` is a failure: metrics count it
wrong, never crash on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Parser = Callable[[str], object]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_number(text: str) -> float | None:
    """First number in the text (Kojima: first after the trigger), thousands commas removed:
    "The answer is 1,234." -> 1234.0."""
    match = _NUMBER.search(_THOUSANDS.sub("", text or ""))
    return float(match.group()) if match else None


def option_parser(letters: str = "ABCDE") -> Parser:
    """First stand-alone option letter: "(C) because" -> "C" (not the A of "Answer")."""
    pattern = re.compile(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])")

    def parse(text: str) -> str | None:
        match = pattern.search(text or "")
        return match.group(1) if match else None

    parse.__name__ = f"option_{letters}"
    return parse


def label_parser(aliases: Mapping[str, str]) -> Parser:
    """First label word in the text, lower-cased; ``aliases`` maps each surface form to its label.
    The leftmost match wins, and at one position the longest form ("not entailment" over
    "entailment")."""
    forms = sorted(aliases, key=len, reverse=True)
    pattern = re.compile(r"(?<![a-z_])(" + "|".join(re.escape(f) for f in forms) + r")(?![a-z_])")

    def parse(text: str) -> str | None:
        match = pattern.search((text or "").lower())
        return aliases[match.group(1)] if match else None

    parse.__name__ = "label_" + "_".join(sorted(set(aliases.values())))
    return parse


parse_yes_no = label_parser({"yes": "yes", "no": "no"})
parse_yes_no.__name__ = "parse_yes_no"


def parse_letters(text: str) -> str | None:
    """Last-letter concatenation (Kojima): the answer with quotes, dots and spaces removed."""
    cleaned = re.sub(r"[\"'\n.\s]", "", (text or "").strip().split("\n")[0])
    return cleaned or None


NER_TYPES = {
    "person": "PER", "per": "PER", "organization": "ORG", "organisation": "ORG", "org": "ORG",
    "location": "LOC", "loc": "LOC", "miscellaneous": "MISC", "misc": "MISC",
}  # fmt: skip


def parse_entities(text: str) -> frozenset[tuple[str, str]] | None:
    """Lines "type: span" -> {(TYPE, span)}; several spans on a line are split on ";" or ",".
    Lines of unknown types are ignored; no line at all is a failure (None), "none" is no entity."""
    entities: set[tuple[str, str]] = set()
    seen_line = False
    for line in (text or "").splitlines():
        kind, sep, spans = line.partition(":")
        kind = kind.strip().strip("-* ").lower()
        if not sep or kind not in NER_TYPES:
            continue
        seen_line = True
        for span in re.split(r"[;,]", spans):
            span = span.strip().strip(".\"'")
            if span and span.lower() != "none":
                entities.add((NER_TYPES[kind], span))
    if not seen_line:
        return frozenset() if (text or "").strip().lower().rstrip(".") == "none" else None
    return frozenset(entities)


def parse_text(text: str) -> str | None:
    """Summaries are scored as generated (stripped); an empty one is a failure."""
    return (text or "").strip() or None
