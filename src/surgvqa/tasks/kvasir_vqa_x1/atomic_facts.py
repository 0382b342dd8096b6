"""Atomic-fact recall: does a generated sentence state each closed Kvasir-VQA fact a Kvasir-VQA-x1 answer was
built from?

Every x1 row lists its atomic items in ``original``: a Kvasir-VQA question and its closed answer (yes/no, a count,
colours, a size bin, grid cells, finding or instrument names). Each answer label is one fact. A fact is stated
when the sentence mentions it in one of its written variants (numbers as digits or words, size intervals in any
notation that parses to the same interval, ``top left`` for ``upper-left``) and the mention is not negated
(``no polyps`` does not state ``polyp``; it does state a count of 0 and a "none" answer). The check is a fixed
rule set, deterministic and judge-free; the dataset's authors grade with an LLM judge instead, so these numbers
are a lower bound on what a judge would accept and are comparable only between runs scored by this module.

Written by hand: no library checks closed facts against free text with negation; a small rule set that each
test case pins down is easier to trust than a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from surgvqa.data.answers import (
    _SIZE_LESS,
    _SIZE_MORE,
    _SIZE_RANGE,
    _SIZE_SINGLE,
    COLOR,
    COUNT_NUMERIC,
    MCQ,
    SIZE_NUMERIC,
    YES_NO,
    SizeInterval,
    _parse_one_size,
    parse_count,
    split_labels,
)
from surgvqa.tasks.kvasir_vqa import GRID_CELLS, TEMPLATE_BY_ID, infer_question_type

# Atom types, the unit recall is reported per.
ATOM_YES_NO = "yes_no"
ATOM_COUNT = "count"
ATOM_COLOR = "color"
ATOM_SIZE = "size"
ATOM_LOCATION = "location"
ATOM_NAME = "name"
ATOM_TYPES = (ATOM_YES_NO, ATOM_COUNT, ATOM_COLOR, ATOM_SIZE, ATOM_LOCATION, ATOM_NAME)
LOCATION_TEMPLATES = frozenset({10, 15, 17})

# What each templated question is about: the words whose (negated) mention answers it.
TOPIC_WORDS: dict[int, tuple[str, ...]] = {
    1: ("text",), 2: ("easy", "easily", "obvious", "clearly"), 4: ("removed", "resected"),
    5: ("box", "artefact", "artifact"), 6: ("instrument", "tool"), 7: ("finding", "abnormality", "lesion"),
    8: ("polyp",), 9: ("polyp",), 11: ("polyp",), 12: ("instrument", "tool"),
    13: ("abnormality", "finding", "lesion", "polyp"), 14: ("abnormality", "finding", "lesion"),
    16: ("finding", "abnormality", "lesion"), 18: ("landmark",), 19: ("landmark",),
}
# Words that answer a yes/no question in the negative without negating its topic word.
NEGATIVE_SYNONYMS: dict[int, tuple[str, ...]] = {2: ("difficult", "hard", "subtle", "challenging"),
                                                 4: ("remain", "remains", "still")}
NEGATORS = frozenset({"no", "not", "without", "absent", "none", "neither", "nor", "free", "lack", "lacks",
                      "lacking", "never", "isn't", "aren't", "doesn't", "don't", "cannot", "nothing", "zero"})
# A negation reaches to the end of its clause: punctuation and these words start a new one.
CLAUSE_BREAKS = frozenset({".", ",", ";", ":", "!", "?", "and", "but", "while", "whereas", "although", "though",
                           "however", "with", "which", "whereby"})
NEGATION_REACH_BEFORE = 4  # "no clear evidence of a polyp": the negator four words ahead
NEGATION_REACH_AFTER = 3  # "polyps are not seen"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")
ONE_WORDS = frozenset({"single", "sole", "lone", "solitary"})
# Spelling variants folded before matching (both sides): British/American, hyphenation, grid-cell synonyms.
VARIANTS = {"colour": "color", "colours": "colors", "coloured": "colored", "centre": "center",
            "central": "center", "middle": "center", "top": "upper", "bottom": "lower", "esophagitis":
            "oesophagitis", "barrett's": "barretts", "barrett": "barretts", "gray": "grey", "rigth": "right",
            "artifact": "artefact", "hemorrhoid": "hemorrhoids", "haemorrhoids": "hemorrhoids",
            "haemorrhoid": "hemorrhoids", "tumour": "tumor"}
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?]")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens with variants folded and hyphens split ("z-line" -> "z", "line")."""
    return [VARIANTS.get(token, token) for token in _TOKEN.findall(text.lower().replace("’", "'"))]


def _singular(token: str) -> str:
    return token[:-1] if len(token) > 3 and token.endswith("s") and not token.endswith("ss") else token


