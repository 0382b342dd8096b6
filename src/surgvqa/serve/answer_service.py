"""The trained model behind ``surgvqa app``: answers about an image held in memory, with their confidence.

The model answers exactly as ``surgvqa predict`` does (the run's config, prompt, pixel limits and prediction mode,
through the same :class:`surgvqa.inference.predictor.Predictor`); one model instance serves every browser session, and a lock
serialises the model calls. What it writes (batch results) stays under ``<run>/app/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgvqa.core.config import Config
from surgvqa.core.io import atomic_write_text, write_jsonl
from surgvqa.data.images import open_rgb
from surgvqa.data.records import Record, read_records
from surgvqa.evaluation.calibration import log_softmax
from surgvqa.inference.confidence import apply_calibration, candidate_confidence
from surgvqa.inference.decoding import is_closed
from surgvqa.inference.prediction_files import prediction_row
from surgvqa.inference.predictor import Outcome, Predictor, default_model_path, load_for_prediction
from surgvqa.models.loading import resolve_model_path
from surgvqa.prompting.encoding import encode_prompt
from surgvqa.stages.predict import calibration_files
from surgvqa.tasks import get_task

MENU_SIZE = 40  # questions offered in the menu: the task's most frequent training questions
GALLERY_SIZE = 48  # test-split images shown to pick from


class NotAnImage(ValueError):
    """An uploaded file that PIL cannot read as an image; the message names the file."""


class InMemoryPredictor(Predictor):
    """The prediction stage's predictor, fed images the app already holds instead of paths from a JSONL file."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.images: dict[str, Image.Image] = {}

    def encode(self, record: Record) -> dict:
        return encode_prompt(self.processor, record, self.images[record.id], self.config.prompt, self.strategy)


@dataclass
class Answer:
    question: str
    question_type: str
    answer: str
    mode: str
    confidence: float | None  # probability of the answer given, where the model's scores define one
    candidate_probabilities: dict[str, float] = field(default_factory=dict)  # closed questions
    answer_set: list[str] | None = None  # the conformal answer set, where the run is calibrated
    abstained: bool = False  # below the confidence the run answers at (predict.abstain)
    reference: str | None = None  # when the image and question come from the test split
    correct: bool | None = None
    multi_label: bool = False  # the answer is a set of labels; its confidence is the whole set's
    rescaled: bool = False  # the confidence was recalibrated on the validation split (Platt), the chart was not
    base_answer: str | None = None  # the untrained model's answer, when it is loaded beside
    error: str | None = None


@dataclass
class BatchResult:
    csv: Path
    jsonl: Path
    images: int  # images answered
    unreadable: list[str]  # names of the files that are not images, one error row each


def read_image(path: str | Path) -> Image.Image:
    """An uploaded file as RGB, decoded as prepare decodes dataset images, or :class:`NotAnImage`."""
    try:
        return open_rgb(Path(path))
    except (OSError, ValueError) as exc:
        raise NotAnImage(f"{Path(path).name} is not an image surgvqa can read ({exc}); upload a PNG or JPEG "
                         f"endoscopy image") from None


