"""The supported model families: one table of what differs between them (docs/models.md).

A leaf: loading, the tiny checkpoints and the stages all read it, so it imports nothing of surgvqa's.
"""

from __future__ import annotations

from dataclasses import dataclass


class ModelLoadError(ValueError):
    """The model named in the config cannot be used: a clear one-line reason, raised before anything heavy runs."""


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the supported architectures. Each field is read from transformers 5.24's
    ``models/<model_type>`` (configuration, modeling and processor) and the family's published checkpoints."""

    model_type: str  # config.json "model_type"
    name: str
    patch_size: int  # px per vision patch side
    merge_size: int  # patches merged per side into one language-model token
    position_ids: str  # how the model's get_rope_index lays out positions (computed by the model, stated here)
    deepstack: bool  # features of intermediate vision blocks are added to the first language-model layers
    linear_attention: bool  # hybrid Gated DeltaNet layers: part of the cache is a recurrent state, not keys/values
    thinking_template: bool  # the published chat template opens a think block unless enable_thinking=false
    # vision parameters that project into the language model (trained when model.train_merger is set)
    merger_prefixes: tuple[str, ...] = ("merger.",)
    # language-model projections to adapt besides the attention/MLP ones every family has
    extra_lora_targets: tuple[str, ...] = ()

    @property
    def token_side(self) -> int:
        """Pixels per side of the image area one language-model token covers."""
        return self.patch_size * self.merge_size


FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    ModelFamily("qwen2_vl", "Qwen2-VL", patch_size=14, merge_size=2,
                position_ids="M-RoPE: sections of each head for (time, height, width); text positions equal on all "
                             "three, image tokens on their grid",
                deepstack=False, linear_attention=False, thinking_template=False),
    ModelFamily("qwen2_5_vl", "Qwen2.5-VL", patch_size=14, merge_size=2,
                position_ids="M-RoPE as Qwen2-VL (window attention in the vision tower only)",
                deepstack=False, linear_attention=False, thinking_template=False),
    ModelFamily("qwen3_vl", "Qwen3-VL", patch_size=16, merge_size=2,
                position_ids="interleaved M-RoPE: time/height/width frequencies alternate across the head "
                             "(mrope_interleaved); the same three position rows as Qwen2-VL",
                deepstack=True, linear_attention=False, thinking_template=False,
                merger_prefixes=("merger.", "deepstack_merger_list.")),
    ModelFamily("qwen3_5", "Qwen3.5", patch_size=16, merge_size=2,
                position_ids="interleaved M-RoPE on a quarter of each head (partial_rotary_factor 0.25), in the "
                             "full-attention layers only; the linear-attention layers carry order in their state",
                deepstack=False, linear_attention=True, thinking_template=True,
                extra_lora_targets=("in_proj_qkv", "in_proj_z", "out_proj")),
)}


# The unit of model.min_pixels / max_pixels: the area of one Qwen2-VL image token (28 x 28 px). A budget means
# the same number of image tokens on every family; each family's processor gets it in its own pixels.
CONFIG_TOKEN_SIDE = 28


def family_of(model_type: str, source: str = "the model") -> ModelFamily:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelLoadError(f"{source} is a {model_type!r} model; supported: {', '.join(FAMILIES)}")
    return family


def family_pixel_budget(min_pixels: int, max_pixels: int, token_side: int) -> tuple[int, int]:
    """The config's pixel budget (in 28-px token areas) as pixels of a family whose token covers ``token_side`` px:
    the same number of image tokens (Qwen3-VL's 32-px tokens need (32/28)^2 more pixels for as many tokens)."""
    unit = CONFIG_TOKEN_SIDE * CONFIG_TOKEN_SIDE
    return min_pixels * token_side**2 // unit, max_pixels * token_side**2 // unit
