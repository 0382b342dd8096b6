"""Confidence benchmark: calibration, conformal coverage and abstention on the learning benchmark's model.

Predicts the synthetic test split with the model ``learn_synthetic.py`` trained (same ``--workdir`` and
``--images``), with temperature scaling, split-conformal answer sets and abstention fitted on the validation split
(docs/confidence.md), evaluates, prints one JSON object and writes benchmarks/results/confidence_synthetic.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_synthetic.py --minutes 30
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/confidence_synthetic.py --mode rank
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from surgvqa.config import load_config
from surgvqa.evaluate import run_evaluate
from surgvqa.io import atomic_write_json
from surgvqa.predict import calibration_files, run_predict

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-learn"))
    parser.add_argument("--images", type=int, default=4000, help="as given to learn_synthetic.py")
    parser.add_argument("--mode", choices=("constrained", "rank"), default="rank")
    parser.add_argument("--scope", choices=("overall", "per_type"), default="per_type")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--target-risk", type=float, default=0.05)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(None, [f"output_dir={args.workdir}", "run_name=learn",
                                f"data.synthetic.images={args.images}", "data.synthetic.image_size=84",
                                f"predict.calibration={args.scope}", f"predict.conformal_alpha={args.alpha}",
                                "predict.abstain=true", f"predict.target_risk={args.target_risk}"])
    run_dir = config.run_dir
    model = run_dir / "model"
    if not model.is_dir():
        raise SystemExit(f"{model} not found: run benchmarks/learn_synthetic.py with --workdir {args.workdir}")
    started = time.perf_counter()
    out = run_dir / f"confidence.{args.mode}.jsonl"
    run_predict(config, mode=args.mode, out=out, model_path=str(model), quiet=True)
    predict_seconds = time.perf_counter() - started
    metrics = run_evaluate(out, run_dir / f"eval-confidence-{args.mode}", config.evaluate, run_dir=run_dir,
                           with_meteor=False)
    section = metrics["confidence"]
    calibration = json.loads(calibration_files(out)[1].read_text(encoding="utf-8"))
    per_type = {}
    for name, group in section["per_type"].items():
        per_type[name] = {
            "n": group["n"], "accuracy": group["before"]["accuracy"],
            "ece_before": group["before"]["ece"], "ece_before_ci": group["before"]["ece_ci"],
            "ece_after": group["after"]["ece"], "ece_after_ci": group["after"]["ece_ci"],
            "ece_equal_mass_before": group["before"]["ece_equal_mass"],
            "ece_equal_mass_after": group["after"]["ece_equal_mass"],
            "nll_before": group["before"]["nll"], "nll_after": group["after"]["nll"],
            "brier_before": group["before"]["brier"], "brier_after": group["after"]["brier"],
            "aurc": group["aurc"], "accuracy_at_80": group["accuracy_at_80"],
            "accuracy_at_90": group["accuracy_at_90"], "accuracy_at_95": group["accuracy_at_95"],
            "conformal": group.get("conformal"), "answered": group["answered"], "abstained": group["abstained"],
            "accuracy_answered": group["accuracy_answered"],
        }
    payload = {
        "benchmark": "confidence_synthetic",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/confidence_synthetic.py "
                   f"--workdir {args.workdir} --images {args.images} --mode {args.mode} --scope {args.scope} "
                   f"--alpha {args.alpha} --target-risk {args.target_risk}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cores": os.cpu_count(), "gpu": None},
        "load_average_at_end": os.getloadavg(),
        "predict_seconds": round(predict_seconds, 1),
        "calibration": {key: calibration.get(key) for key in ("scope", "temperature", "conformal_quantile",
                                                               "abstain_threshold", "rows", "candidate_rows")},
        "per_type": per_type,
        "report": metrics["outputs"].get("report"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "confidence_synthetic.json", payload)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
