"""Question types, answer normalisation, and size / count parsing shared by every task.

Pure functions over strings (no torch, no model). Training targets, candidates, decoding and scoring all go
through the same normalisation, so they agree by construction; what a question type means for one dataset
(templates, vocabularies) lives in that dataset's module under ``surgvqa.tasks``.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------------------
# Question types
# --------------------------------------------------------------------------------------------------------------

YES_NO = "yes_no"
COLOR = "color"
SIZE_NUMERIC = "size_numeric"
COUNT_NUMERIC = "count_numeric"
MCQ = "mcq"
OPEN_ENDED = "open_ended"

QUESTION_TYPES: tuple[str, ...] = (YES_NO, COLOR, SIZE_NUMERIC, COUNT_NUMERIC, MCQ, OPEN_ENDED)
CLOSED_TYPES: tuple[str, ...] = QUESTION_TYPES[:-1]

# --------------------------------------------------------------------------------------------------------------
# Answer normalisation (shared by prepare, decoding and metrics)
# --------------------------------------------------------------------------------------------------------------

_BAD_ANSWERS = frozenset({"", "nan", "null"})  # "none" is a real Kvasir answer, never a bad one


def _normalise_label(label: str) -> str:
    label = " ".join(label.lower().split())
    # str methods (not a regex) so that "white space" means exactly what str.split() means: idempotence.
    while label.endswith("."):
        label = label[:-1].rstrip()
    return label


def split_labels(text: object) -> list[str]:
    """Normalised single labels of an answer, sorted and unique: label order in Kvasir is not meaningful."""
    if not isinstance(text, str):
        return []
    return sorted({label for part in text.split(";") if (label := _normalise_label(part))})


def label_set(text: object) -> frozenset[str]:
    """The answer as a set of labels, the unit of comparison for multi-label answers."""
    return frozenset(split_labels(text))


def normalize_answer(text: object) -> str:
    """Canonical answer string: lower case, single spaces, no trailing period, labels sorted and joined by "; "."""
    return "; ".join(split_labels(text))


def has_text(label: str) -> bool:
    """True when ``label`` holds a letter or a digit: an answer of punctuation, symbols or invisible characters
    alone (".", "?!", ";", a zero-width space) teaches nothing and normalises to an empty training target."""
    return any(unicodedata.category(char)[0] in "LN" for char in label)


def answer_problem(answer: str, question_type: str) -> tuple[str, str] | None:
    """(reason, detail) when a clean, non-empty answer must not be trained on; None when it may.

    Rejected: an answer, or one of its ";"-separated labels, without a letter or digit (``punctuation_answer``),
    and a count answer holding a number that is not a plain non-negative whole number (``bad_count``: "1,000",
    "1e3", "-2", "2.5"), which :func:`parse_count` refuses rather than misread.
    """
    if not has_text(answer) or not normalize_answer(answer):
        return "punctuation_answer", f"answer {answer!r} has no letter or digit"
    if empty := [part.strip() for part in answer.split(";") if part.strip() and not has_text(part)]:
        return "punctuation_answer", f"label {empty[0]!r} of answer {answer!r} has no letter or digit"
    if question_type == COUNT_NUMERIC:
        for label in split_labels(answer):
            if re.search(r"[0-9]", label) and parse_count(label) is None:
                return "bad_count", (f"count answer {answer!r} is not a non-negative whole number "
                                     f"({label!r}: write a count as digits alone, e.g. 1000)")
    return None


def is_bad_answer(text: object) -> bool:
    """True for answers that must not be trained on: missing, empty, or a stringified missing value."""
    if text is None:
        return True
    if isinstance(text, float):
        return math.isnan(text)
    if not isinstance(text, str):
        return False
    return text.strip().lower() in _BAD_ANSWERS


# --------------------------------------------------------------------------------------------------------------
# Size and count parsing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeInterval:
    """A size in millimetres as an interval, so that bins (`5-10mm`) and free values (`8 mm`) compare."""

    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True


class SizeMarker(enum.Enum):
    """Sizes that are not a length: "none" means no polyp, which no tolerance in millimetres should excuse."""

    NONE = "none"


SIZE_NONE = SizeMarker.NONE
SizeValue = SizeInterval | SizeMarker

_NUM = r"([0-9]{1,9}(?:\.[0-9]{1,6})?)"
_UNIT = r"(mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?)?"
_SIZE_LESS = re.compile(
    rf"(<=|≤|=<|<|\bless than|\bsmaller than|\bunder|\bbelow)\s*{_NUM}\s*{_UNIT}", re.ASCII
)
_SIZE_MORE = re.compile(
    rf"(>=|≥|=>|>|\bmore than|\bgreater than|\blarger than|\bbigger than|\bover|\babove)\s*{_NUM}\s*{_UNIT}",
    re.ASCII,
)
_SIZE_RANGE = re.compile(rf"{_NUM}\s*{_UNIT}\s*(?:-|–|—|to|and)\s*{_NUM}\s*{_UNIT}", re.ASCII)
_SIZE_SINGLE = re.compile(rf"{_NUM}\s*{_UNIT}", re.ASCII)
_SIZE_NONE_WORDS = frozenset({"none", "no polyp", "no polyps", "no", "not relevant", "not applicable", "n/a"})


def _mm(number: str, unit: str | None) -> float:
    return float(number) * (10.0 if unit and unit.startswith(("cm", "centimet")) else 1.0)


def _parse_one_size(label: str) -> SizeValue | None:
    if label in _SIZE_NONE_WORDS:
        return SIZE_NONE
    if m := _SIZE_LESS.search(label):
        return SizeInterval(0.0, _mm(m.group(2), m.group(3)), True, m.group(1) in ("<=", "≤", "=<"))
    if m := _SIZE_MORE.search(label):
        return SizeInterval(_mm(m.group(2), m.group(3)), math.inf, m.group(1) in (">=", "≥", "=>"), False)
    if m := _SIZE_RANGE.search(label):
        # "5-10mm": the unit written once, after the range, applies to both ends.
        unit_high = m.group(4)
        low = _mm(m.group(1), m.group(2) or unit_high)
        high = _mm(m.group(3), unit_high)
        return SizeInterval(min(low, high), max(low, high))
    numbers = _SIZE_SINGLE.findall(label)
    # A bare number counts only when it is the sole number; "12 mm" anywhere in a sentence is clear enough.
    if len(numbers) == 1 and (numbers[0][1] or re.fullmatch(r"(about|approx\.?|approximately|around|~)?\s*"
                                                          + _NUM, label, re.ASCII)):
        value = _mm(*numbers[0])
        return SizeInterval(value, value)
    with_unit = [n for n in numbers if n[1]]
    if len(with_unit) == 1:
        value = _mm(*with_unit[0])
        return SizeInterval(value, value)
    return None


def parse_size_labels(text: object) -> list[SizeValue] | None:
    """Every label of a size answer as an interval (or SIZE_NONE); None if any label does not parse."""
    labels = split_labels(text)
    if not labels:
        return None
    parsed = [_parse_one_size(label) for label in labels]
    return None if any(p is None for p in parsed) else parsed  # type: ignore[return-value]


def parse_size_mm(text: object) -> SizeValue | None:
    """A single-label size answer as an interval in mm, SIZE_NONE for "none", None if unparseable or multi-label.

    `<5mm` -> [0, 5), `5-10mm` -> [5, 10], `>20mm` / `>20` -> (20, inf), `8 mm` -> [8, 8], `1 cm` -> [10, 10].
    """
    parsed = parse_size_labels(text)
    return parsed[0] if parsed is not None and len(parsed) == 1 else None


def interval_distance_mm(a: SizeValue, b: SizeValue) -> float:
    """Gap in mm between two sizes (0 if they overlap or touch); inf between "none" and any real size."""
    if isinstance(a, SizeMarker) or isinstance(b, SizeMarker):
        return 0.0 if a == b else math.inf
    return max(a.low - b.high, b.low - a.high, 0.0)


_NUMBER_WORDS = {
    word: n for n, word in enumerate((
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen", "twenty",
    ))
}
# A number with its sign, thousands separators and exponent taken whole, so that "-2", "1,000" and "1e3" are seen
# as what they are (not a count) instead of as the count 2 or 1. A "-" after a digit or letter is a hyphen ("2-3").
_COUNT_TOKEN = re.compile(r"(?:(?<![0-9a-z])[-+])?[0-9][0-9.,]*(?:e[-+]?[0-9]+)?|[a-z]+", re.ASCII)
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_ZERO_WORDS = frozenset({"none", "no", "nothing"})


def parse_count(text: object) -> int | None:
    """The first count in an answer ("3", "3 polyps", "there are two", "none" -> 0); None if there is none.

    A count is a non-negative whole number: a first number written with a sign, a thousands separator, an
    exponent or a fraction ("-2", "1,000", "1e3", "2.5") is no count (None), never the digits before its mark.
    """
    if not isinstance(text, str):
        return None
    tokens = _COUNT_TOKEN.findall(text.lower())
    for token in tokens:
        if token[0] in "+-" or token[0].isdigit():
            token = token.rstrip(".,")  # a sentence's full stop or comma after the number
            if not _PLAIN_NUMBER.fullmatch(token) or len(token) > 9:
                return None
            value = float(token)
            return int(value) if value.is_integer() else None
        if token in _NUMBER_WORDS:
            return _NUMBER_WORDS[token]
    return 0 if any(token in _ZERO_WORDS for token in tokens) else None


def answer_meaning(question_type: str, label: str) -> object:
    """What a label means for scoring: its size interval or count for those types (``">20mm"`` and ``">20"`` are
    one answer), else the label itself."""
    meaning: object = None
    if question_type == SIZE_NUMERIC:
        meaning = parse_size_mm(label)
    elif question_type == COUNT_NUMERIC:
        meaning = parse_count(label)
    return label if meaning is None else meaning
