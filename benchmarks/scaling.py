"""How prepare, encoding and evaluation scale with the data: wall time at 1x, 4x and 16x synthetic images.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaling.py [--images 100 400 1600] [--repeats 2]
  -> prints one JSON object and writes benchmarks/results/scaling.json (about 1 minute on 2 CPU cores)

Per size: the synthetic Kvasir-like set is generated first (not timed; kept in the config's cache directory), then
- ``prepare``: read the parquet, validate, split by image, type, write prepared/ (``surgvqa.stages.prepare.prepare``);
- ``encode``: ``encode_example`` (image read + the one processor call + labels) over every train record, one
  process, as ``VQADataset.__getitem__`` does it;
- ``evaluate``: ``run_on_file`` without the HTML report and without METEOR, on predictions built from the prepared
  records of all three splits (the reference answer for even rows, a wrong candidate for odd rows; 1,000
  bootstrap resamples). The test split alone is 118 rows at 1x: evaluated in 20 ms, all fixed cost, no slope.
Everything runs with one torch thread (``--threads``; a DataLoader worker's setting too): on a shared 2-core machine
two intra-op threads make the processor's small ops spin-wait, up to 25x slower. Each stage is timed
``--repeats`` times and the fastest is kept (the machine is shared). The exponent ``b`` of ``time = a * rows^b``
is fitted on log-log axes (``numpy.polyfit``) per stage; linear scaling is ``b`` close to 1
(a fixed start-up cost pulls it below 1 at small sizes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from _common import load_average, machine_info, write_result

from surgvqa.core.config import EvaluateConfig, load_config
from surgvqa.core.io import write_jsonl
from surgvqa.data.records import Record, read_records
from surgvqa.data.synthetic import synthetic_source
from surgvqa.models.loading import load_processor, resolve_model_path
from surgvqa.prompting.encoding import encode_example, load_image
from surgvqa.stages.evaluate import run_on_file
from surgvqa.stages.prepare import prepare


def synthetic_predictions(records: list[Record]) -> list[dict]:
    """Right for even rows, a wrong candidate (or a wrong free text) for odd rows."""
    rows = []
    for index, record in enumerate(records):
        prediction = record.answer
        if index % 2:
            wrong = [c for c in record.candidates if c.lower() != record.answer.lower()]
            prediction = wrong[0] if wrong else "a wrong answer"
        rows.append({"id": record.id, "img_id": record.img_id, "question": record.question,
                     "question_type": record.question_type, "template": record.template, "answer": record.answer,
                     "prediction": prediction, "raw_text": prediction, "error": None,
                     "multi_label": record.multi_label, "candidates": record.candidates})
    return rows


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(images: int, workdir: Path, processor, repeats: int) -> dict:
    config = load_config(None, [f"output_dir={workdir}", f"run_name=scale{images}",
                                f"data.synthetic.images={images}"])
    generation_start = time.perf_counter()
    synthetic_source(config)  # generated once, not timed
    generation = time.perf_counter() - generation_start
    prepare_seconds = best_of(repeats, lambda: prepare(config, quiet=True))
    prepared = config.run_dir / "prepared"
    train = read_records(prepared / "train.jsonl")
    every = [record for name in ("train", "val", "test") for record in read_records(prepared / f"{name}.jsonl")]
    rows = len(every)

    def encode_all() -> None:
        for record in train:
            encode_example(processor, record, load_image(record, prepared), config.prompt, config.masking)

    encode_seconds = best_of(repeats, encode_all)
    predictions = workdir / f"predictions-{images}.jsonl"
    write_jsonl(predictions, synthetic_predictions(every))
    settings = EvaluateConfig()
    evaluate_seconds = best_of(repeats, lambda: run_on_file(predictions, workdir / f"eval-{images}", settings,
                                                             with_report=False, with_meteor=False))
    return {"images": images, "rows": rows, "train_records": len(train), "evaluated_rows": rows,
            "synthetic_generation_s_untimed": round(generation, 3),
            "prepare_s": round(prepare_seconds, 3), "encode_s": round(encode_seconds, 3),
            "evaluate_s": round(evaluate_seconds, 3),
            "prepare_rows_per_s": round(rows / prepare_seconds, 1),
            "encode_samples_per_s": round(len(train) / encode_seconds, 1),
            "evaluate_rows_per_s": round(rows / evaluate_seconds, 1),
            "load_average": load_average()}


def exponent(sizes: list[int], seconds: list[float]) -> float:
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return round(float(slope), 3)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load_start = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-scaling-"))
    base_config = load_config(None, [f"output_dir={workdir}"])
    processor = load_processor(resolve_model_path(base_config), base_config.model, base_config.masking.strategy)
    sizes = [measure(images, workdir, processor, args.repeats) for images in args.images]
    fits = {
        "prepare": exponent([s["rows"] for s in sizes], [s["prepare_s"] for s in sizes]),
        "encode": exponent([s["train_records"] for s in sizes], [s["encode_s"] for s in sizes]),
        "evaluate": exponent([s["evaluated_rows"] for s in sizes], [s["evaluate_s"] for s in sizes]),
    }
    # Over the two largest sizes only: the start-up share is smallest there.
    upper = {
        "prepare": exponent([s["rows"] for s in sizes[-2:]], [s["prepare_s"] for s in sizes[-2:]]),
        "encode": exponent([s["train_records"] for s in sizes[-2:]], [s["encode_s"] for s in sizes[-2:]]),
        "evaluate": exponent([s["evaluated_rows"] for s in sizes[-2:]], [s["evaluate_s"] for s in sizes[-2:]]),
    }
    result = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "sizes": sizes,
        "exponent_time_vs_rows": fits,
        "exponent_two_largest_sizes": upper,
        "goal": "each exponent about 1 (linear); 0.8 <= b <= 1.2 counted as linear",
        "linear": {stage: 0.8 <= value <= 1.2 for stage, value in fits.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return write_result("scaling", result)


if __name__ == "__main__":
    main()
