"""Training throughput and peak memory: surgvqa's trainer against TRL's ``SFTTrainer``, and supervised-only logits
against the model's own full-vocabulary loss.

Needs TRL: ``.venv/bin/pip install -e '.[bench]'`` after the README's set-up (``make test``). Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_vs_trl.py

-> prints one JSON object and writes benchmarks/results/train_vs_trl.json (about 6 minutes on 2 CPU cores, most
of it TRL's 18 steps).

Part 1 (trainers). Same tiny model (default config: full fine-tuning, fp32, no gradient checkpointing), same 256
prepared synthetic training records, batch 16, 18 steps of which the first 2 are warm-up and excluded from the
timing, same optimiser settings and seed. Both trainers use the HF Trainer's random sampler with the same seed,
so step k sees the same samples in both (checked: the non-padding tokens of every timed step are equal). surgvqa:
``SupervisedOnlyTrainer`` + ``VQADataset`` + ``TrainingCollator`` (answer + ``<|im_end|>`` supervised). TRL:
``SFTTrainer`` on a ``datasets.Dataset`` with ``images`` (decoded lazily from the same PNG files), ``prompt`` (the
same system prompt and user text, from ``surgvqa.prompting.chat.build_messages``) and ``completion`` (the same normalised
answer) in conversational form, ``max_length=None``. TRL's defaults ``bf16=True`` and ``gradient_checkpointing=True``
are switched off so both train the same fp32 model the same way; TRL then applies its own fused LM head (only
positions with a label are projected onto the vocabulary) and computes its entropy / token-accuracy metrics.
Each framework runs in its own child process (so ``ru_maxrss`` is its own peak); ``--repeats N`` alternates N
runs of each and compares the best (the machine is shared), every run is listed. Children use one torch thread
(``--threads``): on this shared 2-core machine two intra-op threads per process turn the processor's small ops
into spin-waits (measured: 40 ms instead of 1.6 ms per encoded sample while another training job shared the machine).

Why TRL is slow here: on a device without Triton (CPU), TRL 1.16's fused LM head scores *every* position through
the 151,657-wide vocabulary in torch tiles (``compact = _use_triton(device)`` is False), with entropy and top-1
outputs, and again in the backward; on CUDA it projects only the labelled positions, so this CPU ratio says
nothing about the GPU one.

Part 2 (issue 5). One optimiser step on the same 32-sample batch: ``surgvqa.training.trainer.supervised_only_loss`` (LM head
on supervised positions only) against ``model(**batch, labels=labels).loss`` (151,657-wide logits at every
position), 1 warm-up + 4 timed steps, each in its own child process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

from _common import load_average, machine_info, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLES = 256
BATCH = 16
WARMUP_STEPS = 2
TIMED_STEPS = 16
LOGITS_BATCH = 32
LOGITS_TIMED_STEPS = 4
REPEATS = 1
GOALS = {"throughput_ratio_min": 3.0, "peak_rss_ratio_max": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _config(workdir: Path):
    from surgvqa.core.config import load_config

    return load_config(None, [f"output_dir={workdir}", "run_name=bench"])


def _prepared(workdir: Path) -> Path:
    return workdir / "bench" / "prepared"


def _records(workdir: Path, limit: int):
    from surgvqa.data.records import read_records

    return read_records(_prepared(workdir) / "train.jsonl")[:limit]


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trl_dataset(records, prepared: Path, prompt):
    """The same records as TRL's vision prompt/completion dataset; images decode lazily from the same files."""
    import datasets

    from surgvqa.prompting.chat import build_messages, training_target

    rows = [{"images": [str(prepared / record.image)],
             "prompt": build_messages(record, prompt),
             "completion": [{"role": "assistant",
                             "content": [{"type": "text", "text": training_target(record, prompt)}]}]}
            for record in records]
    image_list = datasets.List(datasets.Image()) if hasattr(datasets, "List") else datasets.Sequence(datasets.Image())
    return datasets.Dataset.from_list(rows).cast_column("images", image_list)


# ----------------------------------------------------------------------------------------------------------------
# Children: one framework (or one loss) per process
# ----------------------------------------------------------------------------------------------------------------


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: dict[int, float] = {}

        def on_step_end(self, args, state, control, **_):
            self.ends[state.global_step] = time.perf_counter()

    return StepTimer()


