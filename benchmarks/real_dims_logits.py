"""Supervised-only logits against the model's own full-vocabulary loss, at Qwen2-VL-2B's real dimensions.

A GPU benchmark (issue 9, item 5; never run by the tests). Builds a Qwen2-VL with the dimensions of
Qwen2-VL-2B-Instruct and random weights (no download: the shape is written below), bf16 on CUDA, gradient
checkpointing on, and times full training steps (forward, backward, AdamW) on one batch of synthetic Kvasir-like
samples encoded by surgvqa's own dataset (real Qwen2 tokenizer and image processor, 448-px images = 256 image
tokens each):

- ``supervised``: ``surgvqa.training.trainer.supervised_only_loss`` (LM head on the supervised positions only);
- ``full``: ``model(**batch, labels=labels).loss`` (151,936-wide logits at every position).

Each kind runs in its own child process, so its peak GPU memory (``torch.cuda.max_memory_allocated``) is its own.
Run on a GPU machine after the README's set-up:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_dims_logits.py

-> prints one JSON object and writes benchmarks/results/real_dims_logits.json. ``--dims check`` runs the same
code on a 2-layer, 64-wide model on the CPU (about a minute) to check the script itself; it writes no result.
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

from _common import load_average, machine_info, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Qwen/Qwen2-VL-2B-Instruct's config.json: text 1536 wide, 28 layers, 12 heads (2 KV), MLP 8960, vocabulary padded
# to 151,936, tied embeddings; vision tower 32 blocks of 1280, 16 heads, MLP ratio 4, merger into 1536.
DIMS = {
    "2b": {"text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                    "mrope_section": [16, 24, 24]},
           "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}},
    "check": {"text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
                       "mrope_section": [2, 3, 3]},
              "vision": {"depth": 2, "embed_dim": 64, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2}},
}
KINDS = ("supervised", "full")


def build_model(dims: str, device: str, dtype):
    """A random-weight Qwen2-VL of these dimensions (seed 0) with the tiny model's special token ids."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from surgvqa.models import tiny

    shape = DIMS[dims]
    text = {key: value for key, value in shape["text"].items() if key != "mrope_section"}
    text.update(max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=tiny.ENDOFTEXT_ID,
                eos_token_id=tiny.IM_END_ID, pad_token_id=tiny.ENDOFTEXT_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": shape["text"]["mrope_section"]})
    config = Qwen2VLConfig(text_config=text, vision_config=shape["vision"], tie_word_embeddings=True,
                           image_token_id=tiny.IMAGE_PAD_ID, video_token_id=tiny.VIDEO_PAD_ID,
                           vision_start_token_id=tiny.VISION_START_ID, vision_end_token_id=tiny.VISION_END_ID)
    torch.manual_seed(0)
    with torch.device(device):  # weights are created where they train: no 9 GB fp32 copy on the host first
        return Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)


def build_training_model(dims: str, device: str):
    """:func:`build_model` in bf16 on CUDA (fp32 on CPU), with gradient checkpointing, in training mode."""
    import torch

    model = build_model(dims, device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def encoded_batch(workdir: Path, batch_size: int, image_size: int):
    from surgvqa.core.config import load_config
    from surgvqa.models.loading import load_processor, resolve_model_path
    from surgvqa.stages.prepare import prepare
    from surgvqa.training.dataset import TrainingCollator, VQADataset

    config = load_config(None, [f"output_dir={workdir}", f"cache_dir={workdir}/cache", "data.synthetic.images=40",
                                f"data.synthetic.image_size={image_size}", f"model.max_pixels={image_size ** 2}"])
    prepared = config.run_dir / "prepared"
    if not (prepared / "train.jsonl").is_file():
        prepare(config, quiet=True)
    processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
    dataset = VQADataset.from_jsonl(prepared / "train.jsonl", processor, config.prompt, config.masking,
                                    limit=batch_size)
    batch = TrainingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    return batch, batch.pop("labels")


def run_child(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from surgvqa.training.trainer import supervised_only_loss

    device = "cuda" if torch.cuda.is_available() and args.dims == "2b" else "cpu"
    batch, labels = encoded_batch(args.workdir, args.batch, args.image_size)
    model = build_training_model(args.dims, device)
    dtype = next(model.parameters()).dtype
    batch = {key: value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
             for key, value in batch.items()}
    labels = labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        started = time.perf_counter()
        if kind == "supervised":
            loss, _ = supervised_only_loss(model, batch, labels)
        else:
            loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # warm-up: kernels, allocator, optimiser state
    seconds = [step() for _ in range(args.steps)]
    tokens = int(batch["attention_mask"].sum())
    return {
        "kind": kind, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "tokens_per_batch": tokens,
        "supervised_tokens_per_batch": int((labels[:, 1:] != -100).sum()),
        "step_seconds": [round(value, 4) for value in seconds],
        "tokens_per_s": round(tokens * len(seconds) / sum(seconds), 1),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda"
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss",
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=list(DIMS), default="2b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    parser.add_argument("--image-size", type=int, default=448, help="synthetic image side in px (448: 256 tokens)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-realdims-"))
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return {}
    runs = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--child", kind, "--dims", args.dims, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--image-size", str(args.image_size), "--workdir", str(args.workdir)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{kind} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    supervised, full = runs["supervised"], runs["full"]
    result = {
        "benchmark": "real_dims_logits", "dims": args.dims, "machine": machine_info(), "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d"),
        "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_dims_logits.py --dims {args.dims} "
                   f"--batch {args.batch} --steps {args.steps} --image-size {args.image_size}",
        "runs": runs,
        "tokens_per_s_ratio": round(supervised["tokens_per_s"] / full["tokens_per_s"], 3),
        "peak_memory_ratio": round(supervised["peak_memory_mb"] / full["peak_memory_mb"], 3),
    }
    if args.dims != "2b":  # a check of the script, not a figure to keep
        print(json.dumps(result))
        return result
    return write_result("real_dims_logits", result)


if __name__ == "__main__":
    main()
