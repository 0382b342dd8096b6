"""Learning benchmark with image-grouped training: does `train.group_by_image` learn as well as per-sample training
in the same budget?

For each seed, two runs of `learn_synthetic.py` with the same data, budget and settings, one per-sample and one
grouped (`train.group_by_image=true`), all started at once, each at one torch thread with its budget measured in
its own CPU time (``--clock cpu``), so that runs sharing the machine still get the same compute. Then, per seed,
the grouped model's constrained predictions are compared with the per-sample model's on the same test questions
(paired bootstrap CI per type), and the summary goes to benchmarks/results/learn_grouped.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_grouped.py --minutes 5 --images 2000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import load_average, machine_info, run_at_once, write_result

from surgvqa.core.config import load_config
from surgvqa.stages.evaluate import run_on_file

MODES = {"separate": "false", "grouped": "true"}


def run_name(seed: int, mode: str) -> str:
    return f"s{seed}-{mode}"


def train_all(args: argparse.Namespace) -> None:
    """Start every (seed, mode) run of learn_synthetic.py at once and wait for them all."""
    script = Path(__file__).resolve().parent / "learn_synthetic.py"
    run_at_once({run_name(seed, mode): [sys.executable, str(script), "--minutes", str(args.minutes), "--clock", "cpu",
                                        "--images", str(args.images), "--modes", "constrained",
                                        "--workdir", str(args.workdir / run_name(seed, mode)),
                                        "--results", str(args.workdir / f"{run_name(seed, mode)}.json"),
                                        "--set", f"train.seed={seed}", "--set", f"train.group_by_image={grouped}"]
                 for seed in args.seeds for mode, grouped in MODES.items()}, args.workdir)


def summarise(args: argparse.Namespace) -> dict:
    settings = load_config(None, []).evaluate
    per_seed = {}
    for seed in args.seeds:
        runs = {mode: json.loads((args.workdir / f"{run_name(seed, mode)}.json").read_text()) for mode in MODES}
        predictions = {mode: args.workdir / run_name(seed, mode) / "learn" / "trained.constrained.jsonl"
                       for mode in MODES}
        paired = run_on_file(predictions["grouped"], args.workdir / f"{run_name(seed, 'grouped')}-vs-separate",
                             settings, baseline=predictions["separate"], with_report=False, with_meteor=False)
        per_seed[seed] = {
            mode: {"train_steps": run["train_steps"], "train_seconds": run["train_seconds"],
                   "final_mean_loss": run["final_mean_loss"],
                   "strict": {name: entry["strict"]
                              for name, entry in run["results"]["trained_constrained"]["per_type"].items()},
                   "untrained_strict": {name: entry["strict"]
                                        for name, entry in run["results"]["untrained_constrained"]["per_type"].items()}}
            for mode, run in runs.items()}
        per_seed[seed]["grouped_minus_separate"] = {
            name: {"delta_strict": entry["delta_strict"], "delta_strict_ci": entry["delta_strict_ci"]}
            for name, entry in paired["baseline"]["per_type"].items() if entry}
    types = list(per_seed[args.seeds[0]]["separate"]["strict"])
    mean_range = {
        mode: {name: {"mean": statistics.fmean(per_seed[s][mode]["strict"][name] for s in args.seeds),
                      "min": min(per_seed[s][mode]["strict"][name] for s in args.seeds),
                      "max": max(per_seed[s][mode]["strict"][name] for s in args.seeds)} for name in types}
        for mode in MODES}
    return {"per_seed": per_seed, "mean_range": mean_range}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="each run's training budget in CPU minutes")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-learn-grouped"))
    parser.add_argument("--summarise-only", action="store_true",
                        help="only compare the runs a previous call left in --workdir")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.summarise_only:
        train_all(args)
    payload = {"benchmark": "learn_grouped",
               "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learn_grouped.py --minutes {args.minutes} "
                          f"--images {args.images} --seeds {' '.join(map(str, args.seeds))}",
               "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "load_average_at_end": load_average(),
               "budget": f"{args.minutes} CPU minutes of training per run, one torch thread",
               **summarise(args), "seconds": round(time.perf_counter() - started, 1)}
    write_result("learn_grouped", payload)


if __name__ == "__main__":
    main()
