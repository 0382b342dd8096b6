"""`surgvqa run` end to end at Qwen2-VL-2B's real dimensions on a GPU: bf16, gradient checkpointing, LoRA.

A GPU benchmark (never run by the tests). Writes a Qwen2-VL checkpoint with the dimensions of
Qwen2-VL-2B-Instruct and random weights (``real_dims_logits.DIMS``; no download) together with the real Qwen2
tokenizer, image processor and chat template, then runs the whole pipeline on it (prepare, diagnose, train,
baseline, predict, evaluate; the overfit gate is skipped: random weights are not a model to gate) on synthetic
448-px Kvasir-like data: the default config's full fine-tuning of the language model (``--recipe full``) or
``configs/exp1.yaml``'s LoRA (``--recipe lora``), one optimizer step per batch of 4. Reported: each stage's
wall time, the training loss curve, step time and peak GPU memory from ``train_log.jsonl``, and the prediction
count and errors. Random weights answer at chance: the accuracy is no figure here, the path is.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_size_run.py                 # GPU, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_size_run.py --dims check    # a 2-layer check on the CPU

-> one JSON object; the 2b run also writes benchmarks/results/real_size_run_<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import load_average, machine_info, write_result
from real_dims_logits import build_training_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_checkpoint(dims: str, out_dir: Path, pixels: int) -> int:
    """Save a random-weight model of these dimensions with the real Qwen2 tokenizer and processor; its size."""
    import torch

    from surgvqa.models import tiny

    device = "cuda" if torch.cuda.is_available() and dims == "2b" else "cpu"
    model = build_training_model(dims, device)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = tiny.build_tokenizer("qwen2_vl")
    tiny.build_processor("qwen2_vl", tokenizer, pixels, pixels).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(tiny.chat_template("qwen2_vl"), encoding="utf-8")
    tiny.greedy_generation_config().save_pretrained(out_dir)
    return parameters


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=["2b", "check"], default="2b")
    parser.add_argument("--recipe", choices=["full", "lora"], default="full",
                        help="full: the default config (every language-model weight trains); lora: configs/exp1.yaml")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (train.max_steps)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (exp1: 4)")
    parser.add_argument("--images", type=int, default=300, help="synthetic images (about 6 questions each)")
    parser.add_argument("--image-size", type=int, default=448, help="synthetic image side in px (448: 256 tokens)")
    parser.add_argument("--group-by-image", action="store_true",
                        help="train.group_by_image=true: an image's questions in one grouped row")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-realsize-"))
    checkpoint = workdir / "qwen2vl-2b-dims-random"
    started = time.perf_counter()
    parameters = write_checkpoint(args.dims, checkpoint, args.image_size ** 2)
    checkpoint_seconds = time.perf_counter() - started

    overrides = [
        f"output_dir={workdir}/runs", f"cache_dir={workdir}/cache", "run_name=real-size",
        "data.source=synthetic", f"model.name_or_path={checkpoint}", "model.gradient_checkpointing=true", "model.freeze_vision=true",
        f"model.min_pixels={args.image_size ** 2}", f"model.max_pixels={args.image_size ** 2}",
        f"data.synthetic.images={args.images}", f"data.synthetic.image_size={args.image_size}",
        "masking.max_length=1024", f"train.max_steps={args.steps}", f"train.per_device_batch_size={args.batch}",
        "train.grad_accum=1", "train.lr=2e-4", "train.save_steps=100", "train.logging_steps=10",
        "predict.batch_size=16", "evaluate.bootstrap_samples=200",
        f"train.group_by_image={str(args.group_by_image).lower()}",
    ]
    command = [sys.executable, "-m", "surgvqa", "run", "--skip-sanity"]
    if args.recipe == "lora":
        command += ["--config", str(Path(__file__).resolve().parents[1] / "src/surgvqa/configs/exp1.yaml")]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, text=True, capture_output=True)
    run_seconds = time.perf_counter() - started
    sys.stderr.write(done.stdout[-6000:] + done.stderr[-6000:])
    run_dir = workdir / "runs" / "real-size"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "train_log.jsonl").is_file() else []
    losses = [row for row in log if row.get("loss") is not None and row.get("step") is not None]
    predictions = run_dir / "predictions.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()] if predictions.is_file() else []
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    ledger_file = run_dir / "stages.json"
    result = {
        "benchmark": "real_size_run", "dims": args.dims, "machine": machine_info(), "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d"),
        "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_size_run.py --dims {args.dims} "
                   f"--recipe {args.recipe} --steps {args.steps} --batch {args.batch} --images {args.images} --image-size {args.image_size}"
                   + (" --group-by-image" if args.group_by_image else ""),
        "group_by_image": args.group_by_image,
        "recipe": args.recipe, "exit_code": done.returncode, "parameters": parameters,
        "checkpoint_write_seconds": round(checkpoint_seconds, 1), "run_seconds": round(run_seconds, 1),
        "stages": json.loads(ledger_file.read_text()) if ledger_file.is_file() else None,
        "loss_curve": [(row["step"], round(row["loss"], 4)) for row in losses],
        "peak_memory_mb": max((row["peak_memory_mb"] for row in log if "peak_memory_mb" in row), default=None),
        "tokens_per_s": [row["tokens_per_s"] for row in losses if row.get("tokens_per_s")],
        "predictions": len(rows), "prediction_errors": sum(1 for row in rows if row.get("error")),
        "overall_at_random_weights": metrics.get("overall"),
    }
    if args.dims != "2b":  # a check of the script, not a figure to keep
        print(json.dumps(result, indent=1))
        return result
    return write_result(f"real_size_run_{args.recipe}" + ("_grouped" if args.group_by_image else ""), result)


if __name__ == "__main__":
    main()
