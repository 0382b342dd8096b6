"""Image-grouped training against per-sample training: questions per second of forward + backward.

A tiny Qwen2-VL widened to hidden 512 and 4 layers (random weights, the real Qwen2 vocabulary and template), a
448-px synthetic image (256 image tokens), Kvasir-VQA-like questions, LoRA as in the exp1 recipe (r 16 on the
language model's seven projections, vision tower frozen), the supervised-only loss of training. Per image:

- per-sample: the image's questions in batches of ``--batch`` (the recipe's per_device_batch_size), one
  forward + backward per batch;
- grouped: the image's questions in one grouped row (surgvqa.training.grouping), one forward + backward.

Each mode processes the same questions, warmed up on one image first; a run times ``--images`` images. ``--runs``
runs per question count give the mean and range. Writes ``benchmarks/results/grouped_training.json``:

    PYTHONPATH=src .venv/bin/python benchmarks/grouped.py

On a GPU, ``--dims 2b`` takes Qwen2-VL-2B's real dimensions (random weights, bf16, gradient checkpointing, vision
tower frozen) with the exp1 LoRA recipe (``--recipe lora``) or full fine-tuning of the language model
(``--recipe full``), adds the peak GPU memory of each mode and projects one Kvasir-VQA epoch (41,079 training
questions) from the measured rate; ``--dims check`` runs that path at 2 layers on the CPU. Writes
``benchmarks/results/grouped_training_<dims>_<recipe>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _common import load_average, machine_info, write_result

HIDDEN, LAYERS, IMAGE_SIDE = 512, 4, 448
EPOCH_QUESTIONS = 41_079  # the seed recipe's Kvasir-VQA training split (kvasir-vqa.md)
# Kvasir-VQA's kinds of question (kvasir-vqa.md), with short answers as in the data; x1-like counts repeat them
# with other wordings.
QUESTIONS = [
    ("yes/no", "Is there a green/black box artefact?", "no"),
    ("yes/no", "Is this finding easy to detect?", "yes"),
    ("yes/no", "Is there text?", "yes"),
    ("yes/no", "Does this image contain any finding?", "yes"),
    ("count", "How many polyps are in the image?", "1"),
    ("count", "How many findings are present?", "2"),
    ("count", "How many instrumnets are in the image?", "0"),
    ("single choice", "What type of procedure is the image taken from?", "colonoscopy"),
    ("single choice", "What is the size of the polyp?", "5-10mm"),
    ("multi choice", "What color is the abnormality?", "pink; red"),
    ("multi choice", "Where in the image is the abnormality?", "center; center-left"),
    ("multi choice", "Are there any abnormalities in the image?", "polyp"),
    ("multi choice", "Are there any anatomical landmarks in the image?", "none"),
    ("multi choice", "Where in the image is the instrument?", "none"),
    ("single choice", "Have all polyps been removed?", "no"),
]


def questions_for_image(count: int) -> list[tuple[str, str, str]]:
    prefixes = ["", "Please tell: ", "In this frame, ", "Looking closely, "]
    return [(kind, prefixes[index // len(QUESTIONS)] + question, answer)
            for index, (kind, question, answer) in
            ((index, QUESTIONS[index % len(QUESTIONS)]) for index in range(count))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, nargs="+", default=[9, 25])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1, help="images timed per run")
    parser.add_argument("--batch", type=int, default=4, help="per-sample batch size (the recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dims", choices=["wide", "2b", "check"], default="wide",
                        help="wide: the tiny model at hidden 512, 4 layers; 2b: Qwen2-VL-2B's dimensions (GPU)")
    parser.add_argument("--recipe", choices=["lora", "full"], default="lora")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from PIL import Image

    from surgvqa.core.config import load_config
    from surgvqa.data.records import Record
    from surgvqa.models.tiny import build_model, build_processor, build_tokenizer
    from surgvqa.prompting.encoding import collate, encode_example
    from surgvqa.prompting.shared_prefix import rope_index_of
    from surgvqa.training.grouping import build_rows, collate_rows
    from surgvqa.training.trainer import apply_lora, supervised_only_loss

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.dims == "2b" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pixels = IMAGE_SIDE * IMAGE_SIDE
    recipe = [] if args.dims == "wide" else ["--config", str(Path(__file__).resolve().parents[1] / "configs" /
                                                          ("exp1.yaml" if args.recipe == "lora" else "default.yaml"))]
    lora_settings = ["lora.dropout=0"] if args.recipe == "lora" else []  # dropout off: the modes see one model
    config = load_config(Path(recipe[1]) if recipe else None,
                         [f"model.min_pixels={pixels}", f"model.max_pixels={pixels}", "masking.max_length=8192",
                          *lora_settings])
    processor = build_processor("qwen2_vl", build_tokenizer("qwen2_vl"), pixels, pixels)
    pad_id = processor.tokenizer.pad_token_id
    if args.dims == "wide":
        model = build_model("qwen2_vl", seed=0, hidden_size=HIDDEN, num_layers=LAYERS)
    else:
        from real_dims_logits import build_training_model  # bf16 on CUDA, gradient checkpointing

        model = build_training_model(args.dims, device.type)
    for parameter in model.parameters():  # the vision tower stays frozen in both recipes
        parameter.requires_grad_(False)
    if args.recipe == "lora":
        model = apply_lora(model, config.lora)
    else:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("visual" not in name)
    model = model.train()
    rope_index = rope_index_of(model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))

    def encoded(count: int) -> list[dict]:
        records = [Record(id=f"q{index}", img_id="image", image="image.png", question=question, answer=answer,
                          question_type=kind) for index, (kind, question, answer) in
                   enumerate(questions_for_image(count))]
        return [{key: value.to(device) if hasattr(value, "to") else value for key, value in
                 encode_example(processor, record, image, config.prompt, config.masking).features.items()}
                for record in records]

    def step(batch: dict) -> None:
        inputs = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        labels = inputs.pop("labels")
        loss, _ = supervised_only_loss(model, inputs, labels)
        loss.backward()

    def per_sample(examples: list[dict]) -> None:
        for start in range(0, len(examples), args.batch):
            step(collate(examples[start:start + args.batch], pad_id))

    def grouped(examples: list[dict]) -> None:
        # the rows are built in the timing: the data loader does this work in training
        step(collate_rows(build_rows(examples, rope_index, config.masking.max_length), pad_id, "sdpa", dtype))

    results = {}
    for count in args.questions:
        examples = encoded(count)
        image_tokens = int((examples[0]["mm_token_type_ids"] != 0).sum())
        rates: dict[str, list[float]] = {"per_sample": [], "grouped": []}
        peak_mb: dict[str, float] = {}
        modes = (("per_sample", per_sample), ("grouped", grouped))
        for _, run_image in modes:
            run_image(examples)  # warm-up: allocator and kernels, not timed
            model.zero_grad(set_to_none=True)
        for _ in range(args.runs):
            for mode, run_image in modes:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(args.images):
                    run_image(examples)
                    model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peak_mb[mode] = max(peak_mb.get(mode, 0.0), torch.cuda.max_memory_allocated() / 2**20)
                rates[mode].append(count * args.images / (time.perf_counter() - start))
        speedups = [g / s for g, s in zip(rates["grouped"], rates["per_sample"])]
        results[str(count)] = {
            "image_tokens": image_tokens,
            "tokens_per_sample": [len(example["input_ids"]) for example in examples][:3],
            **{f"{mode}_questions_per_s": {"mean": round(statistics.mean(values), 3),
                                           "min": round(min(values), 3), "max": round(max(values), 3),
                                           "runs": [round(value, 3) for value in values]}
               for mode, values in rates.items()},
            "speedup": {"mean": round(statistics.mean(speedups), 2), "min": round(min(speedups), 2),
                        "max": round(max(speedups), 2)},
            "peak_memory_mb": {mode: round(value) for mode, value in peak_mb.items()} or None,
            # forward + backward only: the optimizer step and data loading come on top
            "projected_epoch_minutes": {mode: round(EPOCH_QUESTIONS / statistics.mean(values) / 60, 1)
                                        for mode, values in rates.items()},
        }
        print(f"{count} questions per image: per-sample {statistics.mean(rates['per_sample']):.2f} questions/s "
              f"({min(rates['per_sample']):.2f}-{max(rates['per_sample']):.2f}), grouped "
              f"{statistics.mean(rates['grouped']):.2f} ({min(rates['grouped']):.2f}-{max(rates['grouped']):.2f}): "
              f"{statistics.mean(speedups):.1f}x ({min(speedups):.1f}-{max(speedups):.1f})", flush=True)
    payload = {
        "what": "forward + backward questions/s, grouped by image against per-sample batches",
        "model": {"arch": "qwen2_vl", "dims": args.dims, "recipe": args.recipe,
                  "hidden_size": model.config.get_text_config().hidden_size,
                  "layers": model.config.get_text_config().num_hidden_layers,
                  "lora_r": config.lora.r if args.recipe == "lora" and config.lora else None},
        "image_px": IMAGE_SIDE, "per_sample_batch": args.batch, "images_per_run": args.images,
        "runs": args.runs, "torch_threads": args.threads, "device": device.type, "dtype": str(dtype),
        "machine": machine_info(),
        "load_average_after": load_average(), "results": results,
    }
    if args.dims == "check":  # a check of the script, not a figure to keep
        print(json.dumps(payload, indent=1))
        return
    write_result("grouped_training" if args.dims == "wide" else f"grouped_training_{args.dims}_{args.recipe}", payload)


if __name__ == "__main__":
    main()
