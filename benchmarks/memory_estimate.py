"""`surgvqa doctor`'s peak-memory estimate against a measured training peak, at Qwen2-VL-2B's real dimensions.

Builds Qwen2-VL with the dimensions of Qwen2-VL-2B-Instruct (``real_dims_logits.DIMS``) and random bf16 weights,
freezes the vision tower and adds LoRA exactly as ``surgvqa train`` does (``modeling.freeze_vision_tower``,
``training.apply_lora``, gradient checkpointing as ``modeling.load_model`` enables it), and runs training steps
(supervised-only loss, backward, AdamW on the adapter) on one batch of synthetic Kvasir-like samples encoded by
surgvqa's own dataset. Measured: the process's peak resident memory during the steps (``VmHWM``, reset once
the model is built, so random initialisation's fp32 temporaries do not count) minus its resident memory just
before the model was built (CPU), or ``torch.cuda.max_memory_allocated`` (GPU). Compared
with ``doctor.estimate_training_memory`` for the same settings (without the CUDA context term, which neither
measure contains).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimate.py                 # CPU or GPU, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimate.py --dims check    # a 2-layer check of the script

-> one JSON object; the 2b run also writes benchmarks/results/memory_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import load_average, machine_info, write_result
from real_dims_logits import DIMS, build_model, encoded_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resident_bytes() -> int:
    """The process's resident memory now (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_resident_bytes() -> int:
    """The process's peak resident memory since the last reset (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=list(DIMS), default="2b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=448, help="synthetic image side in px (448: 256 tokens)")
    parser.add_argument("--no-checkpointing", action="store_true", help="measure without gradient checkpointing")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-memory-"))

    import torch

    from surgvqa.core.config import load_config
    from surgvqa.models.loading import freeze_vision_tower
    from surgvqa.run.doctor import estimate_training_memory
    from surgvqa.training.trainer import apply_lora, supervised_only_loss

    checkpointing = not args.no_checkpointing
    settings = load_config(None, [
        "model.dtype=bfloat16", f"model.gradient_checkpointing={str(checkpointing).lower()}",
        "model.freeze_vision=true", "model.train_merger=false", f"model.min_pixels={args.image_size ** 2}",
        f"model.max_pixels={args.image_size ** 2}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
        f"train.per_device_batch_size={args.batch}", "masking.max_length=1024"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, labels = encoded_batch(workdir, args.batch, args.image_size)
    baseline = resident_bytes()
    model = build_model(args.dims, device, torch.bfloat16)  # bf16 weights created where they train
    if device == "cpu":
        # Forget the peak so far (writing 5 to clear_refs resets VmHWM): random initialisation makes fp32
        # temporaries that are no part of a training step's peak.
        Path("/proc/self/clear_refs").write_text("5")
    estimate = estimate_training_memory(model.config, settings)
    freeze_vision_tower(model, train_merger=False, freeze=True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = apply_lora(model, settings.lora).train()
    batch = {key: value.to(device, dtype=torch.bfloat16) if value.is_floating_point() else value.to(device)
             for key, value in batch.items()}
    labels = labels.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = 0  # max_memory_allocated counts from zero: weights included
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, _ = supervised_only_loss(model, batch, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(round(time.perf_counter() - started, 2))
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated()
        kind = "torch.cuda.max_memory_allocated"
    else:
        measured = peak_resident_bytes() - baseline
        kind = "peak RSS (VmHWM, reset after the model was built) minus the RSS before the model was built"
    mib = 2**20
    result = {
        "benchmark": "memory_estimate", "dims": args.dims, "machine": machine_info(), "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimate.py --dims {args.dims} --batch "
                   f"{args.batch} --steps {args.steps} --image-size {args.image_size}"
                   + (" --no-checkpointing" if args.no_checkpointing else ""),
        "gradient_checkpointing": checkpointing, "batch": args.batch,
        "tokens_per_batch": int(batch["attention_mask"].sum()), "tokens_per_sample_estimated":
            estimate.tokens_per_sample, "step_seconds": seconds, "loss_finite": bool(torch.isfinite(loss)),
        "estimate_mib": {"weights": round(estimate.weights / mib), "trainable_state":
                         round(estimate.trainable_state / mib), "activations": round(estimate.activations / mib),
                         "logits": round(estimate.logits / mib), "total": round(estimate.total / mib)},
        "measured_mib": round(measured / mib), "measured_kind": kind,
        "estimate_over_measured": round(estimate.total / measured, 3),
    }
    if args.dims != "2b":  # a check of the script, not a figure to keep
        print(json.dumps(result))
        return result
    name = "memory_estimate" + ("_no_checkpointing" if args.no_checkpointing else "")
    return write_result(name + ("_gpu" if device == "cuda" else ""), result)


if __name__ == "__main__":
    main()
