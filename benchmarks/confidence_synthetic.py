"""Confidence benchmark: calibration, conformal coverage and abstention on the learning benchmark's model.

Predicts the synthetic test split with the model ``learn_synthetic.py`` trained (same ``--workdir`` and
``--images``), with temperature scaling, split-conformal answer sets and abstention fitted on the validation split
(docs/confidence.md), evaluates, prints one JSON object and adds it to ``--result`` under ``--name`` (the other
runs in that file are kept, and the summary over all of them recomputed).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_synthetic.py --minutes 30
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/confidence_synthetic.py --mode rank --name seed0

``--set`` overrides must repeat those given to learn_synthetic.py that shape the data (``data.split.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from surgvqa.core.config import load_config
from surgvqa.core.io import atomic_write_json
from surgvqa.stages.evaluate import run_on_file
from surgvqa.stages.predict import calibration_files
from surgvqa.stages.predict import run as run_predict

RESULTS = Path(__file__).parent / "results"


def summarise(runs: list[dict]) -> dict:
    """Mean, min and max over runs of the all-rows figures; how many runs have a lower ECE after calibration."""
    summary = {}
    for key in ("ece_before", "ece_after", "ece_if_calibrated_after", "nll_before", "nll_after", "accuracy_answered",
                "risk_answered", "answered"):
        values = [run["per_type"]["all"][key] for run in runs if key in run["per_type"]["all"]]
        values = [value[1] if isinstance(value, list) else value for value in values if value is not None]
        if values:  # ece_if_calibrated: its 95th percentile
            summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    coverage = [run["per_type"]["all"]["conformal"]["coverage"] for run in runs if run["per_type"]["all"].get("conformal")]
    if coverage:
        summary["conformal_coverage"] = {"mean": sum(coverage) / len(coverage), "min": min(coverage),
                                         "max": max(coverage)}
    summary["runs"] = len(runs)
    summary["ece_lower_after"] = sum(run["per_type"]["all"]["ece_after"] < run["per_type"]["all"]["ece_before"]
                                     for run in runs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-learn"))
    parser.add_argument("--images", type=int, default=4000, help="as given to learn_synthetic.py")
    parser.add_argument("--mode", choices=("generate", "constrained", "rank"), default="rank")
    parser.add_argument("--scope", choices=("overall", "per_type"), default="per_type")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--target-risk", type=float, default=0.05)
    parser.add_argument("--risk-delta", type=float, default=0.1,
                        help="abstention: chance of exceeding the target risk; 0: the point estimate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--result", type=Path, default=RESULTS / "confidence_synthetic.json")
    parser.add_argument("--name", default=None, help="key of this run in --result (default: the workdir)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(None, [f"output_dir={args.workdir}", "run_name=learn",
                                f"data.synthetic.images={args.images}", "data.synthetic.image_size=84",
                                f"predict.calibration={args.scope}", f"predict.conformal_alpha={args.alpha}",
                                "predict.abstain=true", f"predict.target_risk={args.target_risk}",
                                f"predict.risk_delta={args.risk_delta or 'null'}", *args.overrides])
    run_dir = config.run_dir
    model = run_dir / "model"
    if not model.is_dir():
        raise SystemExit(f"{model} not found: run benchmarks/learn_synthetic.py with --workdir {args.workdir}")
    started = time.perf_counter()
    out = run_dir / f"confidence.{args.mode}.jsonl"
    run_predict(config, mode=args.mode, out=out, model_path=str(model), quiet=True)
    predict_seconds = time.perf_counter() - started
    metrics = run_on_file(out, run_dir / f"eval-confidence-{args.mode}", config.evaluate, run_dir=run_dir,
                           with_meteor=False)
    section = metrics["confidence"]
    calibration = json.loads(calibration_files(out)[1].read_text(encoding="utf-8"))
    per_type = {}
    for name, group in section["per_type"].items():
        per_type[name] = {
            "n": group["n"], "accuracy": group["before"]["accuracy"],
            "ece_before": group["before"]["ece"], "ece_before_ci": group["before"]["ece_ci"],
            "ece_after": group["after"]["ece"], "ece_after_ci": group["after"]["ece_ci"],
            "ece_if_calibrated_after": group["after"]["ece_if_calibrated"],
            "ece_equal_mass_before": group["before"]["ece_equal_mass"],
            "ece_equal_mass_after": group["after"]["ece_equal_mass"],
            "nll_before": group["before"]["nll"], "nll_after": group["after"]["nll"],
            "brier_before": group["before"]["brier"], "brier_after": group["after"]["brier"],
            "aurc": group["aurc"], "accuracy_at_80": group["accuracy_at_80"],
            "accuracy_at_90": group["accuracy_at_90"], "accuracy_at_95": group["accuracy_at_95"],
            "conformal": group.get("conformal"), "answered": group["answered"], "abstained": group["abstained"],
            "accuracy_answered": group["accuracy_answered"],
            "risk_answered": 1 - group["accuracy_answered"] if group["answered"] else None,
            "risk_answered_ci": group.get("risk_answered_ci"),
        }
    log_rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    payload = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/confidence_synthetic.py "
                   f"--workdir {args.workdir} --images {args.images} --mode {args.mode} --scope {args.scope} "
                   f"--alpha {args.alpha} --target-risk {args.target_risk} --risk-delta {args.risk_delta}"
                   + "".join(f" --set {item}" for item in args.overrides),
        "date": time.strftime("%Y-%m-%d"),
        "mode": args.mode,
        "machine": {"cores": os.cpu_count(), "gpu": None},
        "load_average_at_end": os.getloadavg(),
        "predict_seconds": round(predict_seconds, 1),
        "train_steps": log_rows[-1].get("step"), "train_epochs": log_rows[-1].get("epoch"),
        "calibration": {key: calibration.get(key) for key in ("scope", "temperature", "platt", "conformal_quantile",
                                                               "risk_delta", "abstain_threshold", "abstain_validation",
                                                               "rows", "candidate_rows")},
        "per_type": per_type,
        "report": metrics["outputs"].get("report"),
    }
    result = json.loads(args.result.read_text(encoding="utf-8")) if args.result.is_file() else {}
    runs = {**result.get("runs", {}), args.name or str(args.workdir): payload}
    summaries = {mode: summarise([run for run in runs.values() if run.get("mode") == mode])
                 for mode in sorted({run.get("mode") for run in runs.values()})}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.result, {"benchmark": "confidence_synthetic", "runs": runs,
                                     "summary_all_rows_by_mode": summaries})
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
