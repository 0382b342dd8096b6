"""Kvasir-VQA-x1's text fields: free-text normalisation for exact match, and the question classes of a row."""

from __future__ import annotations

import json
import re
import string
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_text(text: str) -> str:
    """Lower case, punctuation and articles removed, white space collapsed: the usual normalisation for exact
    match on free-text answers (SQuAD's); five lines, so written here rather than pulling a metric package."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def question_classes(value: Any) -> list[str]:
    """x1's question_class as a list of labels, whether stored as a list, an array, a JSON string or a string."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except ValueError:
                value = [part for part in re.split(r"[,;]", stripped.strip("[]")) if part.strip()]
        else:
            value = [part for part in re.split(r"[;,]", stripped) if part.strip()]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(item).strip().strip("'\"") for item in value if str(item).strip()]


def original_problem(value: Any) -> str | None:
    """Why an x1 ``original`` cannot be read as JSON (None when it can, or is absent): such a row would drop out
    of atomic-fact recall without a word."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        json.loads(value)
    except ValueError as exc:
        return str(exc)
    return None
