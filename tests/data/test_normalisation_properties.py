"""Properties of answer normalisation and the parsers, over arbitrary text."""

from hypothesis import given, settings
from hypothesis import strategies as st

from surgvqa.data.answers import (
    QUESTION_TYPES,
    normalize_answer,
    parse_count,
    parse_size_labels,
    parse_size_mm,
    split_labels,
)
from surgvqa.tasks.kvasir_vqa import TypeInfo, infer_question_type

EXAMPLES = settings(max_examples=300, deadline=None)
label_text = st.text(alphabet=st.characters(blacklist_characters=";"), max_size=20)


@EXAMPLES
@given(st.text())
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@EXAMPLES
@given(st.lists(label_text, min_size=1, max_size=6), st.randoms(use_true_random=False), st.booleans())
def test_multi_label_order_and_separator_do_not_matter(labels, rng, spaced):
    shuffled = list(labels)
    rng.shuffle(shuffled)
    separator = "; " if spaced else ";"
    assert normalize_answer(separator.join(shuffled)) == normalize_answer(";".join(labels))
    assert split_labels(separator.join(shuffled)) == split_labels("; ".join(labels))


@EXAMPLES
@given(st.text())
def test_parsers_never_raise(text):
    parse_size_mm(text)
    parse_size_labels(text)
    assert parse_count(text) is None or parse_count(text) >= 0


@EXAMPLES
@given(st.text())
def test_typing_never_raises_and_returns_a_known_type(text):
    info = infer_question_type(text)
    assert isinstance(info, TypeInfo)
    assert info.question_type in QUESTION_TYPES


@EXAMPLES
@given(st.text(alphabet="abcdeiorstwy ,:?;-<>0123456789mc", max_size=60))
def test_parsers_never_raise_on_dense_syntax(text):
    # A small alphabet full of the characters the regexes care about reaches their corner cases far more often.
    parse_size_mm(text)
    parse_size_labels(text)
    parse_count(text)
    assert infer_question_type(text).question_type in QUESTION_TYPES
