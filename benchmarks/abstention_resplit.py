"""Does abstention keep its promise? Random re-splits of validation + test predictions.

The promise of ``predict.abstain`` with ``risk_delta``: the error rate among the answered test questions exceeds
``target_risk`` in at most a share ``risk_delta`` of splits. Each re-split pools a model's validation and test
predictions, shuffles them, cuts them again at the original sizes, chooses the thresholds on the new validation
part (``abstention_threshold``, one per question type with enough rows as ``predict.calibration: per_type`` does,
else one overall) and measures the realised risk and the share answered on the new test part; beside it the old
point-estimate threshold (``risk_delta: null``) on the same splits.

Two sources of (confidence, correct, question type) rows:

- ``--predictions VAL TEST [NAME]`` (repeatable): a model's validation and test predictions files, such as
  ``confidence_synthetic.py`` leaves beside its output (``confidence.rank.val.jsonl``, ``confidence.rank.jsonl``);
  the rows' ``confidence_raw`` is used (a threshold's guarantee needs no calibration, and a calibration fitted on
  the original validation split would have seen half of every re-split's test part);
- by default, replicas of the learning benchmark's three ``rank`` models: per question type, as many rows as its
  test split had, confidences drawn from a Beta distribution whose mean is the type's accuracy and whose spread
  matches its accuracy at 80, 90 and 95 % coverage and, where the type answered any, the accuracy of the
  questions it answered at a 5 % target risk (``benchmarks/results/confidence_synthetic.json``), outcomes
  drawn as Bernoulli(confidence) (those models were calibrated: ECE at the noise floor). Their predictions files
  were not kept, so the replicas stand in for them; the fit to each type's figures is in the output.

    PYTHONPATH=src .venv/bin/python benchmarks/abstention_resplit.py --resplits 500

Prints one JSON object and adds it to ``--result`` under its source and scope (other runs there are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgvqa.core.config import EvaluateConfig
from surgvqa.core.io import atomic_write_json, iter_jsonl
from surgvqa.evaluation.calibration import abstention_threshold, accuracy_at_coverage
from surgvqa.evaluation.scoring import strict_correct
from surgvqa.inference.confidence import MIN_ROWS_PER_TYPE

RESULTS = Path(__file__).parent / "results"
REPLICA_SOURCE = RESULTS / "confidence_synthetic.json"
REPLICA_RUNS = ("4000 images, seed 0, rank", "4000 images, seed 1, rank", "4000 images, seed 2, rank")
COVERAGES = (0.8, 0.9, 0.95)


@dataclass
class Rows:
    """One model's pooled validation + test rows as arrays; the first ``val_rows`` were its validation split."""

    confidence: np.ndarray
    correct: np.ndarray
    question_type: np.ndarray
    val_rows: int


def read_predictions(val: Path, test: Path) -> Rows:
    rows = []
    for path in (val, test):
        part = [row for _, row in iter_jsonl(path, skip_bad=True)
                if row.get("error") is None and isinstance(row.get("confidence_raw"), (int, float))]
        if not part:
            raise SystemExit(f"{path}: no row with a confidence_raw")
        rows.append(part)
    pooled = rows[0] + rows[1]
    return Rows(np.array([float(row["confidence_raw"]) for row in pooled]),
                np.array(strict_correct(pooled, EvaluateConfig()), dtype=np.float64),
                np.array([row.get("question_type", "") for row in pooled]), len(rows[0]))


def beta_replica(accuracy: float, at_coverage: dict[float, float], rows: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict]:
    """``rows`` confidences from Beta(m k, (1 - m) k), m = ``accuracy`` (a calibrated model's mean confidence
    is its accuracy), k the concentration whose draws' accuracy at each coverage (outcomes Bernoulli(confidence),
    in expectation: the mean confidence of the most confident rows) is nearest ``at_coverage`` in squares."""
    mean = min(max(accuracy, 1e-3), 1 - 1e-3)
    probe = np.random.default_rng(0)
    best = None
    for concentration in np.geomspace(0.2, 200, 120):
        draws = np.sort(probe.beta(mean * concentration, (1 - mean) * concentration, 20000))[::-1]
        fitted = {c: float(draws[: math.ceil(c * draws.size)].mean()) for c in at_coverage}
        loss = sum((fitted[c] - at_coverage[c]) ** 2 for c in at_coverage)
        if best is None or loss < best[0]:
            best = (loss, concentration, fitted)
    _, concentration, fitted = best
    confidence = rng.beta(mean * concentration, (1 - mean) * concentration, rows)
    return confidence, {"concentration": round(float(concentration), 3),
                        "accuracy_at_coverage_target": {str(c): round(at_coverage[c], 4) for c in at_coverage},
                        "accuracy_at_coverage_replica": {str(c): round(fitted[c], 4) for c in at_coverage}}


