"""Closed-set decoding components over the real Qwen2 vocabulary, without a model.

The property tests drive :class:`CandidateLogitsProcessor` with random logits over the whole vocabulary, so every
reachable path through the tries gets exercised: whatever the scores, the output must be a candidate (or distinct
candidates joined by "; ") followed by the end token, within the derived token budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgvqa.data.answers import answer_meaning
from surgvqa.inference.decoding import (
    CandidateLogitsProcessor,
    CandidateMatcher,
    CandidateScore,
    best_label,
    best_label_pooled,
    calibrate_threshold,
    candidate_set,
    max_new_tokens,
    select_labels,
)
from surgvqa.models.loading import register_sentinel_tokens
from surgvqa.models.tiny import IM_END_ID, build_tokenizer
from surgvqa.tasks.kvasir_vqa import GRID_CELLS, SIZE_BINS, TEMPLATE_BY_ID

TRICKY = ["short-segment barretts", "11-20mm", "<5mm", ">20mm", "5-10mm", "lower-rigth", "upper-left", "none",
          "paris iia", "paris is", "paris ip", "0", "1", "10", "16", "yes", "no", "not relevant", "z-line",
          "biopsy forceps", "capsule endoscopy", "center", "center-left", "pink", "grey", "red"]
# Random labels may end in punctuation, start with a digit or a space, and be prefixes of one another.
random_label = st.text(alphabet="abcxyz<>-0123456789 ./", min_size=1, max_size=10).filter(lambda s: s.strip())
candidate_lists = st.lists(st.one_of(st.sampled_from(TRICKY), random_label), min_size=1, max_size=9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def score_pool(tokenizers) -> torch.Tensor:
    """Random logits over the whole vocabulary; each step draws one of these per row (cheaper than randn)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((24, len(tokenizers["sentinel"][0])), generator=generator) * 4


@pytest.fixture(scope="module")
def tokenizers():
    span = build_tokenizer()
    sentinel = build_tokenizer()
    _, close_id = register_sentinel_tokens(sentinel)
    return {"span": (span, IM_END_ID), "sentinel": (sentinel, close_id)}


def greedy_through(processor: CandidateLogitsProcessor, rows: int, pool: torch.Tensor, vocab: int, budget: int,
                   generator: torch.Generator, terminators: list[int]) -> list[list[int]]:
    """What ``generate`` does with the processor: argmax of processed scores, finished rows padded."""
    ids = torch.zeros((rows, 3), dtype=torch.long)  # a stand-in prompt
    outputs: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    for _ in range(budget):
        draw = torch.randint(0, len(pool), (rows,), generator=generator)
        scores = processor(ids, pool[draw, :vocab])
        chosen = scores.argmax(-1).tolist()
        for row, token in enumerate(chosen):
            if finished[row]:
                chosen[row] = 0
                continue
            outputs[row].append(token)
            finished[row] = token == terminators[row]
        ids = torch.cat([ids, torch.tensor(chosen)[:, None]], dim=1)
        if all(finished):
            break
    return outputs


def assert_valid(tokenizer, candidates, multi_label: bool, terminator: int, tokens: list[int]) -> list[str]:
    assert tokens and tokens[-1] == terminator, f"no end token: {tokens}"
    assert terminator not in tokens[:-1]
    text = tokenizer.decode(tokens[:-1], clean_up_tokenization_spaces=False)
    labels = text.split("; ")
    valid = {label.strip() for label in candidates}
    assert all(label in valid for label in labels), (text, candidates)
    distinct = labels[:-1] if len(labels) > 1 and labels[-1] in labels[:-1] else labels  # a repeat ends it
    assert len(set(distinct)) == len(distinct), f"repeated label before the end in {text!r}"
    assert multi_label or len(labels) == 1
    return distinct


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(candidate_lists, st.booleans()), min_size=1, max_size=4),
       st.sampled_from(["span", "sentinel"]), st.integers(0, 2**31 - 1))
