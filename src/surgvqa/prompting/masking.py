"""Answer-only label masking by character offsets.

The supervised span is located in the rendered conversation by *character* offsets and mapped to tokens through
the tokenizer's offset mapping — never by searching for a token subsequence. With the real Qwen2 vocabulary BPE
merges across text boundaries (``>No``, ``><``, ``.</`` are single tokens), so a subsequence search for the
tokens of ``<ANS>`` silently finds nothing, or finds an answer whose first token differs from inference.

A token that straddles a span boundary (half sentinel, half answer) cannot be labelled correctly either way; it
is reported as a problem so that the diagnostic flags the sample instead of training on a wrong label.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from surgvqa.models.special_tokens import ANSWER_CLOSE, ANSWER_OPEN
from surgvqa.prompting.chat import END_OF_TURN, RenderedChat

IGNORE_INDEX = -100


def supervised_char_spans(rendered: RenderedChat, strategy: str) -> list[tuple[int, int]]:
    """Character spans of the rendered (unexpanded) text that carry loss.

    ``span``: the answer and the end-of-turn token. ``sentinel``: the answer, the closing sentinel and the
    end-of-turn token; the opening sentinel is part of the prompt (inference starts the turn with it).
    """
    start = rendered.prompt_chars
    if strategy == "sentinel":
        start += len(ANSWER_OPEN)
    end = rendered.prompt_chars + len(rendered.content) + len(END_OF_TURN)
    return [(start, end)]


def shift_for_expansion(spans: Sequence[tuple[int, int]],
                        replacements: Sequence[dict]) -> list[tuple[int, int]]:
    """Map spans of the unexpanded text to the text after ``<|image_pad|>`` expansion.

    ``replacements`` are the processor's ``text_replacement_offsets``: for each placeholder its ``span`` in the
    original text and its ``new_span`` in the expanded text, in order.
    """
    placeholder_ends = [item["span"][1] for item in replacements]
    chars_gained = [0] + [item["new_span"][1] - item["span"][1] for item in replacements]

    def shift(char: int) -> int:
        return char + chars_gained[bisect.bisect_right(placeholder_ends, char)]

    return [(shift(start), shift(end)) for start, end in spans]


@dataclass(frozen=True)
class TokenLabels:
    labels: list[int]
    straddling: list[int]  # positions of tokens that cross a span boundary


def labels_from_offsets(input_ids: Sequence[int], offsets: Sequence[Sequence[int]],
                        spans: Sequence[tuple[int, int]]) -> TokenLabels:
    """Label tokens wholly inside a span with their id, others with IGNORE_INDEX; report boundary-crossers."""
    labels = [IGNORE_INDEX] * len(input_ids)
    straddling = []
    for position, (token_id, (token_start, token_end)) in enumerate(zip(input_ids, offsets)):
        if token_end <= token_start:  # zero-width: padding or a token with no text
            continue
        for span_start, span_end in spans:
            if span_start <= token_start and token_end <= span_end:
                labels[position] = int(token_id)
                break
            if token_start < span_start < token_end or token_start < span_end < token_end:
                straddling.append(position)
                break
    return TokenLabels(labels, straddling)


def expected_supervised_text(answer: str, strategy: str) -> str:
    """What the supervised tokens must decode to, exactly."""
    return answer + (ANSWER_CLOSE if strategy == "sentinel" else "") + END_OF_TURN
