"""Learning benchmark: does the pipeline learn from pixels?

Trains the tiny model from scratch on a synthetic Kvasir-like training split for a fixed CPU wall-clock budget,
then scores the synthetic test split with every inference mode, beside the untrained model and the
majority-class answer of each template (computed on the training split). Prints one JSON object and writes it
to benchmarks/results/learn_synthetic.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_synthetic.py --minutes 30

``--clock cpu`` measures the budget in the process's CPU time instead: at one torch thread, runs that share the
machine (per-sample beside grouped training, say) then each get the same compute whatever else is running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from surgvqa.core.config import load_config
from surgvqa.core.io import atomic_write_json, write_jsonl
from surgvqa.data.answers import normalize_answer
from surgvqa.data.records import read_records
from surgvqa.models.loading import resolve_model_path
from surgvqa.stages.evaluate import run_on_file
from surgvqa.stages.predict import run as run_predict
from surgvqa.stages.prepare import prepare

RESULTS = Path(__file__).parent / "results"
MODES = ("generate", "constrained", "rank")


@dataclass
class TrainSummary:
    model_dir: Path
    global_step: int
    final_loss: float | None


class WallClockBudget(TrainerCallback):
    """Stop training once the budget is spent (checked at every step end) and, with ``cosine``, decay the
    learning rate to zero over that time: the number of steps a budget buys is unknown in advance, so a
    step-based schedule could not end on time."""

    def __init__(self, seconds: float, cosine: bool = False, clock=time.perf_counter):
        self.seconds = seconds
        self.cosine = cosine
        self.clock = clock
        self.started = clock()

    def spent(self) -> float:
        return min(1.0, (self.clock() - self.started) / self.seconds)

    def multiplier(self, _step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * self.spent()))

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.started = self.clock()
        if self.cosine and lr_scheduler is not None:
            lr_scheduler.lr_lambdas = [self.multiplier] * len(lr_scheduler.lr_lambdas)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.spent() >= 1.0:
            control.should_training_stop = True
        return control


def majority_predictions(prepared: Path, out: Path) -> Path:
    """The most frequent training answer of each template (or type), as a predictions file."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in read_records(prepared / "train.jsonl"):
        counts[str(record.template or record.question_type)][normalize_answer(record.answer)] += 1
    rows = []
    for record in read_records(prepared / "test.jsonl"):
        key = str(record.template or record.question_type)
        answer = counts[key].most_common(1)[0][0] if counts[key] else ""
        rows.append({"id": record.id, "img_id": record.img_id, "image": str(prepared / record.image),
                     "question": record.question, "question_type": record.question_type,
                     "template": record.template, "answer": record.answer, "prediction": answer,
                     "raw_text": answer, "mode": "majority", "scores": None, "error": None,
                     "multi_label": record.multi_label, "candidates": record.candidates})
    write_jsonl(out, rows)
    return out


