"""A collated training batch of the demo data, shared by the training and family tests."""

from __future__ import annotations

from surgvqa.training.dataset import TrainingCollator, VQADataset


def training_batch(processor, config, prepared_demo, n=6, split="train"):
    dataset = VQADataset.from_jsonl(prepared_demo / f"{split}.jsonl", processor, config.prompt, config.masking,
                                    limit=n)
    batch = TrainingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    return batch, batch.pop("labels")
