"""Atomic-fact recall: does a generated sentence state each closed Kvasir-VQA fact a Kvasir-VQA-x1 answer was
built from?

Every x1 row lists its atomic items in ``original``: a Kvasir-VQA question and its closed answer (yes/no, a count,
colours, a size bin, grid cells, finding or instrument names). Each answer label is one fact. A fact is stated
when the sentence mentions it as an endoscopist would write it (numbers as digits or words, size intervals in any
notation that parses to the same interval, ``reddish`` or ``erythematous`` for red, ``snare`` for polyp snare,
``EGD`` for gastroscopy, ``sessile`` for Paris Is, ``left of centre`` for center-left) and the mention asserts a
present finding: a negated one (``no polyps``) states a count of 0 and a "none" answer, never the finding; a
hedged one (``a polyp cannot be excluded``, ``possible oesophagitis``) states nothing; a historical one
(``polyps were removed previously``, ``status post polypectomy``) does not state a finding in the image. The check
is a fixed rule set, deterministic and judge-free; the dataset's authors grade with an LLM judge instead, so these
numbers are comparable only between runs scored by this module.

Written by hand: no library checks closed facts against free text. NegEx-style assertion is the one part a library
does (medspaCy's ConText, negspacy), but both need spaCy and its pipelines, and their trigger lists would still need
the endoscopy-specific terms below; thirty lines of triggers that each test case pins down are easier to trust.
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
    1: ("text",), 2: ("easy", "easily", "obvious", "clearly", "readily", "conspicuous"),
    4: ("removed", "resected", "excised", "resection", "polypectomy"),
    5: ("box", "artefact"), 6: ("instrument", "tool", "device", "accessory"),
    7: ("finding", "abnormality", "lesion"), 8: ("polyp",), 9: ("polyp",), 11: ("polyp",),
    12: ("instrument", "tool", "device", "accessory"),
    13: ("abnormality", "finding", "lesion", "polyp"), 14: ("abnormality", "finding", "lesion"),
    16: ("finding", "abnormality", "lesion"), 18: ("landmark",), 19: ("landmark",),
}
# Words that answer a yes/no question in the negative without negating its topic word; negated, they answer it
# in the positive ("no residual polyp": all polyps were removed).
NEGATIVE_SYNONYMS: dict[int, tuple[str, ...]] = {
    2: ("difficult", "hard", "subtle", "challenging", "inconspicuous", "miss", "missed", "overlooked"),
    4: ("remain", "remains", "remaining", "still", "residual", "remnant", "incomplete", "incompletely"),
}

# Assertion, the NegEx idea: is a mention a present finding? Negators reach a few words and read as absence; hedges
# and history reach across the clause (ConText's scope) and read as neither presence nor absence.
PRE_NEGATORS = frozenset({"no", "not", "without", "absent", "absence", "none", "neither", "nor", "free", "lack",
                          "lacks", "lacking", "never", "isn't", "aren't", "doesn't", "don't", "cannot", "nothing",
                          "zero", "negative"})
# After the mention only the verbal negators reach back: "a polyp without ulceration" still states the polyp.
POST_NEGATORS = frozenset({"not", "absent", "isn't", "aren't", "doesn't", "don't", "wasn't", "weren't", "never",
                           "free", "cannot", "excluded"})
# Uncertainty: "possible", "may", "cannot be excluded" (a pseudo-negation: its "cannot" must not read as absence).
# "Likely", "probable" and "suggestive of" stay assertions, as in ConText's probable existence: a committed reading.
HEDGES_BEFORE = (("possible",), ("possibly",), ("suspected",), ("suspicious",), ("suspicion",), ("questionable",),
                 ("equivocal",), ("may",), ("might",), ("could",), ("perhaps",), ("maybe",), ("query",),
                 ("uncertain",), ("unclear",), ("indeterminate",), ("versus",), ("vs",), ("differential",),
                 ("rule", "out"), ("cannot", "exclude"), ("cannot", "rule", "out"), ("can't", "exclude"),
                 ("can't", "rule", "out"), ("concerning", "for"), ("question", "of"))
HEDGES_AFTER = (("cannot", "be", "excluded"), ("cannot", "be", "ruled", "out"), ("can't", "be", "excluded"),
                ("can't", "be", "ruled", "out"), ("not", "be", "excluded"), ("not", "be", "ruled", "out"),
                ("not", "excluded"), ("not", "ruled", "out"), ("possible",), ("suspected",), ("questionable",),
                ("may",), ("might",), ("uncertain",), ("unclear",), ("versus",), ("vs",))
# History: a finding that was there before is not a finding in this image ("status post polypectomy",
# "polyps were removed previously"). Read only for finding facts: a clip placed previously is still in view.
HISTORY_BEFORE = (("previous",), ("previously",), ("prior",), ("history",), ("status", "post"),
                  ("post", "polypectomy"), ("removed",), ("resected",), ("excised",))
HISTORY_AFTER = (("removed",), ("resected",), ("excised",), ("previously",))
HISTORY_TEMPLATES = frozenset({7, 8, 9, 11, 14, 16})
# A negation reaches to the end of its clause: punctuation and these words start a new one ("no polyps remain
# after polypectomy" does not deny the polypectomy).
CLAUSE_BREAKS = frozenset({".", ",", ";", ":", "!", "?", "and", "but", "while", "whereas", "although", "though",
                           "however", "with", "which", "whereby", "where", "that", "after", "since", "except"})
NEGATION_REACH_BEFORE = 4  # "no clear evidence of a polyp": the negator four words ahead
NEGATION_REACH_AFTER = 3  # "polyps are not seen"
ASSERTED, NEGATED, UNCERTAIN = "asserted", "negated", "uncertain"

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")
ONE_WORDS = frozenset({"single", "sole", "lone", "solitary"})
# Spelling variants folded before matching (both sides): British/American, hyphenation, grid-cell synonyms.
VARIANTS = {"colour": "color", "colours": "colors", "coloured": "colored", "centre": "center",
            "central": "center", "centrally": "center", "centred": "center", "centered": "center",
            "middle": "center", "top": "upper", "bottom": "lower", "esophagitis": "oesophagitis",
            "esophagus": "oesophagus", "esophageal": "oesophageal", "barrett's": "barretts", "barrett": "barretts",
            "gray": "grey", "grayish": "greyish", "rigth": "right", "artifact": "artefact",
            "hemorrhoid": "hemorrhoids", "haemorrhoids": "hemorrhoids", "haemorrhoid": "hemorrhoids",
            "tumour": "tumor", "caecum": "cecum", "caecal": "cecal", "ileocaecal": "ileocecal",
            "haemoclip": "hemoclip", "hyperemic": "hyperaemic", "esophagogastroduodenoscopy":
            "oesophagogastroduodenoscopy", "bluish": "blueish", "orangish": "orangey", "orangeish": "orangey"}
# Folded on the raw text, before tokens split them: "s/p" is "status post"; "semi-pedunculated" (Paris Isp) is
# not "pedunculated" (Paris Ip).
_TEXT_VARIANTS = ((re.compile(r"\bs/p\b"), "status post"), (re.compile(r"\bsemi[- ]?pedunculated"), "semipedunculated"))
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?]")

# How endoscopists write each answer label besides the label itself (phrases in folded tokens).
# Colours: the "-ish" forms and the clinical colour adjectives only. Not "pale" (pallor is less red, not white),
# not "dark" (not black), not "inflamed" or "bleeding" (findings, not colours), not "salmon" alone (pink or
# orange); "erythematous"/"erythema"/"hyperaemic" are how a report says red.
_COLOR_SYNONYMS = {
    "red": ("reddish", "redness", "reddened", "erythematous", "erythema", "hyperaemic", "crimson", "scarlet"),
    "pink": ("pinkish",), "white": ("whitish",), "yellow": ("yellowish",), "brown": ("brownish",),
    "grey": ("greyish",), "green": ("greenish",), "blue": ("blueish",), "black": ("blackish",),
    "orange": ("orangey",), "purple": ("purplish", "violaceous", "violet"),
    # flesh: the colour of the surrounding mucosa, which a report calls isochromatic or normal-coloured
    "flesh": ("isochromatic", "normal colored", "same color"),
}
_NAME_SYNONYMS = {
    # instruments: the vocabulary has one kind each of forceps, snare, clip and needle, so the bare noun names it
    "biopsy forceps": ("forceps",), "polyp snare": ("snare",), "metal clip": ("clip", "hemoclip", "endoclip"),
    "injection needle": ("needle", "injector"),
    "tube": ("catheter",),  # the endoscopic "tube" accessories (spray, irrigation) are catheters
    # procedures: a colonoscope or gastroscope names its procedure; sigmoidoscopy is a different procedure
    "colonoscopy": ("colonoscopic", "colonoscope", "ileocolonoscopy", "lower endoscopy", "lower gi endoscopy"),
    "gastroscopy": ("gastroscopic", "gastroscope", "ogd", "egd", "oesophagogastroduodenoscopy", "upper endoscopy",
                    "upper gi endoscopy"),
    "capsule endoscopy": ("capsule", "vce", "wce"),
    # findings: "colitis" alone is not credited (infectious, ischaemic); a Mayo or UCEIS score grades UC only,
    # an LA grade oesophagitis only; a pseudopolyp is not a polyp (its own token)
    "polyp": ("adenoma", "polypoid"),
    "ulcerative colitis": ("uc", "ulcerative proctitis", "ulcerative proctocolitis", "mayo", "uceis"),
    "oesophagitis": ("la grade", "los angeles grade", "los angeles classification"),
    "barretts": ("columnar lined oesophagus",), "short segment barretts": ("ssbe",), "hemorrhoids": ("piles",),
    # landmarks: the Z-line is the squamocolumnar junction (not the gastro-oesophageal junction, which Barrett's
    # separates from it); the caecum is documented by its appendiceal orifice and ileocaecal valve
    "z line": ("squamocolumnar junction", "scj", "ora serrata"),
    "cecum": ("cecal", "appendiceal orifice", "ileocecal valve"), "ileum": ("ileal",), "pylorus": ("pyloric",),
    # Paris classification: Ip is pedunculated, Is sessile, IIa slightly (flat) elevated
    "paris ip": ("pedunculated", "0 ip"), "paris is": ("sessile", "0 is"),
    "paris iia": ("0 iia", "slightly elevated", "flat elevated", "superficial elevated"),
}
# Phrases in which a label's word names something else: white-light and blue-light imaging, the green/black box
# artefact, a sessile serrated lesion (a histology, flat as often as sessile), a needle-knife (a cutting device)
# and grasping forceps (they take no biopsy).
_NOT_THE_LABEL = ("white light", "blue light", "green box", "black box", "green black", "sessile serrated",
                  "needle knife", "grasping forceps")
_SIDE_NOUNS = frozenset({"side", "half", "part", "portion", "edge", "margin", "region", "area", "aspect", "corner",
                         "field", "hand", "periphery"})
_IMAGE_NOUNS = frozenset({"image", "frame", "field", "view", "picture", "screen", "center"})


def tokens(text: str) -> list[str]:
    """Lower-case word tokens with variants folded and hyphens split ("z-line" -> "z", "line")."""
    text = text.lower().replace("’", "'")
    for pattern, replacement in _TEXT_VARIANTS:
        text = pattern.sub(replacement, text)
    return [VARIANTS.get(token, token) for token in _TOKEN.findall(text)]


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


def _phrase_starts(words: list[str], phrases: Iterable[tuple[str, ...]], low: int, high: int,
                   limit: int) -> list[tuple[int, int]]:
    """Spans of ``phrases`` starting in words[low:high] and ending by ``limit``."""
    found = []
    for phrase in phrases:
        for i in range(low, high):
            if i + len(phrase) <= limit and tuple(words[i:i + len(phrase)]) == phrase:
                found.append((i, i + len(phrase)))
    return found


def assertion(words: list[str], start: int, end: int, *, history: bool = False) -> str:
    """Whether the mention words[start:end] is asserted, negated or uncertain (hedged, or with ``history`` a past
    finding). Hedges win over negation: "no polyp can be excluded" says nothing for certain."""
    left, right = _clause_bounds(words, start, end)
    before = max(left, start - NEGATION_REACH_BEFORE)
    after = min(right, end + NEGATION_REACH_AFTER)
    hedges = _phrase_starts(words, HEDGES_BEFORE, left, start, start) + \
        _phrase_starts(words, HEDGES_AFTER, end, right, right)
    if hedges:
        return UNCERTAIN
    if history and (_phrase_starts(words, HISTORY_BEFORE, left, start, start)
                    or _phrase_starts(words, HISTORY_AFTER, end, after, right)):
        return UNCERTAIN
    if start > 0 and words[start - 1] == "non":  # "non-erythematous"
        return NEGATED
    if any(word in PRE_NEGATORS for word in words[before:start]) or \
            any(word in POST_NEGATORS for word in words[end:after]) or \
            _phrase_starts(words, (("ruled", "out"),), end, after, right):
        return NEGATED
    return ASSERTED


def is_negated(words: list[str], start: int, end: int) -> bool:
    """A negator shortly before the mention, or shortly after it, within the mention's clause."""
    return assertion(words, start, end) == NEGATED


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