def summarise(metrics: dict) -> dict:
    per_type = {name: {"n": entry["n"], "strict": entry["strict"], "strict_ci": entry["strict_ci"],
                       "tolerant": entry.get("tolerant")}
                for name, entry in metrics["per_type"].items() if entry.get("n")}
    per_template = {name: round(entry["strict"], 4) for name, entry in metrics["per_template"].items()
                    if entry.get("n")}
    summary = {"per_type": per_type, "per_template": per_template,
               "micro_strict": metrics["overall"]["micro_strict"]}
    if metrics.get("baseline"):
        summary["vs_baseline"] = {name: {"delta_strict": entry["delta_strict"],
                                         "delta_strict_ci": entry["delta_strict_ci"]}
                                  for name, entry in metrics["baseline"]["per_type"].items() if entry}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="measure the budget in wall-clock time or in this process's CPU time")
    parser.add_argument("--modes", default=",".join(MODES), help="trained model's prediction modes, comma-separated")
    parser.add_argument("--results", type=Path, default=RESULTS / "learn_synthetic.json",
                        help="where the JSON summary goes")
    parser.add_argument("--images", type=int, default=4000, help="synthetic images (about 8 questions each)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-learn"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--reuse-model", action="store_true",
                        help="score the model a previous run of this script trained (its figures come from its log)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    overrides = [f"output_dir={args.workdir}", "run_name=learn", f"data.synthetic.images={args.images}",
                 "train.epochs=1000", "train.save_steps=100000", "train.logging_steps=50",
                 # 84 px = 3 x 3 merged 28-px tokens: one image token per grid cell of the synthetic scene
                 "data.synthetic.image_size=84",
                 # measured (docs/benchmarks.md): the random vision tower learns best at a sixth of the text rate
                 "train.lr=3e-3", "train.vision_lr=5e-4", "train.group_by_length=false",
                 # the budget, not the epoch count, ends training; WallClockBudget decays the rate over it
                 "train.lr_scheduler=constant", "train.warmup_ratio=0", *args.overrides]
    config = load_config(None, overrides)
    started = time.perf_counter()
    if args.reuse_model:
        prepared = config.run_dir / "prepared"
        log_rows = [json.loads(line) for line in (config.run_dir / "train_log.jsonl").read_text().splitlines()]
        final = log_rows[-1]
        result = TrainSummary(config.run_dir / "model", final["step"], final["train_loss"])
        train_seconds = final["train_runtime"]
    else:
        prepared = prepare(config, quiet=True).prepared_dir
        from surgvqa.training.trainer import train as run_train

        train_started = time.perf_counter()
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        trained = run_train(config, callbacks=[WallClockBudget(args.minutes * 60, cosine=True, clock=clock)])
        train_seconds = time.perf_counter() - train_started
        result = TrainSummary(trained.model_dir, trained.global_step, trained.final_loss)

    run_dir = config.run_dir
    (run_dir / "untrained.constrained.jsonl").unlink(missing_ok=True)
    untrained = run_predict(config, mode="constrained", out=run_dir / "untrained.constrained.jsonl",
                            model_path=resolve_model_path(config), quiet=True)
    majority = majority_predictions(prepared, run_dir / "majority.jsonl")
    results: dict = {"untrained_constrained": summarise(run_on_file(untrained, run_dir / "eval-untrained",
                                                                      config.evaluate, with_report=False,
                                                                      with_meteor=False)),
                     "majority": summarise(run_on_file(majority, run_dir / "eval-majority", config.evaluate,
                                                        with_report=False, with_meteor=False))}
    for mode in args.modes.split(","):
        out = run_dir / f"trained.{mode}.jsonl"
        out.unlink(missing_ok=True)
        mode_started = time.perf_counter()
        run_predict(config, mode=mode, out=out, model_path=str(result.model_dir), quiet=True)
        seconds = time.perf_counter() - mode_started
        for name, baseline in (("untrained", untrained), ("majority", majority)):
            metrics = run_on_file(out, run_dir / f"eval-{mode}-vs-{name}", config.evaluate, baseline=baseline,
                                   with_report=False, with_meteor=False)
            results.setdefault(f"trained_{mode}", summarise(metrics))
            results[f"trained_{mode}"][f"vs_{name}"] = summarise(metrics).get("vs_baseline")
        results[f"trained_{mode}"]["predict_seconds"] = round(seconds, 1)

    payload = {
        "benchmark": "learn_synthetic",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_synthetic.py "
                   + " ".join(f"--{k} {v}" for k, v in (("minutes", args.minutes), ("images", args.images)))
                   + (" --clock cpu" if args.clock == "cpu" else "")
                   + ("" if args.modes == ",".join(MODES) else f" --modes {args.modes}")
                   + "".join(f" --set {item}" for item in args.overrides)
                   + (" --reuse-model" if args.reuse_model else ""),
        "machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "gpu": None},
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_end": os.getloadavg(),
        "images": args.images, "train_rows": sum(1 for _ in (prepared / "train.jsonl").open()),
        "test_rows": sum(1 for _ in (prepared / "test.jsonl").open()),
        "train_steps": result.global_step, "train_seconds": round(train_seconds, 1), "budget_clock": args.clock,
        "final_mean_loss": result.final_loss,
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": {key: config.to_dict()[key] for key in ("model", "train", "lora")},
        "results": results,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results, payload)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