def _instrumented(trainer_class):
    """Record, per micro-batch, non-padding tokens, supervised labels, padded width and loss."""

    class Instrumented(trainer_class):
        batches: ClassVar[list[dict]] = []  # one trainer per child process

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            row = {"tokens": int(inputs["attention_mask"].sum()), "supervised": int((labels != -100).sum()),
                   "width": int(labels.shape[1]), "samples": int(labels.shape[0])}
            if not self.batches:
                first = labels[0][labels[0] != -100]
                row["first_sample_supervised_text"] = self.processing_class_tokenizer.decode(first)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if isinstance(result, tuple) else result
            row["loss"] = round(float(loss.detach()), 5)
            self.batches.append(row)
            return result

    return Instrumented


def run_trainer_child(framework: str, workdir: Path) -> dict:
    import torch

    from surgvqa.models.loading import load_model, load_processor, resolve_model_path
    from surgvqa.training.dataset import TrainingCollator, VQADataset
    from surgvqa.training.trainer import SupervisedOnlyTrainer, build_model_for_training, training_arguments

    config = _config(workdir)
    records = _records(workdir, SAMPLES)
    base = resolve_model_path(config)
    processor = load_processor(base, config.model, config.masking.strategy)
    steps = WARMUP_STEPS + TIMED_STEPS
    args = training_arguments(config, workdir / f"out-{framework}", max_steps=steps, batch_size=BATCH, grad_accum=1,
                              save=False, report_tensorboard=False)
    timer = _step_timer()
    if framework == "surgvqa":
        model = build_model_for_training(config, base, processor)
        dataset = VQADataset(records, _prepared(workdir), processor, config.prompt, config.masking)
        trainer_class = _instrumented(SupervisedOnlyTrainer)
        trainer_class.processing_class_tokenizer = processor.tokenizer
        # lengths=None: the HF random sampler, as TRL's, so both see the same samples at every step
        trainer = trainer_class(model=model, args=args, train_dataset=dataset,
                                data_collator=TrainingCollator(processor.tokenizer.pad_token_id), lengths=None,
                                callbacks=[timer])
    else:
        from trl import SFTConfig, SFTTrainer

        model = load_model(base, config, processor, for_training=True)
        dataset = trl_dataset(records, _prepared(workdir), config.prompt)
        shared = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "learning_rate",
                  "weight_decay", "warmup_steps", "lr_scheduler_type", "max_grad_norm", "logging_steps",
                  "logging_first_step", "seed", "data_seed", "use_cpu", "dataloader_num_workers", "disable_tqdm")
        sft_args = SFTConfig(output_dir=str(workdir / "out-trl"), save_strategy="no", report_to=[],
                             max_length=None, bf16=False, gradient_checkpointing=False,
                             remove_unused_columns=False, **{name: getattr(args, name) for name in shared})
        trainer_class = _instrumented(SFTTrainer)
        trainer_class.processing_class_tokenizer = processor.tokenizer
        trainer = trainer_class(model=model, args=sft_args, train_dataset=dataset, processing_class=processor,
                                callbacks=[timer])
    rss_before = current_rss_mb()
    trainer.train()
    batches = trainer_class.batches
    timed = batches[WARMUP_STEPS:steps]
    seconds = timer.ends[steps] - timer.ends[WARMUP_STEPS]
    samples = sum(row["samples"] for row in timed)
    tokens = sum(row["tokens"] for row in timed)
    return {
        "framework": framework,
        "torch_threads": torch.get_num_threads(),
        "timed_steps": len(timed),
        "timed_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / len(timed), 4),
        "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "supervised_tokens_per_s": round(sum(row["supervised"] for row in timed) / seconds, 1),
        "rss_before_train_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tokens_per_step": [row["tokens"] for row in batches[:steps]],
        "supervised_per_step": [row["supervised"] for row in batches[:steps]],
        "padded_width_per_step": [row["width"] for row in batches[:steps]],
        "loss_first_step": batches[0]["loss"],
        "first_sample_supervised_text": batches[0]["first_sample_supervised_text"],
        "load_average_end": load_average(),
    }


