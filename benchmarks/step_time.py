"""surgvqa's training step on the peers benchmark's work, in-process: samples/s and peak RSS.

The same tiny model, 256 records and settings as ``benchmarks/peers/run.py --peer surgvqa`` (full fine-tuning,
batch 16, one torch thread), without the peers' probe or the per-seed inference, so that two versions of the
training code can be compared minutes apart. Runs ``--repeats`` trainings of ``--steps`` steps each and prints
one JSON line per training, then the summary. To compare with an earlier commit:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/step_time.py   # that commit's src/, same environment
    .venv/bin/python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

from run import BATCH, LR, OFFLINE, WARMUP_STEPS, prepare_shared, surgvqa_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "runs" / "peers")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    import torch
    from transformers import TrainerCallback

    import surgvqa
    from surgvqa.core.config import load_config
    from surgvqa.training.trainer import train

    torch.set_num_threads(1)
    work = args.workdir.resolve()
    prepare_shared(work)

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_: object, **__: object) -> None:
            self.ends.append(time.perf_counter())

    rates = []
    for repeat in range(args.repeats):
        run_dir = work / "surgvqa-step-time"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(work / "train256" / "prepared", run_dir / "prepared")
        config = load_config(None, [*surgvqa_overrides(work, run_dir.name), f"train.max_steps={args.steps}",
                                    f"train.per_device_batch_size={BATCH}", "train.grad_accum=1", f"train.lr={LR}",
                                    "train.vision_lr=null", "train.warmup_ratio=0", "train.lr_scheduler=cosine",
                                    "train.seed=0", "train.logging_steps=1000", f"train.save_steps={args.steps}",
                                    "train.num_workers=0", "model.freeze_vision=false", "lora=null"])
        steps = StepEnds()
        train(config, callbacks=[steps])
        timed = steps.ends[WARMUP_STEPS - 1:]
        rate = BATCH * (len(timed) - 1) / (timed[-1] - timed[0])
        rates.append(rate)
        print(json.dumps({"repeat": repeat, "samples_per_s": round(rate, 2)}), flush=True)
    print(json.dumps({"source": str(Path(surgvqa.__file__).parent), "steps": args.steps,
                      "timed_steps": args.steps - WARMUP_STEPS, "samples_per_s_mean": round(sum(rates) / len(rates), 2),
                      "samples_per_s_min": round(min(rates), 2), "samples_per_s_max": round(max(rates), 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
