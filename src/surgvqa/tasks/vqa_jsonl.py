"""The vqa-jsonl task: the common medical-VQA layout of VQA-RAD, SLAKE and PathVQA exports.

Rows: ``image`` (a path under the file's folder or ``data.image_root``, or embedded bytes), ``question``,
``answer``, optional ``answer_type`` (``CLOSED`` / ``OPEN``) and optional ``split``. A source that names a test
split keeps it and carves validation from its training rows by image; otherwise rows are split by image here.

Closed questions are answered from a closed set: yes/no questions from ``yes, no``, questions that spell out their
options ("A or B") from those, and the rest from the closed answers of the TRAINING split only. Open questions
are generated freely. Metrics are the field's usual pair, per answer type: closed-question accuracy (exact match
after normalisation) and open-question recall (the share of the reference's word tokens present in the
prediction), each with a bootstrap CI, beside the text metrics (BLEU, ROUGE, METEOR) overall and per answer type.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from surgvqa.core.formatting import percent, percent_interval
from surgvqa.data.answers import MCQ, OPEN_ENDED, YES_NO, is_bad_answer, normalize_answer
from surgvqa.data.records import Record
from surgvqa.data.sources import RawRow
from surgvqa.evaluation.bootstrap import bootstrap_mean_ci
from surgvqa.evaluation.text_metrics import bleu_rouge
from surgvqa.tasks.base import SplitOutcome, Task, official_split_outcome, reject_unknown_split
from surgvqa.tasks.kvasir_vqa import infer_question_type

if TYPE_CHECKING:
    from surgvqa.core.config import Config, EvaluateConfig
    from surgvqa.evaluation.scoring import PredictionRow

CLOSED = "closed"
OPEN = "open"
YES_NO_CANDIDATES = ["yes", "no"]
_WORD = re.compile(r"[a-z0-9]+")


def answer_type_of(value: Any) -> str | None:
    """"closed" / "open" from an answer_type cell (CLOSED, Open, "closed-ended", ...); None when absent."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.startswith("close") or text in ("yes/no", "yesno", "binary"):
        return CLOSED
    if text.startswith("open"):
        return OPEN
    return None


def is_closed_row(question_type: str, meta: Any) -> bool:
    """A row's answer type: as the source labelled it, else closed for any question typed with a closed set."""
    declared = answer_type_of(meta.get("answer_type")) if isinstance(meta, dict) else None
    return declared == CLOSED if declared is not None else question_type != OPEN_ENDED


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def open_recall(reference: str, prediction: str) -> float:
    """Share of the reference's distinct word tokens that the prediction contains (the open-question metric of
    VQA-RAD / SLAKE / PathVQA papers); 0 for an empty reference."""
    wanted = set(word_tokens(reference))
    return len(wanted & set(word_tokens(prediction))) / len(wanted) if wanted else 0.0


class VQAJsonl(Task):
    name = "vqa-jsonl"
    question_types = (YES_NO, MCQ, OPEN_ENDED)
    official_splits = True

    def read_rows(self, config: Config, source: str) -> Iterator[RawRow]:
        return map(reject_unknown_split, super().read_rows(config, source))

    def record_meta(self, raw: RawRow) -> dict[str, Any]:
        return {"answer_type": answer_type_of(raw.extra.get("answer_type"))}

    def assign_splits(self, records: list[Record], source_by_image: Mapping[str, str], config: Config
                      ) -> SplitOutcome:
        outcome = official_split_outcome(records, source_by_image, config,
                                         drop_leaking_test_rows=config.data.drop_leaking_test_rows)
        return outcome if outcome is not None else super().assign_splits(records, source_by_image, config)

    def build_vocabulary(self, train_records: Sequence[Record]) -> dict[Any, list[str]]:
        """The closed answers seen in training, most frequent first (ties alphabetical)."""
        counts: dict[str, int] = {}
        for record in train_records:
            if is_bad_answer(record.answer) or not self._declared_or_inferred_closed(record):
                continue
            answer = normalize_answer(record.answer)
            counts[answer] = counts.get(answer, 0) + 1
        return {CLOSED: sorted(counts, key=lambda answer: (-counts[answer], answer))}

    def _declared_or_inferred_closed(self, record: Record) -> bool:
        declared = answer_type_of(record.meta.get("answer_type"))
        if declared is not None:
            return declared == CLOSED
        return infer_question_type(record.question).question_type == YES_NO

    def type_record(self, record: Record, vocabulary: Mapping[Any, list[str]]) -> None:
        record.template, record.multi_label = None, False
        if not self._declared_or_inferred_closed(record):
            record.question_type, record.candidates = OPEN_ENDED, []
            return
        info = infer_question_type(record.question)
        if info.options:
            record.question_type, record.candidates = MCQ, list(info.options)
        elif info.question_type == YES_NO:
            record.question_type, record.candidates = YES_NO, list(YES_NO_CANDIDATES)
        else:
            record.question_type, record.candidates = MCQ, list(vocabulary.get(CLOSED, []))

    def group_key(self, record: Record) -> str:
        return CLOSED if is_closed_row(record.question_type, record.meta) else OPEN

    def task_metrics(self, rows: Sequence[PredictionRow], settings: EvaluateConfig, *,
                     baseline: Sequence[PredictionRow] | None, with_text_metrics: bool) -> dict[str, Any]:
        vqa = vqa_metrics(rows, settings, with_text_metrics=with_text_metrics)
        return {"vqa": vqa, "task_tables": vqa_tables(vqa)}


def _hypothesis(row: PredictionRow) -> str:
    if row.error is not None:
        return ""
    return row.text if row.text is not None and row.question_type == OPEN_ENDED else row.prediction


def vqa_metrics(rows: Sequence[PredictionRow], settings: EvaluateConfig, *, with_text_metrics: bool = True
                ) -> dict[str, Any]:
    """Closed accuracy and open recall (with CIs), and BLEU/ROUGE per answer type."""
    result: dict[str, Any] = {}
    for answer_type in (CLOSED, OPEN):
        chosen = [row for row in rows if is_closed_row(row.question_type, row.meta) == (answer_type == CLOSED)]
        hypotheses = [_hypothesis(row) for row in chosen]
        if answer_type == CLOSED:
            values = [float(bool(h) and normalize_answer(h) == normalize_answer(row.reference))
                      for row, h in zip(chosen, hypotheses)]
            name = "accuracy"
        else:
            values = [open_recall(row.reference, h) for row, h in zip(chosen, hypotheses)]
            name = "recall"
        entry: dict[str, Any] = {"n": len(chosen), "metric": name,
                                 "value": float(np.mean(values)) if values else None,
                                 "ci": bootstrap_mean_ci(values, settings.bootstrap_samples, settings.confidence,
                                                         settings.seed) if values else None}
        if with_text_metrics and chosen:
            entry["text"] = bleu_rouge(hypotheses, [row.reference for row in chosen])
        result[answer_type] = entry
    return result


def vqa_tables(vqa: dict[str, Any]) -> list[dict[str, Any]]:
    def pct(value: Any) -> str:
        return percent(value, missing="-")

    def ci(value: Any) -> str:
        return percent_interval(value, missing="-")

    rows = []
    for answer_type, entry in vqa.items():
        text = entry.get("text") or {}
        rows.append([answer_type, entry["metric"], str(entry["n"]), pct(entry["value"]), ci(entry["ci"]),
                     pct(text.get("bleu")), pct(text.get("rougeL"))])
    return [{"title": "Closed accuracy and open recall (%)",
             "header": ["answer type", "metric", "n", "value", "95% CI", "BLEU", "ROUGE-L"], "rows": rows}]
