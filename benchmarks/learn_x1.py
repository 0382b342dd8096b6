"""Learning benchmark for Kvasir-VQA-x1: does the generative path learn free-text answers from the pixels?

The x1 analogue of ``learn_synthetic.py``. Per seed, trains the tiny model from scratch on the synthetic x1 set
(``surgvqa.data.synthetic_x1``: every sentence states what the image shows) for a fixed training budget, with
image-grouped training (each image encoded once per step for all its questions), then generates answers to the
official test split and scores three answerers on the same rows:

- the trained model;
- the untrained model (the same architecture and seed, before training);
- the text-only nearest-question baseline (the answer of the most similar training question; it never sees the
  image, so the trained model's lead over it is what it takes from the pixels).

Reported per seed: atomic-fact recall (overall, per atom type and per complexity), ROUGE-L and normalised exact
match of each, and the trained model's paired differences from both baselines with bootstrap CIs. The seeds run
at once, one torch thread each; ``--clock cpu`` (the default) gives each the same CPU time whatever else runs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_x1.py --minutes 15 --images 1500 --seeds 0 1 2

Prints one JSON object and writes it to benchmarks/results/learn_x1.json; each seed's run is kept under
``--workdir``/s<seed>/ (its predictions, metrics and training log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import load_average, machine_info, run_at_once, write_result
from learn_synthetic import WallClockBudget

import surgvqa
from surgvqa.core.config import load_config
from surgvqa.core.io import atomic_write_json
from surgvqa.inference.nearest_question import nearest_question_predictions
from surgvqa.models.loading import resolve_model_path
from surgvqa.stages.evaluate import run_on_file
from surgvqa.stages.predict import run as run_predict
from surgvqa.stages.prepare import prepare

X1_DEMO = Path(surgvqa.__file__).parent / "configs" / "x1-demo.yaml"
ANSWERERS = ("trained", "untrained", "nearest_question")


def seed_config(args: argparse.Namespace, seed: int):
    overrides = [f"output_dir={args.workdir / f's{seed}'}", "run_name=x1", f"data.synthetic.images={args.images}",
                 f"train.seed={seed}", "train.epochs=1000", "train.save_steps=100000", "train.logging_steps=50",
                 f"train.group_by_image={str(not args.per_sample).lower()}", "train.group_by_length=false",
                 # the budget, not the epoch count, ends training; WallClockBudget decays the rate over it
                 "train.lr_scheduler=constant", "train.warmup_ratio=0", *args.overrides]
    return load_config(X1_DEMO, overrides)


def x1_summary(metrics: dict) -> dict:
    """The figures one answerer is read by, from its metrics.json (x1 section)."""
    x1 = metrics["x1"]
    summary = {"atomic_recall": x1["atomic_recall"]["value"], "atomic_recall_ci": x1["atomic_recall"]["ci"],
               "facts": x1["atomic_recall"]["n"], "rougeL": x1["rougeL"], "exact_match": x1["exact_match"],
               "atomic_recall_per_type": {name: entry["value"] for name, entry in x1["atomic_recall_per_type"].items()
                                          if entry["n"]},
               "per_complexity": {key: {"n": entry["n"], "atomic_recall": entry["atomic_recall"],
                                        "rougeL": entry["rougeL"], "exact_match": entry["exact_match"]}
                                  for key, entry in x1["per_complexity"].items()}}
    if "baseline" in x1:
        paired = x1["baseline"]
        summary["paired"] = {"rows": paired["n_paired"], "atomic_recall": paired.get("atomic_recall"),
                             "rougeL": paired.get("rougeL"), "exact_match": paired.get("exact_match"),
                             "atomic_recall_per_type": paired.get("atomic_recall_per_type"),
                             "atomic_recall_per_complexity": paired.get("atomic_recall_per_complexity")}
    return summary


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    """Train, predict and score one seed; write and return its result."""
    config = seed_config(args, seed)
    run_dir = config.run_dir
    started = time.perf_counter()
    prepared = prepare(config, quiet=True).prepared_dir
    from surgvqa.training.trainer import train as run_train  # after prepare: importing the trainer is slow

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    train_started = time.perf_counter()
    trained = run_train(config, callbacks=[WallClockBudget(args.minutes * 60, cosine=True, clock=clock)])
    train_seconds = time.perf_counter() - train_started
    predictions = {}
    for name, model_path in (("trained", str(trained.model_dir)), ("untrained", resolve_model_path(config))):
        out = run_dir / f"{name}.generate.jsonl"
        out.unlink(missing_ok=True)
        run_predict(config, mode="generate", out=out, model_path=model_path, quiet=True)
        predictions[name] = out
    predictions["nearest_question"] = nearest_question_predictions(prepared, "test",
                                                                   run_dir / "nearest_question.jsonl")
    scored = {}
    for name, path in predictions.items():
        scored[name] = x1_summary(run_on_file(path, run_dir / f"eval-{name}", config.evaluate, with_report=False,
                                              with_meteor=False))
    for baseline in ("untrained", "nearest_question"):
        metrics = run_on_file(predictions["trained"], run_dir / f"eval-trained-vs-{baseline}", config.evaluate,
                              baseline=predictions[baseline], with_report=False, with_meteor=False)
        scored["trained"][f"vs_{baseline}"] = x1_summary(metrics)["paired"]
    log_rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    train_rows = sum(1 for _ in (prepared / "train.jsonl").open())
    epochs = max((row["epoch"] for row in log_rows if "epoch" in row), default=0.0)
    result = {"seed": seed, "train_rows": train_rows, "test_rows": sum(1 for _ in (prepared / "test.jsonl").open()),
              "train_steps": trained.global_step, "train_seconds": round(train_seconds, 1),
              "epochs": round(epochs, 2), "questions_trained": round(epochs * train_rows),
              "final_mean_loss": trained.final_loss, "seconds": round(time.perf_counter() - started, 1),
              "results": scored}
    atomic_write_json(args.workdir / f"s{seed}.json", result)
    return result


def run_all(args: argparse.Namespace) -> None:
    """Start one process per seed, one torch thread each, and wait for them all."""
    run_at_once({f"s{seed}": [sys.executable, __file__, "--one-seed", str(seed), "--minutes", str(args.minutes),
                              "--clock", args.clock, "--images", str(args.images), "--workdir", str(args.workdir),
                              *(["--per-sample"] if args.per_sample else []),
                              *[item for override in args.overrides for item in ("--set", override)]]
                 for seed in args.seeds}, args.workdir)


def mean_range(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarise(args: argparse.Namespace) -> dict:
    per_seed = {seed: json.loads((args.workdir / f"s{seed}.json").read_text()) for seed in args.seeds}
    over_seeds = {name: {metric: mean_range([per_seed[s]["results"][name][metric] for s in args.seeds])
                         for metric in ("atomic_recall", "rougeL", "exact_match")} for name in ANSWERERS}
    deltas = {seed: run["results"]["trained"]["vs_nearest_question"]["atomic_recall"]
              for seed, run in per_seed.items()}
    return {"per_seed": per_seed, "over_seeds": over_seeds,
            "trained_minus_nearest_question_recall": {seed: {"delta": d["delta"], "ci": d["delta_ci"]}
                                                      for seed, d in deltas.items()},
            "beats_text_only_baseline_on_every_seed": all(d["delta_ci"][0] > 0 for d in deltas.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="each seed's training budget")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="measure the budget in wall-clock time or in each process's CPU time")
    parser.add_argument("--images", type=int, default=1500, help="synthetic images (5-7 x1 questions each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-sample", action="store_true", help="train per question instead of per image")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-learn-x1"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--summarise-only", action="store_true", help="only summarise the seeds --workdir holds")
    parser.add_argument("--result-name", default="learn_x1",
                        help="the summary goes to benchmarks/results/<result-name>.json")
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.one_seed is not None:
        one_seed(args, args.one_seed)
        return
    started = time.perf_counter()
    if not args.summarise_only:
        run_all(args)
    payload = {"benchmark": "learn_x1",
               "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_x1.py --minutes {args.minutes} "
                          f"--images {args.images} --seeds {' '.join(map(str, args.seeds))}"
                          + (f" --clock {args.clock}" if args.clock != "cpu" else "")
                          + (" --per-sample" if args.per_sample else "")
                          + "".join(f" --set {item}" for item in args.overrides)
                          + (f" --result-name {args.result_name}" if args.result_name != "learn_x1" else ""),
               "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "load_average_at_end": load_average(),
               "budget": f"{args.minutes} {args.clock.upper()} minutes of training per seed, one torch thread, "
                         f"{'per-sample' if args.per_sample else 'image-grouped'} training",
               **summarise(args), "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.result_name, payload)


if __name__ == "__main__":
    main()
