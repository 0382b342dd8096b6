"""Compatibility names: the generic answer functions (:mod:`surgvqa.data.answers`) and Kvasir-VQA's templates,
typing and candidates (:mod:`surgvqa.tasks.kvasir_vqa`) under the module path earlier code imported them from.

New code imports from those two modules directly: a dataset's specifics belong to its task module.
"""

from __future__ import annotations

from surgvqa.data.answers import (
    CLOSED_TYPES,
    COLOR,
    COUNT_NUMERIC,
    MCQ,
    OPEN_ENDED,
    QUESTION_TYPES,
    SIZE_NONE,
    SIZE_NUMERIC,
    YES_NO,
    SizeInterval,
    SizeMarker,
    SizeValue,
    interval_distance_mm,
    is_bad_answer,
    label_set,
    normalize_answer,
    parse_count,
    parse_size_labels,
    parse_size_mm,
    split_labels,
)
from surgvqa.tasks.kvasir_vqa import (
    COLOR_LABELS,
    GRID_CELLS,
    SIZE_BINS,
    TEMPLATE_BY_ID,
    TEMPLATES,
    UNTEMPLATED_COUNT_LABELS,
    YES_NO_LABELS,
    Template,
    TypeInfo,
    build_candidate_vocabulary,
    build_candidate_vocabulary_for_split,
    candidates_for,
    infer_question_type,
    parse_choice_options,
    typed_record_fields,
)

__all__ = [
    "CLOSED_TYPES", "COLOR", "COLOR_LABELS", "COUNT_NUMERIC", "GRID_CELLS", "MCQ", "OPEN_ENDED", "QUESTION_TYPES",
    "SIZE_BINS", "SIZE_NONE", "SIZE_NUMERIC", "TEMPLATES", "TEMPLATE_BY_ID", "UNTEMPLATED_COUNT_LABELS", "YES_NO",
    "YES_NO_LABELS", "SizeInterval", "SizeMarker", "SizeValue", "Template", "TypeInfo",
    "build_candidate_vocabulary", "build_candidate_vocabulary_for_split", "candidates_for", "infer_question_type",
    "interval_distance_mm", "is_bad_answer", "label_set", "normalize_answer", "parse_choice_options",
    "parse_count", "parse_size_labels", "parse_size_mm", "split_labels", "typed_record_fields",
]
