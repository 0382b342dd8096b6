"""Questions per second of constrained prediction, grouped by image (predict.group_by_image) against per question.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grouped_prediction.py [--images 2] [--questions 9] [--runs 3]
  -> prints one JSON object and writes benchmarks/results/grouped_prediction.json

The model is the tiny Qwen2-VL widened to hidden 512 with 4 layers (random weights, the real vocabulary and
processor); images are 448-px synthetic pictures, 256 image tokens each; each image is asked the first
``--questions`` Kvasir-VQA templates (closed questions, single- and multi-label). Both settings answer the same
records through ``Predictor.predict_batch`` (image decoding and the processor call included, as ``surgvqa predict``
runs them) in batches of ``--batch-size`` records, one image's questions per batch by default. Each run times both
settings, interleaved; the figures are the mean and range over the runs, and the answers of the two settings are
compared row for row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _common import load_average, machine_info, write_result
from PIL import Image, ImageDraw

from surgvqa.core.config import load_config
from surgvqa.data.records import Record
from surgvqa.inference.predictor import Predictor, load_for_prediction
from surgvqa.models.tiny import ensure_tiny_model
from surgvqa.tasks.kvasir_vqa import TEMPLATES

SIDE = 448
HIDDEN, LAYERS = 512, 4


def synthetic_image(path: Path, seed: int) -> None:
    """A pink mucosa-like background with a few coloured blobs: pixels that differ from image to image."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (SIDE, SIDE), (200, 110, 110))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, radius = (int(v) for v in torch.randint(20, SIDE - 20, (3,), generator=generator))
        radius = radius % 40 + 8
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    image.save(path)


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--questions", type=int, default=9, help="questions per image (Kvasir templates, in order)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="records per batch (default: --questions)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--workdir", type=Path, default=None, help="model and image cache (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size = args.batch_size or args.questions
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgvqa-grouped-"))

    model_dir = ensure_tiny_model(workdir / "models", arch="qwen2_vl", seed=0, min_pixels=SIDE * SIDE,
                                  max_pixels=SIDE * SIDE, hidden_size=HIDDEN, num_layers=LAYERS)
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    for index in range(args.images):
        synthetic_image(workdir / "images" / f"img{index}.png", seed=index)
    templates = [template for template in TEMPLATES][: args.questions]
    records = [Record(id=f"img{image}-t{template.id}", img_id=f"img{image}", image=f"images/img{image}.png",
                      question=template.question, answer=template.vocabulary[0],
                      question_type=template.question_type, candidates=list(template.vocabulary),
                      multi_label=template.multi_label)
               for image in range(args.images) for template in templates]
    batches = [records[start:start + batch_size] for start in range(0, len(records), batch_size)]

    def predictor(grouped: bool, loaded: tuple | None = None) -> Predictor:
        config = load_config(None, [f"output_dir={workdir}", f"model.name_or_path={model_dir}",
                                    f"model.min_pixels={SIDE * SIDE}", f"model.max_pixels={SIDE * SIDE}",
                                    f"predict.group_by_image={grouped}", f"predict.batch_size={batch_size}"])
        model, processor = loaded or load_for_prediction(config, str(model_dir), quiet=True)
        return Predictor(model, processor, config, workdir)

    grouped = predictor(True)
    per_question = predictor(False, (grouped.model, grouped.processor))
    settings = {"grouped": grouped, "per_question": per_question}

    def predict(which: Predictor) -> list:
        return [outcome for batch in batches for outcome in which.predict_batch(batch, "constrained")]

    answers = {name: predict(which) for name, which in settings.items()}  # warm-up, and the answers compared
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.runs):
        for name, which in settings.items():
            start = time.perf_counter()
            predict(which)
            seconds[name].append(time.perf_counter() - start)

    rows = list(zip(answers["grouped"], answers["per_question"]))
    largest_confidence_difference = max(abs((left.confidence or {}).get("confidence_raw", 0.0)
                                            - (right.confidence or {}).get("confidence_raw", 0.0))
                                        for left, right in rows)
    image_tokens = int((grouped.encode(records[0])["input_ids"] == grouped.model.config.image_token_id).sum())
    result = {
        "model": f"tiny Qwen2-VL, hidden {HIDDEN}, {LAYERS} layers (vision tower too), random weights, "
                 f"{sum(p.numel() for p in grouped.model.parameters()) / 1e6:.1f} M parameters",
        "images": args.images,
        "image_px": SIDE,
        "image_tokens": image_tokens,
        "questions_per_image": args.questions,
        "batch_size": batch_size,
        "mode": "constrained",
        "runs": args.runs,
        "questions_per_s": {name: spread([len(records) / value for value in values])
                            for name, values in seconds.items()},
        "speedup": spread([slow / fast for fast, slow in zip(seconds["grouped"], seconds["per_question"])]),
        "identical_answers": sum(left.raw_text == right.raw_text and left.error is None and right.error is None
                                 for left, right in rows),
        "rows": len(rows),
        "largest_confidence_difference": largest_confidence_difference,
        "device": str(grouped.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "machine": machine_info(),
        "goal": "grouped >= 3x per question at 9 questions per image (issue 27)",
    }
    return write_result("grouped_prediction", result)


if __name__ == "__main__":
    main()