def mentions(words: list[str], phrase: list[str], *, history: bool = False) -> tuple[bool, bool]:
    """(asserted somewhere, negated somewhere); a hedged or historical mention is neither."""
    readings = {assertion(words, start, end, history=history) for start, end in find_phrase(words, phrase)}
    return ASSERTED in readings, NEGATED in readings


def _topic(words: list[str], template: int | None) -> tuple[bool, bool]:
    positive = negative = False
    for word in TOPIC_WORDS.get(template or 0, ()):
        pos, neg = mentions(words, tokens(word), history=template in HISTORY_TEMPLATES)
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


def _answers_bare(words: list[str], answer: str) -> bool:
    """A bare "Yes." or "No, ..." opening the sentence; "No residual polyp" opens with a negator, not an answer."""
    return bool(words) and words[0] == answer and (len(words) == 1 or words[1] in CLAUSE_BREAKS)


def _states_yes_no(words: list[str], fact: Fact, single_atom: bool) -> bool:
    if fact.label in ("not relevant", "not applicable"):
        return bool(find_phrase(words, ["not", "relevant"]) or find_phrase(words, ["not", "applicable"]))
    positive, negative = _topic(words, fact.template)
    for word in NEGATIVE_SYNONYMS.get(fact.template or 0, ()):
        asserted, negated = mentions(words, [word])
        negative, positive = negative or asserted, positive or negated
    # A bare answer answers the question only when the row asks one question.
    if fact.label == "yes":
        return (positive and not negative) or (single_atom and _answers_bare(words, "yes"))
    if fact.label == "no":
        return negative or (single_atom and _answers_bare(words, "no"))
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
    history = fact.template in HISTORY_TEMPLATES
    for word in TOPIC_WORDS.get(fact.template or 0, ()):
        for start, end in find_phrase(words, tokens(word)):
            reading = assertion(words, start, end, history=history)
            numbers = _numbers_before(words, start)
            if reading == ASSERTED and value in numbers:
                return True
            # "no polyps" is a count of 0; "no more than two polyps" is not
            if value == 0 and reading == NEGATED and not any(numbers):
                return True
    return False


