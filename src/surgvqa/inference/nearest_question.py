"""A text-only baseline: answer each test question with the answer of the most similar training question.

It never sees the image, so the distance between a trained model and this baseline is what the model takes from
the pixels (beyond the question priors a language model can learn from the text alone). Similarity is TF-IDF
cosine over word tokens, computed through an inverted index (numpy only: no sparse-matrix library is installed,
and an index keeps 16k x 140k questions, the x1 scale, to seconds). Ties go to the earliest training row.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from surgvqa.core.io import write_jsonl
from surgvqa.data.records import Record, read_records
from surgvqa.inference.prediction_files import prediction_row
from surgvqa.inference.predictor import Outcome
from surgvqa.tasks import get_task

MODE = "nearest-question"
_WORD = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def nearest_training_rows(train: Sequence[Record], questions: Sequence[str]) -> list[int]:
    """For each question, the index of the training record whose question is most similar (TF-IDF cosine)."""
    documents = [Counter(_tokens(record.question)) for record in train]
    frequency: Counter = Counter(token for document in documents for token in document)
    idf = {token: math.log((1 + len(train)) / (1 + count)) + 1.0 for token, count in frequency.items()}
    postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
    norms = np.zeros(len(train))
    for index, document in enumerate(documents):
        weights = {token: count * idf[token] for token, count in document.items()}
        norms[index] = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        for token, weight in weights.items():
            postings[token].append((index, weight))
    arrays = {token: (np.array([i for i, _ in items]), np.array([w for _, w in items]))
              for token, items in postings.items()}
    nearest = []
    for question in questions:
        query = {token: count * idf[token] for token, count in Counter(_tokens(question)).items() if token in idf}
        scores = np.zeros(len(train))
        for token, weight in query.items():
            indices, weights = arrays[token]
            scores[indices] += weight * weights
        nearest.append(int(np.argmax(scores / norms)))  # argmax: the first of equal scores
    return nearest


def nearest_question_predictions(prepared_dir: Path, split: str, out: Path) -> Path:
    """Write ``out``: one prediction row per record of ``split``, answered from the training split's answers."""
    train = read_records(prepared_dir / "train.jsonl")
    records = read_records(prepared_dir / f"{split}.jsonl")
    if not train:
        raise ValueError(f"{prepared_dir / 'train.jsonl'} holds no records to answer from")
    nearest = nearest_training_rows(train, [record.question for record in records])
    rows = []
    for record, index in zip(records, nearest):
        answer = train[index].answer
        prediction = get_task(record.task).normalise_prediction(record, answer)
        image = record.image if Path(record.image).is_absolute() else str((prepared_dir / record.image).resolve())
        rows.append(prediction_row(record, image, Outcome(raw_text=answer, prediction=prediction, method=MODE),
                                   MODE))
    write_jsonl(out, rows)
    return out