def test_random_logits_always_give_a_valid_answer(tokenizers, score_pool, rows, strategy, seed):
    tokenizer, terminator = tokenizers[strategy]
    sets = [candidate_set(tokenizer, candidates, multi, terminator) for candidates, multi in rows]
    budget = max(max_new_tokens(cs) for cs in sets)
    outputs = greedy_through(CandidateLogitsProcessor(sets), len(sets), score_pool, len(tokenizer), budget,
                             torch.Generator().manual_seed(seed), [terminator] * len(sets))
    for (candidates, multi), cs, tokens in zip(rows, sets, outputs):
        assert len(tokens) <= max_new_tokens(cs)
        assert_valid(tokenizer, candidates, multi, terminator, tokens)


def test_mixed_batch_with_free_rows_and_many_seeds(tokenizers, score_pool):
    """Kvasir-like candidate sets side by side with an unconstrained row; many seeds, every outcome checked."""
    tokenizer, terminator = tokenizers["span"]
    rows = [(list(TEMPLATE_BY_ID[14].vocabulary), True), (list(SIZE_BINS), False), (list(GRID_CELLS), True),
            (["yes", "no"], False), (list(TEMPLATE_BY_ID[13].vocabulary), True)]
    sets = [candidate_set(tokenizer, c, m, terminator) for c, m in rows] + [None]
    seen: set[str] = set()
    for seed in range(60):
        outputs = greedy_through(CandidateLogitsProcessor(sets), len(sets), score_pool, len(tokenizer), 30,
                                 torch.Generator().manual_seed(seed), [terminator] * len(sets))
        for (candidates, multi), tokens in zip(rows, outputs):
            seen.add("; ".join(assert_valid(tokenizer, candidates, multi, terminator, tokens)))
        assert len(outputs[-1]) >= 1  # the free row ran, unconstrained
    assert len(seen) > 100  # random logits really explore the tries (multi-label combinations included)


def test_tokens_follow_canonical_tokenisation(tokenizers):
    """For Kvasir-style labels the trie pieces concatenate to the tokenizer's own tokenisation of the answer."""
    tokenizer, terminator = tokenizers["span"]
    labels = list(TEMPLATE_BY_ID[14].vocabulary) + ["11-20mm", "<5mm", "lower-rigth"]
    cs = candidate_set(tokenizer, labels, True, terminator)
    for i, j in [(4, 0), (7, 8), (9, 4), (2, 7)]:
        joined = tokenizer.encode(f"{labels[i]}; {labels[j]}", add_special_tokens=False)
        assert joined == [*cs.first[i], *cs.following[j]]


def test_budget_is_the_longest_valid_output(tokenizers):
    tokenizer, terminator = tokenizers["span"]
    single = candidate_set(tokenizer, ["yes", "short-segment barretts", "<5mm"], False, terminator)
    assert max_new_tokens(single) == len(tokenizer.encode("short-segment barretts")) + 1
    labels = ["short-segment barretts", "11-20mm", "<5mm", "no"]
    multi = candidate_set(tokenizer, labels, True, terminator)
    every_label = max(len(tokenizer.encode("; ".join([first, *[x for x in labels if x != first]])))
                      for first in labels)
    closing_repeat = max(len(tokenizer.encode("; " + label, add_special_tokens=False)) for label in labels)
    assert max_new_tokens(multi) == every_label + closing_repeat + 1
    # All but the shortest label, then the longest one repeated: longer than every label once, still in budget.
    repeat_last = tokenizer.encode("short-segment barretts; 11-20mm; <5mm; short-segment barretts")
    assert every_label + 1 < len(repeat_last) + 1 <= max_new_tokens(multi)


