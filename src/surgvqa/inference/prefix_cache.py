"""Several questions about one image answered from one pass over the image: the prompt prefix they share (system
turn, image, everything before the first question-specific token) runs through the model once, and its keys and
values are reused by every question, whose own tokens continue it at the positions they have when alone."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from surgvqa.data.records import Record
from surgvqa.inference.decoding import decoder_and_head
from surgvqa.prompting.shared_prefix import (
    check_image_inside,
    common_prefix_length,
    positions_alone,
    rope_index_of,
    sharing_refusal,
)

log = logging.getLogger(__name__)


def prefix_reuse_refusal(model: Any) -> str | None:
    """Why this model cannot answer an image's questions from a shared prefix cache, or None when it can."""
    config = model.config
    attention = getattr(config.get_text_config(), "_attn_implementation", None) or config._attn_implementation
    return sharing_refusal(getattr(config, "model_type", type(model).__name__), attention)


def image_groups(records: Sequence[Record], indices: Sequence[int]) -> list[list[int]]:
    """``indices`` split by image, in order of first appearance: one list per image asked more than once, then one
    list of the images asked once (they gain nothing from a prefix, and keep their batch together)."""
    by_image: dict[str, list[int]] = {}
    for index in indices:
        by_image.setdefault(records[index].image, []).append(index)
    shared = [group for group in by_image.values() if len(group) > 1]
    alone = [group[0] for group in by_image.values() if len(group) == 1]
    return shared + ([alone] if alone else [])


def same_image(features: Sequence[dict[str, torch.Tensor]]) -> bool:
    """Whether the encoded prompts hold one image, pixel for pixel."""
    first = features[0]
    return all(torch.equal(item["image_grid_thw"], first["image_grid_thw"])
               and torch.equal(item["pixel_values"], first["pixel_values"]) for item in features[1:])


def shared_prefix_length(features: Sequence[dict[str, torch.Tensor]]) -> int:
    """The length of the longest token prefix of the prompts, at most the shortest prompt less one token: every
    question keeps a token of its own, whose output predicts its answer's first token."""
    prompts = [feature["input_ids"] for feature in features]
    length = common_prefix_length(prompts, min(len(prompt) for prompt in prompts) - 1)
    check_image_inside(features, length)
    return length


class ImagePrefixPrompts:
    """The prompts of several questions about one image, the image prefix run once.

    Each question's own tokens (its suffix) are right-aligned after the prefix; a shorter suffix is padded between
    the prefix and itself, the padding masked out, so that every row ends on its last prompt token as a left-padded
    batch does. Positions are explicit: the prefix's and each suffix's as in the prompt alone, so nothing depends
    on the ``rope_deltas`` the model keeps between calls.
    """

    def __init__(self, model: Any, features: Sequence[dict[str, torch.Tensor]], pad_id: int, device: torch.device,
                 dtype: torch.dtype):
        decoder, _ = decoder_and_head(model)
        ids = [feature["input_ids"] for feature in features]
        self.length = shared_prefix_length(features)
        positions = [positions_alone(rope_index_of(model), feature).to(device) for feature in features]
        first = features[0]
        with torch.inference_mode():
            prefix = decoder(input_ids=ids[0][None, :self.length].to(device),
                             attention_mask=torch.ones((1, self.length), dtype=torch.long, device=device),
                             position_ids=positions[0][:, None, :self.length],
                             mm_token_type_ids=first["mm_token_type_ids"][None, :self.length].to(device),
                             pixel_values=first["pixel_values"].to(device, dtype=dtype),
                             image_grid_thw=first["image_grid_thw"].to(device), use_cache=True)
        self.prefix_cache = getattr(prefix, "cache", None) or prefix.past_key_values
        self.prefix_ids = ids[0][:self.length].to(device)
        self.prefix_positions = positions[0][:, :self.length]

        width = max(len(prompt) for prompt in ids) - self.length
        rows = len(features)
        self.suffix_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        self.suffix_mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        # The padding's positions are never attended to (masked keys); any value in range does.
        self.suffix_positions = torch.zeros((3, rows, width), dtype=self.prefix_positions.dtype, device=device)
        for row, (prompt, position) in enumerate(zip(ids, positions)):
            own = len(prompt) - self.length
            self.suffix_ids[row, width - own:] = prompt[self.length:].to(device)
            self.suffix_mask[row, width - own:] = 1
            self.suffix_positions[:, row, width - own:] = position[:, self.length:]

    @property
    def rows(self) -> int:
        return self.suffix_ids.shape[0]

    def expanded_cache(self) -> Any:
        """A copy of the prefix's cache with one row per question (the caller's forward extends it in place)."""
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(self.rows)
        return cache

    def attention_mask(self) -> torch.Tensor:
        prefix = torch.ones((self.rows, self.length), dtype=self.suffix_mask.dtype, device=self.suffix_mask.device)
        return torch.cat([prefix, self.suffix_mask], dim=1)

    def forward_inputs(self) -> dict[str, Any]:
        """For a decoder forward: the suffixes, continuing a fresh copy of the prefix's cache."""
        return {"input_ids": self.suffix_ids, "attention_mask": self.attention_mask(),
                "position_ids": self.suffix_positions, "cache": self.expanded_cache()}

    def generate_inputs(self) -> dict[str, Any]:
        """For ``generate``: the whole prompts (``generate`` runs only what the cache lacks, and its logits
        processors see every prompt token, as without the cache)."""
        ids = torch.cat([self.prefix_ids.expand(self.rows, -1), self.suffix_ids], dim=1)
        positions = torch.cat([self.prefix_positions[:, None].expand(-1, self.rows, -1), self.suffix_positions],
                              dim=2)
        return {"input_ids": ids, "attention_mask": self.attention_mask(), "position_ids": positions,
                "cache": self.expanded_cache()}