def _size_mentions(text: str) -> list[tuple[SizeInterval, int, int]]:
    """Every size the text states, as intervals ("between 5 and 10 mm", "<5mm", "over 2 cm", "8 millimetres"),
    with the character span of each.

    A number counts as a size only with a unit or a comparison sign: "more than 2 polyps" is a count.
    """
    lowered = text.lower()
    found: list[tuple[SizeInterval, int, int]] = []
    for pattern, kind in ((_SIZE_LESS, "bound"), (_SIZE_MORE, "bound"), (_SIZE_RANGE, "range"),
                          (_SIZE_SINGLE, "single")):
        for match in pattern.finditer(lowered):
            if any(match.start() < end and start < match.end() for _, start, end in found):
                continue
            if kind == "bound" and not (match.group(3) or match.group(1)[0] in "<>≤≥="):
                continue
            if kind == "range" and not (match.group(2) or match.group(4)):
                continue
            if kind == "single" and not match.group(2):
                continue
            parsed = _parse_one_size(match.group(0).strip())
            if isinstance(parsed, SizeInterval):
                found.append((parsed, *match.span()))
    return found


def _states_size(text: str, fact: Fact) -> bool:
    reference = _parse_one_size(fact.label)
    if not isinstance(reference, SizeInterval):
        return False
    words = tokens(text)
    for stated, start, end in _size_mentions(text):
        first = len(tokens(text[:start]))
        reading = assertion(words, first, first + max(1, len(tokens(text[start:end]))),
                            history=fact.template in HISTORY_TEMPLATES)
        if reading != ASSERTED:  # "not larger than 20 mm", "a previously resected 15 mm polyp"
            continue
        if (stated.low, stated.high) == (reference.low, reference.high):
            return True
        point_inside = stated.low == stated.high and reference.low <= stated.low <= reference.high \
            and (reference.low_inclusive or stated.low > reference.low) \
            and (reference.high_inclusive or stated.low < reference.high)
        if point_inside:
            return True
    return False