def run_logits_child(kind: str, workdir: Path) -> dict:
    import torch

    from surgvqa.models.loading import load_processor, resolve_model_path
    from surgvqa.training.dataset import TrainingCollator, VQADataset
    from surgvqa.training.trainer import build_model_for_training, supervised_only_loss

    config = _config(workdir)
    base = resolve_model_path(config)
    processor = load_processor(base, config.model, config.masking.strategy)
    torch.manual_seed(0)
    model = build_model_for_training(config, base, processor)
    model.train()
    dataset = VQADataset(_records(workdir, LOGITS_BATCH), _prepared(workdir), processor, config.prompt,
                         config.masking)
    batch = TrainingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("labels")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if kind == "supervised":
            loss, _ = supervised_only_loss(model, batch, labels)
        else:
            loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    rss_before = current_rss_mb()
    first_loss = step()  # warm-up (allocator, kernels); its loss is the same weights' loss in both children
    start = time.perf_counter()
    for _ in range(LOGITS_TIMED_STEPS):
        step()
    seconds = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum()) * LOGITS_TIMED_STEPS
    return {
        "loss": kind,
        "torch_threads": torch.get_num_threads(),
        "batch_samples": int(labels.shape[0]),
        "batch_width": int(labels.shape[1]),
        "supervised_positions": int((labels[:, 1:] != -100).sum()),
        "seconds_per_step": round(seconds / LOGITS_TIMED_STEPS, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "rss_before_step_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "step_peak_increment_mb": round(peak_rss_mb() - rss_before, 1),
        "first_loss": round(first_loss, 6),
        "load_average_end": load_average(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Parent: prepare once, run the children, verify, compare
# ----------------------------------------------------------------------------------------------------------------


def _child(mode: str, workdir: Path, threads: int) -> dict:
    out = workdir / f"child-{mode}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--out", str(out),
               "--threads", str(threads)]
    # The children's own output (progress bars, warnings) goes to stderr: stdout carries the one JSON object.
    subprocess.run(command, check=True, stdout=sys.stderr)
    return json.loads(out.read_text())


def label_check(workdir: Path) -> dict:
    """On all 256 samples, in batches of 16: both collators' inputs and supervised labels, side by side."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from surgvqa.models.loading import load_processor, resolve_model_path
    from surgvqa.training.dataset import TrainingCollator, VQADataset

    config = _config(workdir)
    records = _records(workdir, SAMPLES)
    processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
    ours = VQADataset(records, _prepared(workdir), processor, config.prompt, config.masking)
    theirs = trl_dataset(records, _prepared(workdir), config.prompt)
    # What SFTTrainer builds for a vision prompt/completion dataset with max_length=None.
    trl_collator = DataCollatorForVisionLanguageModeling(processor, max_length=None, completion_only_loss=True)
    ours_collator = TrainingCollator(processor.tokenizer.pad_token_id)
    newline = processor.tokenizer.encode("\n", add_special_tokens=False)
    counts = {"surgvqa": [], "trl": []}
    identical_inputs = identical_pixels = 0
    extra_are_newline = True
    for start in range(0, len(records), BATCH):
        indices = range(start, min(start + BATCH, len(records)))
        a = ours_collator([ours[i] for i in indices])
        b = trl_collator([theirs[i] for i in indices])
        counts["surgvqa"].append(int((a["labels"] != -100).sum()))
        counts["trl"].append(int((b["labels"] != -100).sum()))
        identical_pixels += int(torch.equal(a["pixel_values"], b["pixel_values"]))
        for row in range(len(indices)):
            n = int(a["attention_mask"][row].sum())
            same = n == int(b["attention_mask"][row].sum()) and torch.equal(a["input_ids"][row][:n],
                                                                           b["input_ids"][row][:n])
            identical_inputs += int(same)
            ours_sup = a["labels"][row][a["labels"][row] != -100].tolist()
            trl_sup = b["labels"][row][b["labels"][row] != -100].tolist()
            extra_are_newline &= trl_sup == ours_sup + newline
    tokenizer = processor.tokenizer
    first_a = ours[0]["labels"]
    first_b = trl_collator([theirs[0]])["labels"][0]
    return {
        "samples": len(records),
        "identical_input_ids": f"{identical_inputs}/{len(records)}",
        "identical_pixel_batches": f"{identical_pixels}/{len(counts['trl'])}",
        "supervised_per_batch_surgvqa": counts["surgvqa"],
        "supervised_per_batch_trl": counts["trl"],
        "supervised_total_surgvqa": sum(counts["surgvqa"]),
        "supervised_total_trl": sum(counts["trl"]),
        "difference_total": sum(counts["trl"]) - sum(counts["surgvqa"]),
        "trl_extra_token_is_trailing_newline_on_every_sample": bool(extra_are_newline),
        "example_supervised_surgvqa": tokenizer.decode(first_a[first_a != -100]),
        "example_supervised_trl": tokenizer.decode(first_b[first_b != -100]),
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["surgvqa", "trl", "logits-supervised", "logits-full"], default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in every child (default 1: on a shared 2-core machine two "
                             "spinning threads per process make small ops up to 25x slower)")
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        workdir = args.workdir
        if args.child in ("surgvqa", "trl"):
            result = run_trainer_child(args.child, workdir)
        else:
            result = run_logits_child(args.child.split("-", 1)[1], workdir)
        args.out.write_text(json.dumps(result))
        return result

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed: run `.venv/bin/pip install -e '.[bench]'` first")
    import torch
    import transformers
    import trl

    from surgvqa.models.loading import resolve_model_path
    from surgvqa.stages.prepare import prepare

    started = time.perf_counter()
    load_start = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-trl-bench-"))
    config = _config(workdir)
    resolve_model_path(config)  # build the tiny model once, before any child runs
    if not (_prepared(workdir) / "train.jsonl").is_file():
        prepare(config, quiet=True)

    runs: dict[str, list[dict]] = {"surgvqa": [], "trl": []}
    for _ in range(args.repeats):
        for framework in ("surgvqa", "trl"):
            runs[framework].append(_child(framework, workdir, args.threads))
    best = {name: max(items, key=lambda item: item["samples_per_s"]) for name, items in runs.items()}
    same_samples = all(a["tokens_per_step"] == b["tokens_per_step"] for a in runs["surgvqa"] for b in runs["trl"])
    peak = {name: min(item["peak_rss_mb"] for item in items) for name, items in runs.items()}
    ratios = {
        "samples_per_s": round(best["surgvqa"]["samples_per_s"] / best["trl"]["samples_per_s"], 3),
        "tokens_per_s": round(best["surgvqa"]["tokens_per_s"] / best["trl"]["tokens_per_s"], 3),
        "peak_rss": round(peak["surgvqa"] / peak["trl"], 3),
        "rss_increase_during_training": round(
            (peak["surgvqa"] - min(i["rss_before_train_mb"] for i in runs["surgvqa"]))
            / max(peak["trl"] - min(i["rss_before_train_mb"] for i in runs["trl"]), 1e-9), 3),
    }
    labels = label_check(workdir)

    logits = {kind: _child(f"logits-{kind}", workdir, args.threads) for kind in ("supervised", "full")}
    logits_ratio = {
        "tokens_per_s": round(logits["supervised"]["tokens_per_s"] / logits["full"]["tokens_per_s"], 2),
        "peak_rss": round(logits["supervised"]["peak_rss_mb"] / logits["full"]["peak_rss_mb"], 3),
        "step_peak_increment": round(logits["supervised"]["step_peak_increment_mb"]
                                     / max(logits["full"]["step_peak_increment_mb"], 1e-9), 3),
        "same_loss": abs(logits["supervised"]["first_loss"] - logits["full"]["first_loss"]) < 1e-4,
    }

    result = {
        "benchmark": "train_vs_trl",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(with_python=True),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "setup": {"model": "tiny qwen2_vl (hidden 64, 2 layers, 10 M params), full fine-tuning, fp32",
                  "samples": SAMPLES, "batch_size": BATCH, "warmup_steps_excluded": WARMUP_STEPS,
                  "timed_steps": TIMED_STEPS, "repeats": args.repeats, "torch_threads": args.threads,
                  "sampler": "HF random sampler, same seed",
                  "trl_overrides": "bf16=False, gradient_checkpointing=False (TRL defaults True), max_length=None"},
        "trainers": {
            "best": {name: {key: item[key] for key in ("samples_per_s", "tokens_per_s", "seconds_per_step",
                                                       "supervised_tokens_per_s", "peak_rss_mb",
                                                       "rss_before_train_mb", "loss_first_step")}
                     for name, item in best.items()},
            "runs": runs,
            "same_samples_every_step": same_samples,
            "ratio_surgvqa_over_trl": ratios,
            "goal": {"throughput_ratio_min": GOALS["throughput_ratio_min"],
                     "met_throughput": ratios["samples_per_s"] >= GOALS["throughput_ratio_min"],
                     "peak_rss_ratio_max": GOALS["peak_rss_ratio_max"],
                     "met_peak_rss": ratios["peak_rss"] <= GOALS["peak_rss_ratio_max"]},
        },
        "supervision": labels,
        "supervised_logits": {"batch": LOGITS_BATCH, "timed_steps": LOGITS_TIMED_STEPS, **logits,
                              "ratio_supervised_over_full": logits_ratio},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return write_result("train_vs_trl", result)


if __name__ == "__main__":
    main()