def _clause_bounds(words: list[str], start: int, end: int) -> tuple[int, int]:
    left = start
    while left > 0 and words[left - 1] not in CLAUSE_BREAKS:
        left -= 1
    right = end
    while right < len(words) and words[right] not in CLAUSE_BREAKS:
        right += 1
    return left, right


def is_negated(words: list[str], start: int, end: int) -> bool:
    """A negator shortly before the mention, or shortly after it, within the mention's clause."""
    left, right = _clause_bounds(words, start, end)
    before = words[max(left, start - NEGATION_REACH_BEFORE):start]
    after = words[end:min(right, end + NEGATION_REACH_AFTER)]
    return any(word in NEGATORS for word in before) or any(word in NEGATORS - {"none"} for word in after)


def find_phrase(words: list[str], phrase: list[str]) -> list[tuple[int, int]]:
    """Where ``phrase`` occurs as whole words (plural and singular of its last word alike)."""
    if not phrase:
        return []
    spans = []
    last = _singular(phrase[-1])
    for i in range(len(words) - len(phrase) + 1):
        window = words[i:i + len(phrase)]
        if window[:-1] == phrase[:-1] and _singular(window[-1]) == last:
            spans.append((i, i + len(phrase)))
    return spans


def mentions(words: list[str], phrase: list[str]) -> tuple[bool, bool]:
    """(mentioned positively somewhere, mentioned negated somewhere)."""
    spans = find_phrase(words, phrase)
    negated = [is_negated(words, start, end) for start, end in spans]
    return any(not n for n in negated), any(negated)


def _topic(words: list[str], template: int | None) -> tuple[bool, bool]:
    positive = negative = False
    for word in TOPIC_WORDS.get(template or 0, ()):
        pos, neg = mentions(words, tokens(word))
        positive, negative = positive or pos, negative or neg
    return positive, negative


@dataclass(frozen=True)
class Fact:
    """One checkable fact: a label of an atomic item's answer."""

    atom_type: str
    question: str  # the atomic Kvasir-VQA question
    label: str  # one normalised answer label ("3", "pink", "5-10mm", "upper-left", "no")
    template: int | None


def atom_type_of(question: str) -> tuple[str | None, int | None]:
    """The atom type of a Kvasir-VQA question, and its template; (None, None) for an open question."""
    info = infer_question_type(question)
    if info.template in LOCATION_TEMPLATES:
        return ATOM_LOCATION, info.template
    return {YES_NO: ATOM_YES_NO, COUNT_NUMERIC: ATOM_COUNT, COLOR: ATOM_COLOR, SIZE_NUMERIC: ATOM_SIZE,
            MCQ: ATOM_NAME}.get(info.question_type), info.template


