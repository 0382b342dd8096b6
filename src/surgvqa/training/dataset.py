"""The training dataset (prepared records, encoded when asked for) and its collator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgvqa.core.config import MaskingConfig, PromptConfig
from surgvqa.data.records import Record, read_records
from surgvqa.prompting.encoding import collate, encode_example, estimate_length, load_image


class VQADataset(torch.utils.data.Dataset):
    """Prepared JSONL records, encoded lazily (images are read when an item is requested)."""

    def __init__(self, records: list[Record], base_dir: str | Path, processor: Any, prompt: PromptConfig,
                 masking: MaskingConfig, image_roots: Sequence[str | Path] | None = None):
        self.records = records
        self.base_dir = Path(base_dir)
        self.image_roots = image_roots  # see load_image; None allows base_dir only
        self.processor = processor
        self.prompt = prompt
        self.masking = masking

    @classmethod
    def from_jsonl(cls, path: str | Path, processor: Any, prompt: PromptConfig, masking: MaskingConfig,
                   limit: int | None = None, image_roots: Sequence[str | Path] | None = None) -> VQADataset:
        records = read_records(path)
        return cls(records[:limit] if limit else records, Path(path).parent, processor, prompt, masking,
                   image_roots)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = load_image(record, self.base_dir, roots=self.image_roots)
        return encode_example(self.processor, record, image, self.prompt, self.masking).features

    def lengths(self, image_tokens: int) -> list[int]:
        return [estimate_length(record, image_tokens) for record in self.records]


@dataclass
class TrainingCollator:
    pad_token_id: int

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id, "right")
