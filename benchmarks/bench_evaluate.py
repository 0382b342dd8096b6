"""Time of the evaluate stage on a Kvasir-sized predictions file (60,000 rows), without the report's images.

Everything else runs as in `surgvqa evaluate`: reading and validating the file, scoring, 1,000 bootstrap
resamples for every accuracy, per-template breakdown, confusion matrices, BLEU / ROUGE, metrics.json +
Markdown + CSV; timed once without and once with METEOR (the Java jar: several seconds of start-up loading its
paraphrase table, plus ~0.5 ms per distinct (prediction, reference) pair, overlapped with the rest).

Run: python benchmarks/bench_evaluate.py
  -> prints one JSON object and writes benchmarks/results/evaluate.json
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

from _common import write_result

from surgvqa.core.config import EvaluateConfig
from surgvqa.stages.evaluate import run_on_file
from surgvqa.tasks.kvasir_vqa import TEMPLATES

ROWS = 60_000
OPEN_ANSWERS = ["a small sessile polyp", "an inflamed mucosa with ulcers", "a normal cecum", "a metal clip"]


def _answer(rng: random.Random, vocabulary: list[str], multi: bool) -> str:
    k = rng.choice((1, 1, 1, 2, 3)) if multi else 1
    return "; ".join(rng.sample(vocabulary, min(k, len(vocabulary))))


def make_predictions(path: Path, rows: int, seed: int = 0) -> None:
    """Kvasir-like rows: the 19 templates with their real vocabularies, ~60 % right, a few open questions."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            if rng.random() < 0.05:
                question, question_type, template, multi = "Describe the image.", "open_ended", None, False
                vocabulary = OPEN_ANSWERS
            else:
                chosen = rng.choice(TEMPLATES)
                question, question_type, template = chosen.question, chosen.question_type, chosen.id
                multi, vocabulary = chosen.multi_label, list(chosen.vocabulary)
            reference = _answer(rng, vocabulary, multi)
            prediction = reference if rng.random() < 0.6 else _answer(rng, vocabulary, multi)
            handle.write(
                json.dumps(
                    {
                        "id": f"row{i}",
                        "img_id": f"img{i // 9}",
                        "question": question,
                        "question_type": question_type,
                        "template": template,
                        "answer": reference,
                        "prediction": prediction,
                        "raw_text": prediction,
                        "mode": "generate",
                        "scores": None,
                        "error": None,
                        "multi_label": multi,
                        "candidates": vocabulary,
                    }
                )
                + "\n"
            )


def _timed(
    predictions: Path, out_dir: Path, settings: EvaluateConfig, with_meteor: bool
) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = run_on_file(predictions, out_dir, settings, with_report=False, with_meteor=with_meteor)
    return time.perf_counter() - start, metrics


def main() -> dict:
    settings = EvaluateConfig()
    with tempfile.TemporaryDirectory() as tmp:
        predictions = Path(tmp) / "predictions.jsonl"
        make_predictions(predictions, ROWS)
        without_meteor, _ = _timed(predictions, Path(tmp) / "a", settings, with_meteor=False)
        with_meteor, metrics = _timed(predictions, Path(tmp) / "b", settings, with_meteor=True)
    meteor = metrics["text_metrics"]["meteor"]
    result = {
        "rows": ROWS,
        "unique_pred_ref_pairs": metrics["text_metrics"].get("unique_pairs"),
        "bootstrap_samples": settings.bootstrap_samples,
        "seconds_without_meteor": round(without_meteor, 3),
        "seconds_with_meteor": round(with_meteor, 3),
        "rows_per_s_without_meteor": round(ROWS / without_meteor),
        "meteor": "computed (METEOR 1.5 jar)" if isinstance(meteor, float) else meteor.get("unavailable"),
        "under_10_s_without_meteor": without_meteor < 10.0,
        "under_10_s_with_meteor": with_meteor < 10.0,
        "micro_strict": round(metrics["overall"]["micro_strict"], 4),
    }
    return write_result("evaluate", result, indent=None)


if __name__ == "__main__":
    main()
