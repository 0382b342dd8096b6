"""Do the calibrators help where they should, and harm nothing where they should not?

Makes a model over- or underconfident on purpose and measures ECE on the test split before and after the
calibration ``predict`` fits on the validation split (``fit_calibration`` then ``apply_calibration``, with one
overall fit and with one per question type): every ``candidates`` row's candidate log-probabilities are
multiplied by a factor (softmax(f x log q): overconfident for f > 1, underconfident below 1), every score row's
(``label_set``, ``sequence``) confidence c becomes sigmoid(f x logit(c)). Factor 1 is the model as it is.
Beside every ECE after calibration: the noise floor, the 95th percentile of the ECE that a perfectly calibrated
model with the calibrated confidences shows from sampling alone (outcomes drawn as Bernoulli(confidence), 200
times: ``calibrated_ece_range``).

Rows: ``--predictions VAL TEST`` (a model's validation and test predictions with their raw confidences, such as
``confidence_synthetic.py`` leaves beside its output), or by default synthetic ones: four closed types with 2 to
6 candidates whose answers are drawn from softmax(logits) and one open type whose answers are right with
probability sigmoid(z), the model claiming exactly these (calibrated at factor 1). "mixed" scales each type by
its own factor (yes/no x3, colour x1/2, the others x1), the case one overall fit cannot correct.

    PYTHONPATH=src .venv/bin/python benchmarks/calibration_miscalibrated.py

Prints one JSON object and writes it to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from surgvqa.core.config import EvaluateConfig
from surgvqa.core.io import atomic_write_json, iter_jsonl
from surgvqa.evaluation.calibration import calibrated_ece_range, expected_calibration_error, platt_scale
from surgvqa.evaluation.scoring import strict_correct
from surgvqa.inference.confidence import (
    CANDIDATES,
    SCORE_KINDS,
    SEQUENCE,
    apply_calibration,
    calibrated_confidence,
    candidate_fields,
    fit_calibration,
)

RESULTS = Path(__file__).parent / "results"
FACTORS = {"x3 (overconfident)": 3.0, "x2": 2.0, "x1 (as is)": 1.0, "x1/2": 0.5, "x1/3 (underconfident)": 1 / 3}
MIXED = {"yes_no": 3.0, "color": 0.5}
SYNTHETIC_TYPES = {"yes_no": ["yes", "no"], "color": ["pink", "red", "white", "black", "green", "blue"],
                   "count_numeric": ["0", "1", "2", "3"], "mcq": ["upper-left", "center", "lower-right", "center-left"]}


def synthetic_rows(rows_per_type: int, rng: np.random.Generator) -> list[dict]:
    """Calibrated prediction rows: closed types answered by the most probable candidate, answers drawn from the
    model's own distribution; an open type right with the probability the model claims."""
    out = []
    for question_type, labels in SYNTHETIC_TYPES.items():
        for index in range(rows_per_type):
            logits = rng.normal(0, 1.5, len(labels))
            logprobs = logits - np.logaddexp.reduce(logits)
            answer = labels[rng.choice(len(labels), p=np.exp(logprobs))]
            prediction = labels[int(np.argmax(logprobs))]
            out.append({"id": f"{question_type}{index}", "question_type": question_type, "answer": answer,
                        "prediction": prediction, "error": None,
                        **candidate_fields(question_type, prediction, labels, logprobs.tolist())})
    for index in range(rows_per_type):
        claimed = 1 / (1 + math.exp(-rng.normal(1.0, 2.0)))
        right = rng.uniform() < claimed
        out.append({"id": f"open{index}", "question_type": "open", "answer": "a", "prediction": "a" if right else "b",
                    "error": None, "confidence_kind": SEQUENCE, "confidence_raw": claimed})
    return out


def read_rows(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path, skip_bad=True)
            if row.get("error") is None and isinstance(row.get("confidence_raw"), (int, float))]


