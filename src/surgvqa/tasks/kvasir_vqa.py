"""The Kvasir-VQA task: its columns, question templates, typing rules, candidates, prompt, modes and metric groups.

Kvasir-VQA (``SimulaMet-HOST/Kvasir-VQA``) asks 19 templated questions about 6,500 endoscopy images; answers are
short closed labels (``kvasir-vqa.md`` beside the design notes). Everything this dataset decides is here:
templates and their answer vocabularies, how a question is typed and which candidates it gets, the training
target, which prediction method answers which question, and how rows are grouped for scoring (per type and per
template). The generic stages ask the task through :class:`surgvqa.tasks.base.Task`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from surgvqa.data.answers import (
    COLOR,
    COUNT_NUMERIC,
    MCQ,
    OPEN_ENDED,
    QUESTION_TYPES,
    SIZE_NUMERIC,
    YES_NO,
    _normalise_label,
    has_text,
    is_bad_answer,
    parse_count,
    split_labels,
)
from surgvqa.data.records import Record
from surgvqa.tasks.base import Task

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
            # A label without a letter or digit, or a count label that is no whole number ("1,000", "-2"), is no
            # answer the decoder should offer; prepare rejects such rows, this keeps any other caller safe too.
            counts = TEMPLATE_BY_ID[template].question_type == COUNT_NUMERIC
            seen[template].update(label for label in split_labels(answer)
                                  if has_text(label) and not (counts and parse_count(label) is None))
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


# --------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------


class KvasirVQA(Task):
    """Kvasir-VQA: templated closed questions, split here by image and source, scored per type and template."""

    name = "kvasir-vqa"
    question_types = QUESTION_TYPES
    templates_by_id = TEMPLATE_BY_ID

    def initial_type(self, question: str) -> str:
        return infer_question_type(question).question_type

    def build_vocabulary(self, train_records: Iterable[Record]) -> dict[Any, list[str]]:
        return build_candidate_vocabulary((r.question, r.answer) for r in train_records)

    def type_record(self, record: Record, vocabulary: Mapping[Any, list[str]]) -> None:
        typed = typed_record_fields(record.question, vocabulary)
        record.question_type = typed["question_type"]
        record.template = typed["template"]
        record.multi_label = typed["multi_label"]
        record.candidates = list(typed["candidates"])

    def group_key(self, record: Record) -> str:
        return f"{record.template:02d}" if record.template else "none"