def candidate_probabilities(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each candidate's probability among the candidates: the softmax of their log-likelihoods given the prompt
    (the model's own distribution restricted to the answers it may give)."""
    if not scores:
        return {}
    logprobs = log_softmax(np.array([score["sum"] for score in scores.values()]))
    weights = {label: math.exp(logprob) for label, logprob in zip(scores, logprobs)}
    return dict(sorted(weights.items(), key=lambda item: -item[1]))


class AnswerService:
    """The trained model (and optionally the untrained base beside it) behind the app's buttons."""

    def __init__(self, config: Config, model_path: str | None = None, *, compare_base: bool = False,
                 quiet: bool = True):
        self.config = config
        self.task = get_task(config.task)
        self.mode = config.predict.mode
        self.model_path = model_path or default_model_path(config)
        prepared = config.run_dir / "prepared"
        self.prepared = prepared
        self.vocabulary = _read_vocabulary(prepared / "vocabulary.json")
        # The temperature, conformal quantile and abstention threshold `surgvqa predict` fitted for this run.
        self.calibration = _read_calibration(calibration_files(config.run_dir / "predictions.jsonl")[1])
        self.predictor = self._load(self.model_path, quiet)
        self.base = None
        if compare_base:

            self.base = self._load(resolve_model_path(config), quiet)
        self.lock = threading.Lock()  # one model instance: its calls one at a time, whatever the sessions
        self.model_loads = 1 + (self.base is not None)
        self.test_records = read_records(prepared / "test.jsonl") if (prepared / "test.jsonl").is_file() else []
        self.questions = self._question_menu()
        self.out_dir = config.run_dir / "app"

    def _load(self, path: str, quiet: bool) -> InMemoryPredictor:
        model, processor = load_for_prediction(self.config, path, quiet=quiet)
        return InMemoryPredictor(model, processor, self.config, self.prepared)

    def _question_menu(self) -> list[str]:
        train = self.prepared / "train.jsonl"
        records = read_records(train) if train.is_file() else self.test_records
        return [question for question, _ in Counter(r.question for r in records).most_common(MENU_SIZE)]

    # -- the gallery of test images ---------------------------------------------------------------------------

    def gallery(self) -> list[tuple[str, str]]:
        """(image path, caption) of the first test images, one entry per image."""
        seen: dict[str, tuple[str, str]] = {}
        for record in self.test_records:
            if record.img_id not in seen and len(seen) < GALLERY_SIZE:
                seen[record.img_id] = (str(self._image_file(record)), record.img_id)
        return list(seen.values())

    def _image_file(self, record: Record) -> Path:
        path = Path(record.image)
        return path if path.is_absolute() else self.prepared / path

    def test_questions(self, img_id: str) -> list[list[str]]:
        return [[r.question, r.answer] for r in self.test_records if r.img_id == img_id]

    def _reference(self, img_id: str | None, question: str) -> str | None:
        for record in self.test_records:
            if img_id is not None and record.img_id == img_id and record.question == question:
                return record.answer
        return None

    # -- answering ------------------------------------------------------------------------------------------------

    def typed_record(self, question: str, key: str) -> Record:
        record = Record(id=key, img_id=key, image="", question=question.strip(), answer="", task=self.task.name)
        self.task.type_record(record, self.vocabulary)
        return record

    def ask(self, image: Image.Image, questions: list[str], img_id: str | None = None) -> list[Answer]:
        """Answer each question about one image, in the run's prediction mode."""
        records = [self.typed_record(question, f"q{index}") for index, question in enumerate(questions)]
        with self.lock:
            outcomes = self._predict(self.predictor, image, records)
            base = self._predict(self.base, image, records) if self.base is not None else None
        answers = []
        for index, (record, outcome) in enumerate(zip(records, outcomes)):
            probabilities = _probabilities(outcome)
            calibrated = apply_calibration(prediction_row(record, "", outcome, self.mode), self.calibration,
                                           self.config.predict.abstain)
            if calibrated["temperature"] is not None:  # the chart at the temperature the confidence is given at
                labels, scaled, _ = candidate_confidence(calibrated, calibrated["temperature"])
                probabilities = dict(sorted(zip(labels, map(float, scaled)), key=lambda item: -item[1]))
            confidence = calibrated["confidence"] if calibrated["confidence"] is not None \
                else _confidence(outcome, probabilities)
            reference = self._reference(img_id, record.question)
            answers.append(Answer(
                question=record.question, question_type=record.question_type, answer=outcome.prediction or "",
                mode=outcome.method or self.mode, confidence=confidence, candidate_probabilities=probabilities,
                answer_set=calibrated["answer_set"], abstained=bool(calibrated["abstained"]),
                reference=reference,
                correct=None if reference is None or outcome.error else self.task.matches_reference(
                    Record(id=record.id, img_id="", image="", question=record.question, answer=reference,
                           question_type=record.question_type, candidates=record.candidates,
                           multi_label=record.multi_label), outcome.prediction or ""),
                multi_label=record.multi_label, rescaled=calibrated["platt"] is not None,
                base_answer=None if base is None else (base[index].prediction or ""),
                error=outcome.error))
        return answers

    def _predict(self, predictor: InMemoryPredictor, image: Image.Image, records: list[Record]) -> list[Outcome]:
        predictor.images = {record.id: image for record in records}
        try:
            outcomes = predictor.predict_batch(records, self.mode)
            # The chart needs every candidate's probability: where a mode stored none, rank's scores give them.
            needs_scores = [i for i, (record, outcome) in enumerate(zip(records, outcomes))
                            if outcome.error is None and is_closed(record) and not record.multi_label
                            and not _probabilities(outcome)]
            if needs_scores:
                scored = predictor.predict_batch([records[i] for i in needs_scores], "rank")
                for index, ranked in zip(needs_scores, scored):
                    outcomes[index].scores = ranked.scores
            return outcomes
        finally:
            predictor.images = {}

    # -- batch ------------------------------------------------------------------------------------------------

    def predict_files(self, files: list[str], questions: list[str], progress: Any = None) -> BatchResult:
        """Every question about every image file; results as CSV and JSONL under ``<run>/app/``. A file that is not
        an image gets one row (its error), not one per question: it was never asked anything."""
        rows: list[dict[str, Any]] = []
        unreadable: list[str] = []
        for number, path in enumerate(files):
            if progress is not None:
                progress((number, len(files)), desc=f"image {number + 1} of {len(files)}")
            name = Path(path).name
            try:
                image = read_image(path)
            except NotAnImage as exc:
                rows.append({"image": name, "question": "", "answer": "", "confidence": None, "error": str(exc)})
                unreadable.append(name)
                continue
            for answer in self.ask(image, questions):
                rows.append({"image": name, "question": answer.question, "answer": answer.answer,
                             "confidence": answer.confidence, "error": answer.error})
        # One name per batch even within a second: the app serves every browser session from this one instance,
        # so a name from the clock alone would hand one user's download another's results. mkstemp reserves it.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handle, reserved = tempfile.mkstemp(prefix=f"batch-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".csv",
                                            dir=self.out_dir)
        os.close(handle)
        csv_path = Path(reserved)
        jsonl_path = csv_path.with_suffix(".jsonl")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["image", "question", "answer", "confidence", "error"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, buffer.getvalue())
        write_jsonl(jsonl_path, rows)
        return BatchResult(csv_path, jsonl_path, images=len(files) - len(unreadable), unreadable=unreadable)


def _confidence(outcome: Outcome, probabilities: dict[str, float]) -> float | None:
    """The row's confidence as ``surgvqa predict`` stores it (calibrated when the run has a temperature), else the
    chosen candidate's probability among the candidates."""
    fields = outcome.confidence or {}
    for key in ("confidence", "confidence_raw"):
        if fields.get(key) is not None:
            return float(fields[key])
    if outcome.raw_text is not None and probabilities:
        return probabilities.get(outcome.raw_text.strip())
    return None


def _probabilities(outcome: Outcome) -> dict[str, float]:
    """Every candidate's probability: the row's own candidate distribution (single label) or per-label
    probabilities (multi-label) where predict stored them, else the softmax of rank's candidate scores."""
    fields = outcome.confidence or {}
    if fields.get("candidate_logprobs"):
        values = {label: math.exp(value) for label, value in fields["candidate_logprobs"].items()}
    elif fields.get("label_probabilities"):
        values = dict(fields["label_probabilities"])
    else:
        return candidate_probabilities(outcome.scores or {})
    return dict(sorted(values.items(), key=lambda item: -item[1]))


def _read_calibration(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_vocabulary(path: Path) -> dict[Any, list[str]]:
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {int(key) if key.isdigit() else key: value for key, value in raw.items()}