def parse_original(value: Any) -> list[tuple[str, str]]:
    """The (question, answer) atomic items of an x1 ``original`` field: a JSON string or an already parsed list of
    objects with the question under ``q`` (or ``question``) and the answer under ``a`` (or ``answer``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if isinstance(value, dict):
        value = [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    items = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        question = next((item[k] for k in ("q", "question") if isinstance(item.get(k), str)), None)
        answer = next((item[k] for k in ("a", "answer", "ans") if item.get(k) is not None), None)
        if isinstance(answer, list):
            answer = "; ".join(str(label) for label in answer)
        if question and answer is not None:
            items.append((question, str(answer)))
    return items


def facts_of(original: Any) -> list[Fact]:
    """Every checkable fact of a row: one per closed answer label of each atomic item."""
    facts = []
    for question, answer in parse_original(original):
        atom_type, template = atom_type_of(question)
        if atom_type is None:
            continue
        labels = split_labels(answer)
        if atom_type == ATOM_SIZE:
            labels = [label for label in labels if label != "none"] or labels
        facts += [Fact(atom_type, question, "lower-right" if label == "lower-rigth" else label, template)
                  for label in labels]
    return facts


# ------------------------------------------------------------------------------------------------ the checks


def _states_yes_no(words: list[str], fact: Fact, single_atom: bool) -> bool:
    if fact.label in ("not relevant", "not applicable"):
        return bool(find_phrase(words, ["not", "relevant"]) or find_phrase(words, ["not", "applicable"]))
    positive, negative = _topic(words, fact.template)
    negative = negative or any(find_phrase(words, [w]) for w in NEGATIVE_SYNONYMS.get(fact.template or 0, ()))
    # A bare "Yes." / "No, ..." answers the question only when the row asks one question.
    leading = words[0] if words else ""
    if fact.label == "yes":
        return (positive and not negative) or (single_atom and leading == "yes")
    if fact.label == "no":
        return negative or (single_atom and leading == "no")
    return False


def _numbers_before(words: list[str], end: int, reach: int = 3) -> list[int]:
    found = []
    for word in words[max(0, end - reach):end]:
        if word.isdigit():
            found.append(int(word))
        elif word in NUMBER_WORDS:
            found.append(NUMBER_WORDS.index(word))
        elif word in ONE_WORDS:
            found.append(1)
    return found


def _states_count(words: list[str], fact: Fact) -> bool:
    value = parse_count(fact.label)
    if value is None:
        return False
    topic_spans = [span for word in TOPIC_WORDS.get(fact.template or 0, ()) for span in
                   find_phrase(words, tokens(word))]
    for start, end in topic_spans:
        numbers = _numbers_before(words, start)
        if value in numbers:
            return True
        if value == 0 and is_negated(words, start, end):
            return True
    return False


def _size_intervals(text: str) -> list[SizeInterval]:
    """Every size the text states, as intervals ("between 5 and 10 mm", "<5mm", "over 2 cm", "8 millimetres").

    A number counts as a size only with a unit or a comparison sign: "more than 2 polyps" is a count.
    """
    lowered = text.lower()
    found: list[SizeInterval] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind in ((_SIZE_LESS, "bound"), (_SIZE_MORE, "bound"), (_SIZE_RANGE, "range"),
                          (_SIZE_SINGLE, "single")):
        for match in pattern.finditer(lowered):
            if any(match.start() < end and start < match.end() for start, end in taken):
                continue
            if kind == "bound" and not (match.group(3) or match.group(1)[0] in "<>≤≥="):
                continue
            if kind == "range" and not (match.group(2) or match.group(4)):
                continue
            if kind == "single" and not match.group(2):
                continue
            parsed = _parse_one_size(match.group(0).strip())
            if isinstance(parsed, SizeInterval):
                found.append(parsed)
                taken.append(match.span())
    return found


def _states_size(text: str, fact: Fact) -> bool:
    reference = _parse_one_size(fact.label)
    if not isinstance(reference, SizeInterval):
        return False
    for stated in _size_intervals(text):
        if (stated.low, stated.high) == (reference.low, reference.high):
            return True
        point_inside = stated.low == stated.high and reference.low <= stated.low <= reference.high \
            and (reference.low_inclusive or stated.low > reference.low) \
            and (reference.high_inclusive or stated.low < reference.high)
        if point_inside:
            return True
    return False


def grid_cells_in(words: list[str]) -> tuple[set[str], set[str]]:
    """(cells mentioned positively, cells mentioned negated): "upper left", "top-left", "centre", "left center"."""
    positive: set[str] = set()
    negated: set[str] = set()
    i = 0
    while i < len(words):
        word, following = words[i], words[i + 1] if i + 1 < len(words) else ""
        cell, width = None, 1
        if word in ("upper", "lower") and following in ("left", "right", "center"):
            cell, width = f"{word}-{following}", 2
        elif word in ("left", "right") and following in ("upper", "lower", "center"):
            cell, width = (f"{following}-{word}" if following != "center" else f"center-{word}"), 2
        elif word == "center" and following in ("left", "right"):
            cell, width = f"center-{following}", 2
        elif word == "center":
            cell = "center"
        if cell in GRID_CELLS:
            (negated if is_negated(words, i, i + width) else positive).add(cell)
        i += width
    return positive, negated


def _states_location(words: list[str], fact: Fact) -> bool:
    positive, _ = grid_cells_in(words)
    return fact.label in positive


def _states_label(words: list[str], fact: Fact) -> bool:
    """A colour or a name, mentioned and not negated, and not only as part of a longer label of the same
    vocabulary ("barretts" inside "short-segment barretts")."""
    if fact.label == "none":
        if find_phrase(words, ["none"]):
            return True
        return _topic(words, fact.template)[1]
    phrase = tokens(fact.label)
    spans = find_phrase(words, phrase)
    template = TEMPLATE_BY_ID.get(fact.template) if fact.template is not None else None
    longer = [tokens(label) for label in (template.vocabulary if template else ())
              if label != fact.label and len(tokens(label)) > len(phrase)]
    covered = {(s, e) for other in longer for start, end in find_phrase(words, other)
               for s, e in spans if start <= s and e <= end}
    return any(not is_negated(words, s, e) for s, e in spans if (s, e) not in covered)


def states(text: str, fact: Fact, *, single_atom: bool = False) -> bool:
    """Whether ``text`` states ``fact``; ``single_atom``: the row asks one question (so "Yes." answers it)."""
    words = tokens(text)
    if fact.atom_type == ATOM_YES_NO:
        return _states_yes_no(words, fact, single_atom)
    if fact.atom_type == ATOM_COUNT:
        return _states_count(words, fact)
    if fact.atom_type == ATOM_SIZE:
        return _states_size(text, fact)
    if fact.atom_type == ATOM_LOCATION:
        return _states_location(words, fact)
    return _states_label(words, fact)


def check_facts(text: str, facts: Iterable[Fact]) -> list[bool]:
    facts = list(facts)
    single = len({fact.question for fact in facts}) == 1
    return [states(text, fact, single_atom=single) for fact in facts]