def replica(run: dict, seed: int) -> tuple[Rows, dict]:
    """A calibrated stand-in for one model of confidence_synthetic.json: each type's test split twice over (the
    validation split had as many rows), confidences from :func:`beta_replica` fitted to the type's accuracy at
    coverage: at 80, 90 and 95 % and at the share it answered."""
    rng = np.random.default_rng(seed)
    confidence, question_type, fits = [], [], {}
    for name, figures in run["per_type"].items():
        if name == "all":
            continue
        at_coverage = {c: figures[f"accuracy_at_{round(c * 100)}"] for c in COVERAGES}
        if figures["answered"]:  # the top of the distribution, which decides the thresholds, seen directly
            at_coverage[round(figures["answered"] / figures["n"], 4)] = figures["accuracy_answered"]
        values, fits[name] = beta_replica(figures["accuracy"], at_coverage, 2 * figures["n"], rng)
        confidence.append(values)
        question_type += [name] * values.size
    confidence = np.concatenate(confidence)
    correct = (rng.uniform(size=confidence.size) < confidence).astype(np.float64)
    return Rows(confidence, correct, np.array(question_type), confidence.size // 2), fits


def thresholds_per_row(confidence: np.ndarray, correct: np.ndarray, question_type: np.ndarray,
                       target_risk: float, delta: float | None, per_type: bool) -> dict[str, float]:
    """The abstention threshold of each group, as ``fit_calibration`` chooses them: one overall and, with
    ``per_type``, one per type with at least MIN_ROWS_PER_TYPE validation rows."""
    out = {"overall": abstention_threshold(confidence, correct, target_risk, delta)}
    if per_type:
        for name in np.unique(question_type):
            members = question_type == name
            if members.sum() >= MIN_ROWS_PER_TYPE:
                out[str(name)] = abstention_threshold(confidence[members], correct[members], target_risk, delta)
    return out


def resplit(rows: Rows, resplits: int, target_risk: float, delta: float, per_type: bool, seed: int) -> dict:
    """Per rule (the guaranteed one at ``delta``, the point estimate), over ``resplits`` random re-splits: the
    share whose realised test risk exceeds the target, and the risk and the share answered (coverage)."""
    rng = np.random.default_rng(seed)
    realised: dict[str, list[tuple[float, float]]] = {"guaranteed": [], "point_estimate": []}
    for _ in range(resplits):
        order = rng.permutation(rows.confidence.size)
        val, test = order[: rows.val_rows], order[rows.val_rows:]
        for rule, rule_delta in (("guaranteed", delta), ("point_estimate", None)):
            table = thresholds_per_row(rows.confidence[val], rows.correct[val], rows.question_type[val],
                                       target_risk, rule_delta, per_type)
            threshold = np.array([table.get(str(name), table["overall"]) for name in rows.question_type[test]])
            answered = rows.confidence[test] >= threshold
            risk = float(1 - rows.correct[test][answered].mean()) if answered.any() else 0.0
            realised[rule].append((risk, float(answered.mean())))
    out = {}
    for rule, values in realised.items():
        risk, coverage = np.array(values).T
        out[rule] = {"exceeded_share": float(np.mean(risk > target_risk + 1e-12)),
                     "risk_mean": float(risk.mean()), "risk_q95": float(np.quantile(risk, 0.95)),
                     "coverage_mean": float(coverage.mean()),
                     "coverage_range": [float(coverage.min()), float(coverage.max())]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", nargs="+", action="append", default=[], metavar="VAL TEST [NAME]",
                        help="a model's validation and test predictions files (default: the replicas)")
    parser.add_argument("--resplits", type=int, default=500)
    parser.add_argument("--target-risk", type=float, default=0.05)
    parser.add_argument("--risk-delta", type=float, default=0.1)
    parser.add_argument("--scope", choices=("overall", "per_type"), default="per_type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", type=Path, default=RESULTS / "abstention_resplit.json")
    args = parser.parse_args()
    started = time.perf_counter()
    models: dict[str, tuple[Rows, dict | None]] = {}
    for entry in args.predictions:
        if len(entry) not in (2, 3):
            raise SystemExit(f"--predictions takes VAL TEST [NAME], got {len(entry)} values")
        models[entry[2] if len(entry) == 3 else entry[1]] = (read_predictions(Path(entry[0]), Path(entry[1])), None)
    if not models:
        runs = json.loads(REPLICA_SOURCE.read_text(encoding="utf-8"))["runs"]
        for index, name in enumerate(REPLICA_RUNS):
            models[f"replica of {name}"] = replica(runs[name], seed=args.seed + index)
    results = {}
    for name, (rows, fits) in models.items():
        results[name] = {"rows": int(rows.confidence.size), "validation_rows": rows.val_rows,
                         "accuracy": float(rows.correct.mean()),
                         "accuracy_at_80": accuracy_at_coverage(rows.confidence, rows.correct, 0.8),
                         **resplit(rows, args.resplits, args.target_risk, args.risk_delta,
                                   args.scope == "per_type", args.seed)}
        if fits:
            results[name]["replica_fit_per_type"] = fits
    payload = {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/abstention_resplit.py "
                   f"--resplits {args.resplits} --target-risk {args.target_risk} --risk-delta {args.risk_delta} "
                   f"--scope {args.scope} --seed {args.seed}"
                   + "".join(" --predictions " + " ".join(f'"{item}"' for item in entry) for entry in args.predictions),
        "date": time.strftime("%Y-%m-%d"),
        "source": "predictions files" if args.predictions else f"replicas of {REPLICA_SOURCE.name}",
        "seconds": round(time.perf_counter() - started, 1),
        "models": results,
    }
    result = json.loads(args.result.read_text(encoding="utf-8")) if args.result.is_file() else {}
    runs = {**result.get("runs", {}), f"{payload['source']}, scope {args.scope}": payload}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.result, {"benchmark": "abstention_resplit", "runs": runs})
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