def _followed_by_image(words: list[str], i: int) -> bool:
    """words[i:] reads "of (the) image / frame / centre": the image's side, not an organ's or a polyp's."""
    if i >= len(words) or words[i] != "of":
        return False
    i += 1 + (i + 1 < len(words) and words[i + 1] == "the")
    return i < len(words) and words[i] in _IMAGE_NOUNS


def _side_of_image(words: list[str], i: int) -> bool:
    """A bare "left" or "top" names a side of the image only in a location phrase ("on the left", "the upper
    part of the image"), never in "upper GI endoscopy", "the left colon" or "the lower part of the oesophagus"."""
    following = words[i + 1] if i + 1 < len(words) else ""
    if following in _SIDE_NOUNS:
        j = i + 2 + (i + 2 < len(words) and words[i + 2] in _SIDE_NOUNS)  # "left hand side"
        return j >= len(words) or words[j] != "of" or _followed_by_image(words, j)
    previous = words[i - 1] if i > 0 else ""
    return previous in ("the", "to") and (not following or following in CLAUSE_BREAKS
                                           or _followed_by_image(words, i + 1))


_SIDE_CELL = {"upper": "upper-center", "lower": "lower-center", "left": "center-left", "right": "center-right"}


def _cell_at(words: list[str], i: int) -> tuple[str | None, int]:
    """The grid cell a location phrase starting at words[i] names, and its length in words."""
    word, following = words[i], words[i + 1] if i + 1 < len(words) else ""
    if word in ("upper", "lower") and following in ("left", "right", "center"):
        return f"{word}-{following}", 2
    if word in ("left", "right") and following in ("upper", "lower"):
        return f"{following}-{word}", 2
    if word in ("left", "right") and following == "center":
        return f"center-{word}", 2
    if word == "center" and following in ("left", "right"):
        return f"center-{following}", 2
    if word in ("left", "right", "above", "below"):  # "left of (the) centre", "above the centre"
        j = i + 1 + (word in ("left", "right") and following == "of")
        j += j < len(words) and words[j] == "the"
        if j < len(words) and words[j] == "center" and (word in ("above", "below") or following == "of"):
            side = {"above": "upper-center", "below": "lower-center"}.get(word, f"center-{word}")
            return side, j + 1 - i
    if word == "center":
        return "center", 1
    if word in _SIDE_CELL and _side_of_image(words, i):
        return _SIDE_CELL[word], 1
    return None, 1


