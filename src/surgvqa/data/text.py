"""A raw row's question and answer cells as clean text."""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Control characters (NUL included) and lone surrogates are removed from text: they mean nothing in a question,
# a NUL ends strings in C code under the tokenizer, and a lone surrogate cannot be written as UTF-8. Tab and
# newline stay. A regular expression because no library function removes exactly these.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# Invisible characters that never carry meaning (zero-width space, word joiner, byte-order mark) go everywhere,
# so that "yes\u200b" is "yes"; the joiners and direction marks, which shape some scripts, only at the ends.
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")
_INVISIBLE_ENDS = "\u200c\u200d\u200e\u200f\u2061\u2062\u2063\u2064"


def clean_text(value: str) -> str:
    text = _INVISIBLE.sub("", _UNPRINTABLE.sub("", value))
    previous = None
    while previous != text:  # white space and invisible marks may alternate at an end
        previous, text = text, text.strip().strip(_INVISIBLE_ENDS)
    return text


def question_text(value: Any) -> str | None:
    """The question as clean text; None when it is not text at all (a list or an object)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (str, int, float)):
        return clean_text(str(value))
    return None


def answer_text(value: Any) -> str | None:
    """The answer as clean text; a list of labels (a JSON array, a parquet list) becomes the multi-label "a; b".

    None when the value is no answer (a JSON object).
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy values from parquet/datasets
        value = value.tolist()
    if isinstance(value, str):
        text = clean_text(value)
        if text.startswith("[") and text.endswith("]"):  # a list written into a CSV cell as JSON
            try:
                parsed = json.loads(text)
            except ValueError:
                return text
            return answer_text(parsed) if isinstance(parsed, list) else text
        return text
    if isinstance(value, (list, tuple)):
        labels = [answer_text(item) for item in value if item is not None]
        if any(label is None for label in labels):
            return None
        return "; ".join(label for label in labels if label)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, dict):
        return None
    if isinstance(value, bool):  # a JSON true/false answers a yes/no question; str() would give "True"
        return "yes" if value else "no"
    return clean_text(str(value))
