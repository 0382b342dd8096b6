"""Question types, Kvasir-VQA templates, candidate answers and answer normalisation.

Pure functions over strings (no torch, no model): `prepare` stores what they decide in every record, and the
prompt, the constrained decoder and the metrics read it from there. The normalisation and the size / count
parsers live here, not in `metrics`, so that training labels, candidates and scoring agree by construction.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

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
# Documented answer vocabularies (kvasir-vqa.md)
# --------------------------------------------------------------------------------------------------------------

YES_NO_LABELS: tuple[str, ...] = ("yes", "no")
GRID_CELLS: tuple[str, ...] = (
    "upper-left", "upper-center", "upper-right",
    "center-left", "center", "center-right",
    "lower-left", "lower-center", "lower-right",
)
COLOR_LABELS: tuple[str, ...] = (
    "pink", "red", "white", "yellow", "flesh", "brown", "grey", "green", "blue", "black", "orange", "purple",
    "none",
)
SIZE_BINS: tuple[str, ...] = ("none", "<5mm", "5-10mm", "11-20mm", ">20mm")
# Questions outside the templates that ask "how many" get 0..10: Kvasir counts are 0-6 (rarely 16), and a
# finite list keeps constrained decoding possible; the count tolerance in the metrics covers near misses.
UNTEMPLATED_COUNT_LABELS: tuple[str, ...] = tuple(str(n) for n in range(11))


def _counts(high: int) -> tuple[str, ...]:
    return tuple(str(n) for n in range(high + 1))


@dataclass(frozen=True)
class Template:
    """One Kvasir-VQA question template, spelled exactly as in the data (typos included)."""

    id: int
    question: str
    question_type: str
    multi_label: bool
    vocabulary: tuple[str, ...]


TEMPLATES: tuple[Template, ...] = (
    Template(1, "Is there text?", YES_NO, False, YES_NO_LABELS),
    Template(2, "Is this finding easy to detect?", YES_NO, False, ("yes", "no", "not relevant")),
    Template(3, "What type of procedure is the image taken from?", MCQ, False,
             ("colonoscopy", "gastroscopy", "capsule endoscopy")),
    Template(4, "Have all polyps been removed?", YES_NO, False, ("yes", "no", "not relevant")),
    Template(5, "Is there a green/black box artefact?", YES_NO, False, YES_NO_LABELS),
    Template(6, "How many instrumnets are in the image?", COUNT_NUMERIC, False, _counts(3)),
    Template(7, "How many findings are present?", COUNT_NUMERIC, False, _counts(6)),
    Template(8, "What type of polyp is present?", MCQ, True, ("none", "paris ip", "paris is", "paris iia")),
    # Multi-label only by accident (`5-10mm;<5mm`): the model answers one bin; the metrics still parse sets.
    Template(9, "What is the size of the polyp?", SIZE_NUMERIC, False, SIZE_BINS),
    Template(10, "Where in the image is the instrument?", MCQ, True, GRID_CELLS),
    Template(11, "How many polyps are in the image?", COUNT_NUMERIC, False, _counts(6)),
    Template(12, "Are there any instruments in the image? Check all that are present.", MCQ, True,
             ("none", "tube", "biopsy forceps", "polyp snare", "metal clip", "injection needle")),
    Template(13, "What color is the abnormality? If more than one separate with ;", COLOR, True, COLOR_LABELS),
    Template(14, "Are there any abnormalities in the image? Check all that are present.", MCQ, True,
             ("polyp", "ulcerative colitis", "oesophagitis", "barretts", "short-segment barretts", "hemorrhoids",
              "none")),
    Template(15, "Where in the image is the abnormality?", MCQ, True, GRID_CELLS),
    Template(16, "Does this image contain any finding?", YES_NO, False, YES_NO_LABELS),
    Template(17, "Where in the image is the anatomical landmark?", MCQ, True, GRID_CELLS),
    Template(18, "Are there any anatomical landmarks in the image? Check all that are present.", MCQ, True,
             ("none", "z-line", "cecum", "ileum", "pylorus")),
    Template(19, "What color is the anatomical landmark? If more than one separate with ;", COLOR, True,
             COLOR_LABELS),
)
TEMPLATE_BY_ID: dict[int, Template] = {t.id: t for t in TEMPLATES}

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
_COUNT_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)?|[a-z]+", re.ASCII)
_ZERO_WORDS = frozenset({"none", "no", "nothing"})


def parse_count(text: object) -> int | None:
    """The first count in an answer ("3", "3 polyps", "there are two", "none" -> 0); None if there is none."""
    if not isinstance(text, str):
        return None
    tokens = _COUNT_TOKEN.findall(text.lower())
    for token in tokens:
        if token[0].isdigit():
            if len(token) > 9:
                return None
            value = float(token)
            return int(value) if value.is_integer() else None
        if token in _NUMBER_WORDS:
            return _NUMBER_WORDS[token]
    return 0 if any(token in _ZERO_WORDS for token in tokens) else None


# --------------------------------------------------------------------------------------------------------------
# Question typing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeInfo:
    """What a question asks for: its type, its Kvasir template (if any), and options it spells out itself."""

    question_type: str
    template: int | None
    multi_label: bool
    options: tuple[str, ...] = ()


# Spelling variants seen in the data or likely in re-phrasings; both templates and questions go through this.
_WORD_VARIANTS = {
    "artifact": "artefact", "artifacts": "artefacts",
    "colour": "color", "colours": "colors", "coloured": "colored",
    "instrumnets": "instruments", "instrumnet": "instrument",
}
_WORD = re.compile(r"[a-z0-9]+", re.ASCII)


def _template_key(text: str) -> str:
    """Letters and digits only, variants unified: punctuation and spacing never decide a template."""
    return " ".join(_WORD_VARIANTS.get(w, w) for w in _WORD.findall(text.lower()))


_TEMPLATE_BY_KEY: dict[str, Template] = {_template_key(t.question): t for t in TEMPLATES}
# Fuzzy matching (difflib, standard library) catches one- or two-letter slips in long template questions
# ("finding"/"findings", a dropped letter) that a variant map cannot enumerate. It is restricted to keys longer
# than 20 characters, where two letters cannot turn one template into another, and it counts edits from
# difflib's opcodes, an upper bound on the edit distance, so it never accepts more than two real edits.
_FUZZY_MIN_LENGTH = 20
_FUZZY_MAX_EDITS = 2


def _edits_at_most(a: str, b: str) -> int:
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def _match_template(key: str) -> Template | None:
    if (exact := _TEMPLATE_BY_KEY.get(key)) is not None:
        return exact
    if len(key) <= _FUZZY_MIN_LENGTH:
        return None
    close = [
        (edits, t) for k, t in _TEMPLATE_BY_KEY.items()
        if abs(len(k) - len(key)) <= _FUZZY_MAX_EDITS and (edits := _edits_at_most(key, k)) <= _FUZZY_MAX_EDITS
    ]
    close.sort(key=lambda pair: pair[0])
    if not close or (len(close) > 1 and close[0][0] == close[1][0]):
        return None  # no match, or an ambiguous one: let the rules decide
    return close[0][1]


_YES_NO_OPENERS = frozenset((
    "is", "are", "does", "do", "has", "have", "can", "was", "were", "did", "will", "should", "could",
    "would", "may", "might", "must", "shall", "had", "am", "isn't", "aren't", "doesn't", "don't",
    "hasn't", "haven't", "wasn't", "weren't", "didn't", "won't", "can't", "cannot", "shouldn't",
    "couldn't", "wouldn't",
))
_WH_OPENERS = frozenset(("which", "what", "how", "where", "who", "whom", "whose", "when", "why"))
# "what/which ... colour" within three words: "what colour", "which colours", "what is the colour".
_COLOR_STRONG = re.compile(r"\b(?:what|which)\b(?:\W+\w+){0,3}?\W+colou?rs?\b")
_COUNT_STRONG = re.compile(r"\bhow\s+many\b")
_SIZE_STRONG = re.compile(
    r"\bwhat\s+(?:is\s+the\s+)?(?:size|diameter|dimension)s?\b|\bhow\s+(?:big|large|wide|long)\b"
)
_COUNT_WEAK = re.compile(r"\bnumber\s+of\b|\bcount\b")
_SIZE_WEAK = re.compile(r"[0-9]\s*(?:mm|cm)\b|\bmm\b|millimet|centimet|\bsize\b|\bdiameter\b")
_COLOR_WEAK = re.compile(r"\bcolou?r")
_MULTI_CUES = re.compile(r";|more than one|check all|select all|all that apply|all that are present|list all")

_SENTENCE_END = re.compile(r"[?!]+|\.(?=\s|$)")
_OPTION_SPLIT = re.compile(r"\s*,\s*(?:or\s+)?|\s+or\s+")
_NOT_AN_OPTION = frozenset({"not", "no", "none", "otherwise", "neither"})
_ARTICLES = ("a ", "an ", "the ", "either ")
# Words that end an option when reading the first clause backwards ("is the polyp | pedunculated or sessile").
_OPTION_STOP_WORDS = _YES_NO_OPENERS | _WH_OPENERS | frozenset((
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "there", "here", "with", "by",
    "from", "of", "in", "on", "at", "as", "to", "via", "using", "taken", "seen", "shown", "visible",
    "present", "image", "picture", "photo", "frame", "finding", "findings", "polyp", "polyps", "lesion",
    "lesions", "abnormality", "instrument", "instruments", "landmark", "procedure", "mucosa", "area",
    "region", "either",
))
_CHOICE_OPENERS = _YES_NO_OPENERS | _WH_OPENERS | {"either"}
_MAX_OPTION_WORDS = 6
_MAX_OPTIONS = 12


def _clean_option(option: str) -> str:
    option = option.strip(" \t\"'`.,:;!?()[]")
    while option.startswith(_ARTICLES):
        option = option.split(" ", 1)[1].lstrip() if " " in option else ""
    return _normalise_label(option)


def _options_in_sentence(sentence: str) -> tuple[str, ...]:
    sentence = sentence.strip(" ,:;")
    _, colon, after_colon = sentence.rpartition(":")
    body = after_colon if colon else sentence
    items = _OPTION_SPLIT.split(body.strip())
    if len(items) < 2:
        return ()
    first_words = items[0].split()
    opener = first_words[0] if first_words else ""
    if not colon:
        if opener in _YES_NO_OPENERS and "any" in first_words:
            return ()  # "are there any polyps or ulcers?" asks whether, not which
        if opener in _WH_OPENERS and len(items) >= 3:
            items = items[1:]  # "which is it, A or B": the first clause is a lead-in, not an option
        else:
            others = [_clean_option(item).split() for item in items[1:]]
            width = max(1, min((len(words) for words in others if words), default=1))
            tail = [first_words[-1]] if first_words else []
            for word in reversed(first_words[:-1]):
                if len(tail) >= width or word in _OPTION_STOP_WORDS:
                    break
                tail.insert(0, word)
            if opener not in _CHOICE_OPENERS and len(tail) != len(first_words):
                return ()  # "describe the image or the polyp" is an instruction, not a choice
            items = [" ".join(tail), *items[1:]]
    options = [_clean_option(item) for item in items]
    if options[-1] in _NOT_AN_OPTION:
        return ()  # "A or not" is a yes/no question
    # ";" is the label separator: an option containing it could never equal a normalised answer.
    if any(not o or ";" in o or len(o.split()) > _MAX_OPTION_WORDS for o in options):
        return ()
    unique = tuple(dict.fromkeys(options))
    return unique if 2 <= len(unique) <= _MAX_OPTIONS else ()


def parse_choice_options(question: str) -> tuple[str, ...]:
    """Options a question spells out ("A or B", "A, B or C", "which is it: A, B, or C"); () if none.

    A heuristic, by design: it reads the first sentence containing " or " and takes the words just before the
    first "or" back to the nearest function word as the first option.
    """
    text = _normalise_question(question if isinstance(question, str) else "")
    for sentence in _SENTENCE_END.split(text):
        if re.search(r"\bor\b", sentence):
            options = _options_in_sentence(sentence)
            if options:
                return options
    return ()


def _normalise_question(question: str) -> str:
    text = " ".join(question.lower().replace("\u2019", "'").split())
    return _WORD.sub(lambda m: _WORD_VARIANTS.get(m.group(), m.group()), text)


@lru_cache(maxsize=1 << 16)
def _infer_normalised(text: str) -> TypeInfo:
    template = _match_template(_template_key(text))
    if template is not None:
        return TypeInfo(template.question_type, template.id, template.multi_label)
    multi = bool(_MULTI_CUES.search(text))
    options = parse_choice_options(text)
    words = text.split()
    opener = words[0].strip("\"'`([{") if words else ""
    # Strong phrases ("how many", "what colour") win over a yes/no opener: "can you tell how many polyps ...".
    if _COLOR_STRONG.search(text):
        return TypeInfo(COLOR, None, multi, options)
    if _COUNT_STRONG.search(text):
        return TypeInfo(COUNT_NUMERIC, None, multi, options)
    if _SIZE_STRONG.search(text):
        return TypeInfo(SIZE_NUMERIC, None, multi, options)
    if options:
        return TypeInfo(MCQ, None, multi, options)
    # A yes/no opener wins over weak mentions: "is the polyp larger than 10 mm?" is answered yes or no.
    if opener in _YES_NO_OPENERS:
        return TypeInfo(YES_NO, None, False)
    if _COUNT_WEAK.search(text):
        return TypeInfo(COUNT_NUMERIC, None, multi)
    if _SIZE_WEAK.search(text):
        return TypeInfo(SIZE_NUMERIC, None, multi)
    if _COLOR_WEAK.search(text):
        return TypeInfo(COLOR, None, multi)
    return TypeInfo(OPEN_ENDED, None, False)


@lru_cache(maxsize=1 << 16)
def _infer_raw(question: str) -> TypeInfo:
    return _infer_normalised(_normalise_question(question))


def infer_question_type(question: str) -> TypeInfo:
    """Type a question: a Kvasir template if it is one (up to case, spacing, punctuation, spelling), else rules.

    Rules, in order: what colour -> color; how many -> count_numeric; what size / how big -> size_numeric
    (these keep any options the question lists); explicit choice -> mcq; yes/no opener -> yes_no;
    "number of" / "count" -> count_numeric; mm / size -> size_numeric; colour -> color; else open_ended.
    Cached, because a dataset repeats a handful of questions tens of thousands of times.
    """
    return _infer_raw(question if isinstance(question, str) else "")


# --------------------------------------------------------------------------------------------------------------
# Candidate answers
# --------------------------------------------------------------------------------------------------------------


def _merge_vocabulary(documented: tuple[str, ...], seen: set[str]) -> list[str]:
    return [*documented, *sorted(seen - set(documented))]


def build_candidate_vocabulary(train_rows: Iterable[tuple[str, str]]) -> dict[int, list[str]]:
    """Per template: the documented labels, then the extra single labels seen in TRAINING answers, sorted.

    Feed training rows only: a label seen only in validation or test must not become a candidate, or the
    closed-set decoder would be handed answers it could not have learnt.
    """
    seen: dict[int, set[str]] = {t.id: set() for t in TEMPLATES}
    for question, answer in train_rows:
        if is_bad_answer(answer):
            continue
        template = infer_question_type(question).template
        if template is not None:
            seen[template].update(split_labels(answer))
    return {t.id: _merge_vocabulary(t.vocabulary, seen[t.id]) for t in TEMPLATES}


def build_candidate_vocabulary_for_split(
    rows: Iterable[tuple[str, str, str]], train_split: str = "train"
) -> dict[int, list[str]]:
    """As build_candidate_vocabulary, from (split, question, answer) rows: only `train_split` rows count."""
    return build_candidate_vocabulary((q, a) for split, q, a in rows if split == train_split)


def candidates_for(type_info: TypeInfo, vocabulary_by_template: Mapping[int, list[str]]) -> list[str]:
    """The closed answer set for a typed question; [] means "generate freely" (open_ended)."""
    if type_info.template is not None:
        vocabulary = vocabulary_by_template.get(type_info.template)
        if vocabulary is None:
            vocabulary = TEMPLATE_BY_ID[type_info.template].vocabulary
        return list(vocabulary)
    if type_info.options:
        return list(type_info.options)
    return list({
        YES_NO: YES_NO_LABELS,
        COLOR: COLOR_LABELS,
        SIZE_NUMERIC: SIZE_BINS,
        COUNT_NUMERIC: UNTEMPLATED_COUNT_LABELS,
    }.get(type_info.question_type, ()))


def typed_record_fields(question: str, vocabulary_by_template: Mapping[int, list[str]]) -> dict:
    """The typing fields `prepare` stores in every record."""
    info = infer_question_type(question)
    return {
        "question_type": info.question_type,
        "template": info.template,
        "multi_label": info.multi_label,
        "candidates": candidates_for(info, vocabulary_by_template),
    }
