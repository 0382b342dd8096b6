"""What image-grouped training and prediction share: the shared prefix of an image's encodings, each encoding's
M-RoPE positions as it has them alone, and the models on which a shared prefix is exact."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from surgvqa.models.families import FAMILIES

# The attention implementations that take an arbitrary mask and were shown exact with a shared prefix (sdpa with a
# boolean mask, eager with an additive one); flash_attention_2 knows only block-diagonal packing.
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")

RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def sharing_refusal(model_type: str, attn_implementation: str) -> str | None:
    """Why questions about one image cannot share its prefix exactly on this model, or None when they can."""
    family = FAMILIES.get(model_type)
    if family is None:
        return f"{model_type} is not a supported family"
    if family.linear_attention:
        return (f"{family.name}'s linear-attention layers carry a recurrent state from one question's tokens into "
                "the next")
    if attn_implementation not in SHARED_PREFIX_ATTENTION:
        return (f"attention {attn_implementation!r} cannot express a shared prefix exactly (it needs one of "
                f"{', '.join(SHARED_PREFIX_ATTENTION)})")
    return None


def rope_index_of(model: Any) -> RopeIndex:
    """The model's own M-RoPE position function (``get_rope_index``), found through peft or DDP wrappers."""
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module.get_rope_index
    raise ValueError(f"{type(model).__name__} has no get_rope_index: not a Qwen-VL model, cannot group by image")


def positions_alone(rope_index: RopeIndex, feature: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (3, L) positions the model gives one encoded sample standing alone."""
    grids = {key: feature[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if feature.get(key) is not None}
    with torch.no_grad():
        positions, _ = rope_index(feature["input_ids"][None], mm_token_type_ids=feature["mm_token_type_ids"][None],
                                  **grids)
    return positions[:, 0]


def common_prefix_length(token_rows: Sequence[torch.Tensor], limit: int) -> int:
    """The length of the longest token prefix all rows share, at most ``limit``; raises ValueError unless every
    image token lies inside it (what is shared must hold the whole image)."""
    shortest = min(len(row) for row in token_rows)
    stacked = torch.stack([row[:shortest] for row in token_rows])
    agreeing = (stacked == stacked[0]).all(dim=0).long()
    return min(int(agreeing.cumprod(0).sum()), limit)


def check_image_inside(features: Sequence[dict[str, torch.Tensor]], length: int) -> None:
    if any(bool((feature["mm_token_type_ids"][length:] != 0).any()) for feature in features):
        raise ValueError(f"the encodings share {length} tokens, which do not hold the whole image: an image after "
                         "question-specific text cannot be shared across questions")