def scaled(row: dict, factor: float) -> dict:
    """The row as a model f times as sure of every log-probability would have written it."""
    row = dict(row)
    if row.get("confidence_kind") == CANDIDATES and isinstance(row.get("candidate_logprobs"), dict):
        logprobs = {label: factor * value for label, value in row["candidate_logprobs"].items()}
        labels, values = list(logprobs), np.array(list(logprobs.values()))
        row.update(candidate_fields(row.get("question_type", ""), row.get("prediction") or "", labels,
                                    (values - np.logaddexp.reduce(values)).tolist()))
    elif row.get("confidence_kind") in SCORE_KINDS:
        row["confidence_raw"] = float(platt_scale(row["confidence_raw"], factor, 0.0))
    row["confidence"] = row["confidence_raw"]
    return row


def ece_figures(confidence: list[float], correct: list[bool], seed: int) -> dict[str, float | int]:
    if not confidence:
        return {"n": 0}
    return {"n": len(confidence), "ece": expected_calibration_error(confidence, correct),
            "ece_if_calibrated_q95": calibrated_ece_range(confidence, seed=seed)[1]}


def measure(val: list[dict], test: list[dict], factor_of: dict[str, float], seed: int) -> dict:
    """ECE on the test rows of the scaled model, as is and after each scope's fit on the scaled validation rows,
    over all rows and per kind of confidence."""
    val = [scaled(row, factor_of.get(row.get("question_type", ""), factor_of["*"])) for row in val]
    test = [scaled(row, factor_of.get(row.get("question_type", ""), factor_of["*"])) for row in test]
    evaluate = EvaluateConfig()
    val_correct, test_correct = strict_correct(val, evaluate), strict_correct(test, evaluate)
    out: dict = {}
    kinds = {"all": lambda row: True, "candidates": lambda row: row.get("confidence_kind") == CANDIDATES,
             "scores": lambda row: row.get("confidence_kind") in SCORE_KINDS}
    for scope in ("before", "overall", "per_type"):
        if scope == "before":
            confidence = [calibrated_confidence(row, None) for row in test]
        else:
            calibration = fit_calibration(val, val_correct, scope, alpha=None, target_risk=None)
            confidence = [apply_calibration(row, calibration, abstain=False)["confidence"] for row in test]
        out[scope] = {kind: ece_figures([c for c, row in zip(confidence, test) if keep(row)],
                                        [hit for hit, row in zip(test_correct, test) if keep(row)], seed)
                      for kind, keep in kinds.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", nargs=2, metavar=("VAL", "TEST"), type=Path, default=None)
    parser.add_argument("--rows-per-type", type=int, default=1000, help="synthetic rows per type and split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="key of this run in --result (default: the source)")
    parser.add_argument("--result", type=Path, default=RESULTS / "calibration_miscalibrated.json")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.predictions:
        val, test = read_rows(args.predictions[0]), read_rows(args.predictions[1])
        source = f"predictions {args.predictions[0]} / {args.predictions[1]}"
    else:
        rng = np.random.default_rng(args.seed)
        val, test = synthetic_rows(args.rows_per_type, rng), synthetic_rows(args.rows_per_type, rng)
        source = f"synthetic, {args.rows_per_type} rows per type and split, seed {args.seed}"
    scenarios = {name: {"*": factor} for name, factor in FACTORS.items()}
    scenarios["mixed (yes_no x3, color x1/2)"] = {"*": 1.0, **MIXED}
    figures = {name: measure(val, test, factor_of, args.seed) for name, factor_of in scenarios.items()}
    run = {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/calibration_miscalibrated.py"
                   + (f" --predictions {args.predictions[0]} {args.predictions[1]}" if args.predictions
                      else f" --rows-per-type {args.rows_per_type}")
                   + f" --seed {args.seed}" + (f' --name "{args.name}"' if args.name else ""),
        "date": time.strftime("%Y-%m-%d"), "source": source, "val_rows": len(val), "test_rows": len(test),
        "seconds": round(time.perf_counter() - started, 1), "scenarios": figures,
    }
    result = json.loads(args.result.read_text(encoding="utf-8")) if args.result.is_file() else {}
    runs = {**result.get("runs", {}), args.name or source: run}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.result, {"benchmark": "calibration_miscalibrated", "runs": runs})
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
