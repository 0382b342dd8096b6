"""Checks of a model's answers shared by the prediction and family tests."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from surgvqa.data.records import Record


@contextmanager
def random_head(model, seed: int, scale: float = 1.0, chaotic: bool = False):
    """Swap in a random LM head, so that greedy outputs vary (chaotic: from prompt to prompt too)."""
    original = model.lm_head
    generator = torch.Generator().manual_seed(seed)
    if chaotic:
        head = ChaoticHead(original.in_features, original.out_features, seed)
    else:
        head = torch.nn.Linear(original.in_features, original.out_features, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(original.weight.shape, generator=generator) * scale)
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = original


def assert_valid_closed(record: Record, raw_text: str, prediction: str) -> None:
    labels = raw_text.split("; ")
    assert all(label in record.candidates for label in labels), (raw_text, record.candidates)
    distinct = labels[:-1] if len(labels) > 1 and labels[-1] in labels[:-1] else labels  # a repeat ends it
    assert len(set(distinct)) == len(distinct), f"repeat before the end in {raw_text!r}"
    assert record.multi_label or len(labels) == 1
    assert prediction == "; ".join(sorted(distinct))


class ChaoticHead(torch.nn.Module):
    """Logits that look random: a smooth function of the hidden state turned chaotic by a large frequency, so
    that the small differences between prompts (and between steps) give unrelated next-token scores."""

    def __init__(self, hidden: int, vocab: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(torch.randn(hidden, 32, generator=generator), requires_grad=False)
        self.out = torch.nn.Parameter(torch.randn(32, vocab, generator=generator), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sin(hidden @ self.mix * 1000.0) @ self.out
