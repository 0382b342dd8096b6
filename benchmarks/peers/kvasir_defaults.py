"""What each tool's defaults do to a real Kvasir-VQA sample: image tokens, sequence length, and what a tool's
default length limit then cuts. Runs in TRL's environment (it also exercises TRL's own collator and the model):

    HF_HUB_OFFLINE=1 benchmarks/peers/.venvs/trl/bin/python benchmarks/peers/kvasir_defaults.py \
        --model runs/peers/tiny --out benchmarks/results/peers_kvasir_defaults.json

Image sizes: the smallest and largest resolutions of the Kvasir images (720x576 and 1920x1072) and 1280x1024.
Pixel budgets: each tool's default as read from its installed code (LLaMA-Factory ``image_max_pixels`` 768*768;
ms-swift ``max_pixels`` None and TRL: the model's own processor, i.e. the checkpoint's ``max_pixels``; the
``Qwen2VLImageProcessor`` class default is read from the installed transformers) and surgvqa's ``configs/exp1.yaml``.
The text is our prompt for one Kvasir question. The TRL check builds one batch with ``SFTConfig``'s default
``max_length`` through TRL's vision collator and runs the tiny model's forward on it.
"""

from __future__ import annotations

import argparse
import json

from PIL import Image

SIZES = [(720, 576), (1280, 1024), (1920, 1072)]
SYSTEM = ("You are a medical visual question answering assistant for gastrointestinal endoscopy. "
          "Look at the image and answer the question with the answer alone, as briefly as possible.")
USER = "Question type: mcq\nQuestion: Where in the image is the abnormality?"
ANSWER = "center; center-left; lower-center"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-max-pixels", type=int, default=12845056,
                        help="max_pixels of the published Qwen2-VL-2B/7B-Instruct preprocessor_config.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    torch.set_num_threads(1)
    class_default = Qwen2VLImageProcessor().size["longest_edge"]
    budgets = {"llamafactory default (image_max_pixels 768*768)": 768 * 768,
               "ms-swift / TRL default: checkpoint max_pixels": args.checkpoint_max_pixels,
               "Qwen2VLImageProcessor class default": class_default,
               "surgvqa configs/exp1.yaml (max_pixels 448*896)": 401408}
    limits = {"llamafactory cutoff_len": 2048, "TRL SFTConfig.max_length": SFTConfig.__dataclass_fields__["max_length"].default,
              "ms-swift max_length": None, "surgvqa exp1 masking.max_length (rejects, never truncates)": 1024}
    processor = AutoProcessor.from_pretrained(args.model)
    rows = []
    for width, height in SIZES:
        for name, budget in budgets.items():
            h, w = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=budget)
            rows.append({"image": f"{width}x{height}", "budget": name, "max_pixels": budget,
                         "resized": f"{w}x{h}", "image_tokens": (h // 28) * (w // 28)})
    text = processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER}]},
         {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False)
    text_tokens = len(processor.tokenizer(text.replace("<|image_pad|>", ""))["input_ids"])
    for row in rows:
        row["sequence_tokens"] = row["image_tokens"] + text_tokens

    # TRL's defaults on the largest image: its collator with SFTConfig's max_length, then the model's forward
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": args.checkpoint_max_pixels}
    processor.image_processor.max_pixels = args.checkpoint_max_pixels
    collator = DataCollatorForVisionLanguageModeling(processor, max_length=limits["TRL SFTConfig.max_length"],
                                                     completion_only_loss=True)
    example = {"images": [Image.new("RGB", SIZES[-1], (120, 60, 50))],
               "prompt": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER}]}],
               "completion": [{"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]}
    trl_check: dict = {"image": f"{SIZES[-1][0]}x{SIZES[-1][1]}", "max_length": limits["TRL SFTConfig.max_length"]}
    try:
        batch = collator([example])
        ids = batch["input_ids"][0]
        trl_check.update(sequence_tokens=int(batch["attention_mask"].sum()),
                         image_tokens_kept=int((ids == 151655).sum()),
                         image_tokens_expected=int(batch["image_grid_thw"].prod() // 4),
                         supervised_labels=int((batch["labels"] != -100).sum()))
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
        try:
            with torch.no_grad():
                model(**{key: value for key, value in batch.items() if key != "labels"})
            trl_check["forward"] = "ok"
        except (ValueError, RuntimeError) as exc:  # the failure is the finding
            trl_check["forward"] = f"{type(exc).__name__}: {exc}"
    except (ValueError, RuntimeError, IndexError) as exc:
        trl_check["collator"] = f"{type(exc).__name__}: {exc}"
    result = {"text_tokens_without_image": text_tokens, "rows": rows, "limits": limits,
              "trl_default_check": trl_check}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