def test_a_repeat_can_only_end_the_answer(tokenizers):
    tokenizer, terminator = tokenizers["span"]
    cs = candidate_set(tokenizer, ["red", "pink", "white"], True, terminator)
    red = tokenizer.encode(" red", add_special_tokens=False)[0]
    matcher = CandidateMatcher(cs)
    for token in tokenizer.encode("red; pink", add_special_tokens=False):
        matcher.advance(token)
    assert terminator in matcher.allowed() and len(matcher.allowed()) == 2  # end, or "; " for the next label
    matcher.advance(terminator)
    assert matcher.done and matcher.labels == ["red", "pink"]

    again = CandidateMatcher(cs)
    for token in tokenizer.encode("red;", add_special_tokens=False):
        again.advance(token)
    assert red in again.allowed()  # a repeat is allowed ...
    again.advance(red)
    assert again.allowed() == [terminator]  # ... and closes the answer
    with pytest.raises(ValueError):
        again.advance(tokenizer.encode(";", add_special_tokens=False)[0])
    again.advance(terminator)
    assert again.done and again.labels == ["red"]

    every = CandidateMatcher(candidate_set(tokenizer, ["red", "pink"], True, terminator))
    for token in tokenizer.encode("red; pink", add_special_tokens=False):
        every.advance(token)
    assert every.allowed() == [terminator]  # every label used: only the end is left
    with pytest.raises(ValueError):
        CandidateMatcher(candidate_set(tokenizer, ["yes", "no"], False, terminator)).advance(terminator)


def test_candidate_set_rejects_empty_and_separator(tokenizers):
    tokenizer, terminator = tokenizers["span"]
    with pytest.raises(ValueError):
        candidate_set(tokenizer, ["", "  "], False, terminator)
    with pytest.raises(ValueError):
        candidate_set(tokenizer, ["a;b"], False, terminator)
    assert candidate_set(tokenizer, ["no", "no ", "yes"], False, terminator).labels == ("no", "yes")


def test_select_labels_keeps_the_best_and_adds_those_over_threshold():
    scores = [CandidateScore(-1.0, -0.5), CandidateScore(-3.0, -1.0), CandidateScore(-0.5, -0.5)]
    assert select_labels(scores, False, -100.0) == [2]
    assert select_labels(scores, True, None) == [2]
    assert select_labels(scores, True, math.inf) == [2]
    assert select_labels(scores, True, -0.75) == [2, 0]
    assert select_labels(scores, True, -2.0) == [2, 0, 1]


def test_labels_of_one_meaning_pool_their_likelihood():
    # Measured on the learning benchmark: the probability of ">20mm" was split with the stray ">20".
    labels = ["none", "5-10mm", ">20mm", ">20"]
    scores = [CandidateScore(s, s) for s in (-8.0, -1.107, -1.133, -2.882)]
    assert labels[best_label(scores)] == "5-10mm"
    meanings = [answer_meaning("size_numeric", label) for label in labels]
    assert meanings[2] == meanings[3] != meanings[1]
    assert labels[best_label_pooled(scores, meanings)] == ">20mm"  # the likelier spelling of the pooled answer
    assert answer_meaning("count_numeric", "3") == 3 and answer_meaning("color", "red") == "red"
    distinct = [answer_meaning("color", label) for label in ("red", "pink", "white")]
    for sums in [(-1.0, -2.0, -3.0), (-2.0, -0.5, -0.5), (-4.0, -4.0, -1.0)]:
        row = [CandidateScore(s, s) for s in sums]
        assert best_label_pooled(row, distinct) == best_label(row)  # distinct meanings: the plain best sum


def test_calibrated_threshold_maximises_set_exact_match():
    def s(mean):
        return CandidateScore(mean * 2, mean)

    labels = ("a", "b", "c")
    examples = [(labels, [s(-0.1), s(-0.3), s(-2.0)], frozenset("ab")),
                (labels, [s(-0.2), s(-1.5), s(-0.4)], frozenset("ac")),
                (labels, [s(-0.1), s(-0.9), s(-3.0)], frozenset("a"))]
    threshold, match = calibrate_threshold(examples)
    assert match == 1.0 and -0.9 < threshold <= -0.4
    assert calibrate_threshold([]) == (math.inf, 0.0)