def grid_cells_in(words: list[str]) -> tuple[set[str], set[str]]:
    """(cells asserted, cells negated): "upper left", "top-left", "centre", "left of centre", "on the left"."""
    positive: set[str] = set()
    negated: set[str] = set()
    i = 0
    while i < len(words):
        cell, width = _cell_at(words, i)
        if cell in GRID_CELLS:
            reading = assertion(words, i, i + width)
            if reading != UNCERTAIN:
                (negated if reading == NEGATED else positive).add(cell)
        i += width
    return positive, negated


def _states_location(words: list[str], fact: Fact) -> bool:
    positive, _ = grid_cells_in(words)
    return fact.label in positive


def label_phrases(label: str) -> list[list[str]]:
    """The label and the ways endoscopists write it, as folded token phrases."""
    phrase = tokens(label)
    synonyms = {**_COLOR_SYNONYMS, **_NAME_SYNONYMS}.get(" ".join(phrase), ())
    return [phrase, *(tokens(synonym) for synonym in synonyms)]


def _states_label(words: list[str], fact: Fact) -> bool:
    """A colour or a name, asserted, and not only as part of a longer phrase naming something else: another
    label of the same vocabulary ("barretts" inside "short-segment barretts") or no label ("white light")."""
    if fact.label == "none":
        if find_phrase(words, ["none"]):
            return True
        return _topic(words, fact.template)[1]
    spans = [span for phrase in label_phrases(fact.label) for span in find_phrase(words, phrase)]
    template = TEMPLATE_BY_ID.get(fact.template) if fact.template is not None else None
    others = [phrase for label in (template.vocabulary if template else ()) if label != fact.label
              for phrase in label_phrases(label)] + [tokens(phrase) for phrase in _NOT_THE_LABEL]
    covered = {(s, e) for other in others for start, end in find_phrase(words, other)
               for s, e in spans if start <= s and e <= end and end - start > e - s}
    history = fact.template in HISTORY_TEMPLATES
    return any(assertion(words, s, e, history=history) == ASSERTED for s, e in spans if (s, e) not in covered)


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
