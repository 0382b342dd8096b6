"""Prepare at Kvasir-VQA scale (>= 50,000 rows) and encoding throughput with DataLoader workers.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prepare_50k.py
  -> prints one JSON object and writes benchmarks/results/prepare_50k.json (under a minute on 2 CPU cores)

1. ``prepare`` on a synthetic Kvasir-like set of 6,150 images (~50,000 question rows; generated first, not
   timed, into the config's cache directory): read the parquet, check every image, write it out, split by image,
   type every question, write prepared JSONL. Goal (issue 2): under 60 s.
2. Encoding throughput (issue 4): ``DataLoader(VQADataset(...), batch_size=16, collate_fn=TrainingCollator(...))``
   over the first 1,008 prepared training samples with ``num_workers=2``, and beside it ``num_workers=0`` with the
   process's default torch threads (as a plain ``surgvqa train`` runs) and with one thread (what each worker
   uses). The workers' start-up is included, as a training epoch pays it too. On a shared 2-core machine the
   default two intra-op threads make the processor's small ops spin-wait: compare the two ``num_workers=0`` rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _common import load_average, machine_info, write_result

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.data.synthetic import synthetic_source
from surgvqa.models.loading import load_processor, resolve_model_path
from surgvqa.stages.prepare import prepare
from surgvqa.training.dataset import TrainingCollator, VQADataset

IMAGES = 6_150
ENCODE_SAMPLES = 1_008  # 63 batches of 16
BATCH = 16
GOAL_PREPARE_S = 60.0


def encode_throughput(dataset: VQADataset, collator: TrainingCollator, workers: int, threads: int) -> dict:
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collator)
    samples = tokens = 0
    for batch in loader:
        samples += int(batch["input_ids"].shape[0])
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    torch.set_num_threads(default_threads)
    return {"num_workers": workers, "main_process_torch_threads": threads, "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--workdir", type=Path, default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()

    started = time.perf_counter()
    load_start = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-prepare50k-"))
    config = load_config(None, [f"output_dir={workdir}", "run_name=prep50k", f"data.synthetic.images={args.images}"])
    generation_start = time.perf_counter()
    synthetic_source(config)
    generation = time.perf_counter() - generation_start

    load_before = load_average()
    start = time.perf_counter()
    result_prepare = prepare(config, quiet=True)
    prepare_seconds = time.perf_counter() - start
    rows = sum(result_prepare.counts.values())
    load_prepare = load_average()

    processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
    prepared = config.run_dir / "prepared"
    records = read_records(prepared / "train.jsonl")[:ENCODE_SAMPLES]
    dataset = VQADataset(records, prepared, processor, config.prompt, config.masking)
    collator = TrainingCollator(processor.tokenizer.pad_token_id)
    dataset[0]  # warm the processor (first-call caches) outside both timings
    threads = torch.get_num_threads()
    encoding = {"workers_0": encode_throughput(dataset, collator, 0, threads),
                "workers_0_one_thread": encode_throughput(dataset, collator, 0, 1),
                "workers_2": encode_throughput(dataset, collator, 2, threads)}

    result = {
        "benchmark": "prepare_50k",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_during_prepare": [load_before, load_prepare],
        "load_average_end": load_average(),
        "prepare": {"images": args.images, "rows_kept": rows, "rows_rejected": sum(result_prepare.rejects.values()),
                    "splits": result_prepare.counts, "seconds": round(prepare_seconds, 2),
                    "rows_per_s": round(rows / prepare_seconds, 1),
                    "synthetic_generation_s_untimed": round(generation, 2),
                    "goal_s": GOAL_PREPARE_S, "met": prepare_seconds < GOAL_PREPARE_S},
        "encoding": {"batch_size": BATCH, **encoding,
                     "speedup_2_workers_vs_0": round(encoding["workers_2"]["samples_per_s"]
                                                     / encoding["workers_0"]["samples_per_s"], 2),
                     "speedup_2_workers_vs_0_one_thread": round(encoding["workers_2"]["samples_per_s"]
                                                                / encoding["workers_0_one_thread"]["samples_per_s"], 2)},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return write_result("prepare_50k", result)


if __name__ == "__main__":
    main()
