"""Greedy generation with plain ``transformers`` from a saved model, for a tool without an inference command.

TRL saves a ``transformers`` model and its processor and documents inference as loading them back; this is that,
batched. Run in the tool's own environment:

    <venv>/bin/python benchmarks/peers/transformers_generate.py --model DIR --data test.parquet --out out.jsonl

The parquet is the tool's own training format (``images``, conversational ``prompt``); one ``{"text": ...}`` line per
row, in order.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = datasets.load_dataset("parquet", data_files=args.data, split="train")
    with open(args.out, "w", encoding="utf-8") as out, torch.inference_mode():
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            texts = [processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                     for prompt in batch["prompt"]]
            inputs = processor(text=texts, images=batch["images"], return_tensors="pt", padding=True)
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
            new = generated[:, inputs["input_ids"].shape[1]:]
            out.writelines(json.dumps({"text": text}) + "\n" for text in processor.batch_decode(new, skip_special_tokens=True))


if __name__ == "__main__":
    main()
