"""Tiny, offline Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoints for demos and tests.

The real checkpoints are gigabytes and need the hub. Everything the pipeline depends on *outside* the weights
is kept real here, because that is where silent failures live: the Qwen2 BPE vocabulary (so token boundaries,
offsets and answer lengths are the ones the 2B model sees), the special tokens at their real ids, each family's
official chat template byte for byte, and the real image processor (patch 14 for Qwen2/2.5-VL, 16 for Qwen3-VL
and Qwen3.5, merge 2). Only the transformer is shrunk (hidden 64, 2 layers, ~10 M parameters, random weights)
so CPU runs take seconds.

The vocabulary comes from ``qwen.tiktoken``, which the PyPI package ``dashscope`` ships; converting it needs
``tiktoken`` and no network. Qwen3-VL shares it (plus Qwen3's 12 added tokens, ``<think>`` among them).
Qwen3.5 has a vocabulary of its own (248k tokens) that no package here ships: its tiny model keeps Qwen3.5's
architecture (hybrid linear/full attention), processor and chat template on the Qwen3 vocabulary, and its config
names the ids of that vocabulary's vision tokens.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from surgvqa.core.io import give_umask_mode, replace_directory, shown_names
from surgvqa.models.families import FAMILIES, family_pixel_budget

# The Qwen2 pre-tokenizer regex. It differs from tiktoken's cl100k default in `\p{N}` (single digits, not
# runs of up to three), which changes how every number in an answer ("5mm", "11-20") is split.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Order matters: appended after the 151,643 BPE tokens they take ids 151643..151656, exactly as in Qwen2-VL.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's tokenizer adds these after the 14 above (ids 151657..151668), as plain (not special) added tokens, so
# that `<think>` survives decoding with skip_special_tokens.
QWEN3_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
BPE_VOCAB_SIZE = 151_643
VOCAB_SIZE = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)  # 151,657
QWEN3_VOCAB_SIZE = VOCAB_SIZE + len(QWEN3_ADDED_TOKENS)  # 151,669
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151655, 151656

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
QWEN3_ARCHS = ("qwen3_vl", "qwen3_5")
# Qwen2.5-VL-Instruct ships Qwen2-VL-Instruct's template string unchanged.
CHAT_TEMPLATE_ASSETS = {
    "qwen2_vl": "qwen2_vl_chat_template.jinja",
    "qwen2_5_vl": "qwen2_vl_chat_template.jinja",
    "qwen3_vl": "qwen3_vl_chat_template.jinja",
    "qwen3_5": "qwen3_5_chat_template.jinja",
}
CHAT_TEMPLATE_ASSET = CHAT_TEMPLATE_ASSETS["qwen2_vl"]
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}
_MARKER = ".surgvqa-tiny-complete"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def chat_template(arch: str = "qwen2_vl") -> str:
    """The family's official Instruct chat template, as shipped under surgvqa/assets (source in its first line)."""
    _check_arch(arch)
    asset = CHAT_TEMPLATE_ASSETS[arch]
    return resources.files("surgvqa").joinpath("assets", asset).read_text(encoding="utf-8")


def vocab_size(arch: str) -> int:
    return QWEN3_VOCAB_SIZE if arch in QWEN3_ARCHS else VOCAB_SIZE


def qwen_tiktoken_path() -> Path:
    try:
        import dashscope
        import tiktoken  # noqa: F401  (TikTokenConverter reads the vocabulary with it)
    except ImportError:
        raise RuntimeError("the tiny demo model needs the Qwen2 vocabulary: pip install 'surgvqa[demo]'") from None
    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"dashscope is installed but {path} is missing; reinstall dashscope")
    return path


@functools.lru_cache(maxsize=1)
def _qwen2_backend():
    # Converting 151k BPE ranks into merges takes seconds; Qwen2Tokenizer deep-copies this object, so one
    # cached conversion per process is safe to share between builds.
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"qwen.tiktoken has {backend.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")
    # Added before wrapping: Qwen2Tokenizer.__init__ registers eos/pad itself, and whichever it saw first would
    # otherwise take id 151643.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # The real tokenizer.json normalises to NFC and keeps raw byte offsets; offsets locate answer spans.
    backend.normalizer = normalizers.NFC()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return backend


@functools.lru_cache(maxsize=1)
def _qwen3_backend():
    """Qwen3's tokenizer: Qwen2's with 12 more added tokens (a copy: the Qwen2 one stays as it is)."""
    from tokenizers import AddedToken

    backend = copy.deepcopy(_qwen2_backend())
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
    return backend


def build_tokenizer(arch: str = "qwen2_vl"):
    """The Qwen2 tokenizer, configured as the family's Instruct tokenizer_config.json configures it (Qwen3-VL's
    differs from Qwen2-VL's only in the 12 added tokens and its chat template)."""
    from transformers import Qwen2Tokenizer

    _check_arch(arch)
    return Qwen2Tokenizer(
        tokenizer_object=_qwen3_backend() if arch in QWEN3_ARCHS else _qwen2_backend(),
        bos_token=None,
        eos_token="<|im_end|>",  # Instruct checkpoints end a turn with <|im_end|>; the base model uses <|endoftext|>
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        errors="replace",
        model_max_length=32768,
        padding_side="left",  # as the real Qwen2-VL-Instruct tokenizer_config.json; collators choose their own
        split_special_tokens=False,
        chat_template=chat_template(arch),
    )


def build_processor(arch: str, tokenizer, min_pixels: int, max_pixels: int):
    """The family's processor. ``min_pixels``/``max_pixels`` are in the config's unit (Qwen2-VL's 28-px tokens,
    see :func:`surgvqa.models.loading.family_pixel_budget`) and are converted to this family's own pixels."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )


    family = FAMILIES[arch]
    min_pixels, max_pixels = family_pixel_budget(min_pixels, max_pixels, family.token_side)
    vision = {"patch_size": family.patch_size, "merge_size": family.merge_size, "temporal_patch_size": 2}
    if arch in QWEN3_ARCHS:
        # Qwen3-VL's preprocessor_config.json: patch 16 and mean/std 0.5 instead of CLIP's statistics.
        vision |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **vision)
    # transformers 5 refuses to build the processor without a video processor; videos are unused here.
    video_cls = Qwen3VLVideoProcessor if arch in QWEN3_ARCHS else Qwen2VLVideoProcessor
    video_processor = video_cls(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **vision)
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(arch, Qwen3VLProcessor)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template(arch),
    )


def _mrope_section(half: int, arch: str) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in the real models' proportions:
    Qwen2-VL/2.5-VL [16, 24, 24] of 64, Qwen3-VL [24, 20, 20] of 64 (interleaved), Qwen3.5 [11, 11, 10] of 32."""
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        t_part = half // 4
        h_part = (half - t_part) // 2
        return [t_part, h_part, half - t_part - h_part]
    h_share = {"qwen3_vl": 20 / 64, "qwen3_5": 11 / 32}[arch]
    h_part = max(1, round(half * h_share))
    w_part = min(h_part, (half - h_part) // 2)
    return [half - h_part - w_part, h_part, w_part]


_HEADS = 4  # attention heads of the tiny text and vision towers


def _vision_config(arch: str, hidden_size: int, num_layers: int) -> dict:
    """The vision tower at the text width (the merger projects straight into it), in each family's own keys."""
    if arch == "qwen2_vl":
        return {"depth": num_layers, "embed_dim": hidden_size, "hidden_size": hidden_size, "num_heads": _HEADS,
                "mlp_ratio": 2}
    vision = {"depth": num_layers, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
              "num_heads": _HEADS, "out_hidden_size": hidden_size}
    if arch == "qwen2_5_vl":
        # As the real model: 112 px = 4x4 merged tokens per attention window; the last block sees the whole image.
        return vision | {"window_size": 112, "fullatt_block_indexes": [num_layers - 1]}
    # a 48 x 48 grid of learned positions, interpolated per image, as real
    vision |= {"patch_size": 16, "spatial_merge_size": 2, "num_position_embeddings": 2304}
    if arch == "qwen3_vl":
        # DeepStack: the real 2B adds features of vision blocks [5, 11, 17] to its first 3 LM layers; here block 0
        # feeds LM layer 0.
        vision["deepstack_visual_indexes"] = [0]
    return vision


def _text_config(arch: str, hidden_size: int, num_layers: int) -> dict:
    head_dim = hidden_size // _HEADS
    text_config = {
        "vocab_size": vocab_size(arch),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _HEADS // 2,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(head_dim // 2, arch),
        },
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        # the 151,657 x hidden embedding is most of the model; tying halves it
        "tie_word_embeddings": True,
    }
    if arch == "qwen3_vl":
        text_config["head_dim"] = head_dim
        text_config["rope_parameters"] |= {"rope_theta": 5_000_000.0, "mrope_interleaved": True}
    elif arch == "qwen3_5":
        # Gated DeltaNet (linear attention) layers with a full-attention layer every 4th; rotary on a quarter of
        # each (gated) attention head. Two layers here: one of each kind.
        text_config["head_dim"] = 2 * head_dim  # a rotary quarter of 2*16 = 8 dims leaves 4 frequencies to split
        text_config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": _mrope_section(2 * head_dim // 8, arch),
            "mrope_interleaved": True,
        }
        text_config["layer_types"] = [
            "full_attention" if (index + 1) % 4 == 0 or index == num_layers - 1 else "linear_attention"
            for index in range(num_layers)
        ]
        text_config |= {
            "linear_num_key_heads": _HEADS // 2,
            "linear_num_value_heads": _HEADS,
            "linear_key_head_dim": head_dim,
            "linear_value_head_dim": head_dim,
            "linear_conv_kernel_dim": 4,
        }
    return text_config


def build_config(arch: str, hidden_size: int = 64, num_layers: int = 2):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3VLConfig

    _check_arch(arch)
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig,
                    "qwen3_5": Qwen3_5Config}[arch]
    return config_class(
        text_config=_text_config(arch, hidden_size, num_layers),
        vision_config=_vision_config(arch, hidden_size, num_layers),
        tie_word_embeddings=True,
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def build_model(arch: str, seed: int, hidden_size: int = 64, num_layers: int = 2):
    import torch
    import transformers

    config = build_config(arch, hidden_size=hidden_size, num_layers=num_layers)
    cls = getattr(transformers, MODEL_CLASSES[arch])
    # Weights come only from this generator state, so the same seed gives byte-identical safetensors.
    # HF's own init (normal, std = initializer_range 0.02) keeps logits near uniform: an untrained model that
    # neither explodes nor collapses onto one token.
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config = greedy_generation_config()
    return model.eval()


def greedy_generation_config():
    """Qwen2-VL-Instruct's token ids, but greedy: demo predictions must be reproducible."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
        do_sample=False,
        repetition_penalty=1.0,
    )


class OccupiedFolderError(ValueError):
    """The output folder holds something that building a tiny model there would destroy."""


def tiny_model_settings(folder: str | Path) -> str | None:
    """The settings the tiny model in ``folder`` was built with (its completion marker), or None when ``folder``
    holds no finished tiny model."""
    try:
        return (Path(folder) / _MARKER).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _settings_line(arch: str, seed: int, min_pixels: int, max_pixels: int, hidden_size: int, num_layers: int) -> str:
    # The default size is left out, as in tiny_model_dirname: markers written before sizes were recorded still
    # read as the same settings.
    size = "" if (hidden_size, num_layers) == (64, 2) else f" hidden_size={hidden_size} num_layers={num_layers}"
    return f"{arch} seed={seed} min_pixels={min_pixels} max_pixels={max_pixels}{size}"


def _occupied_folder_error(out_dir: Path) -> OccupiedFolderError:
    if not out_dir.is_dir():
        return OccupiedFolderError(f"{out_dir} is a file, not a folder")
    shown = shown_names(sorted(path.name for path in out_dir.iterdir()))
    return OccupiedFolderError(f"{out_dir} is not empty and holds no tiny model ({shown}); choose a new or empty "
                               "folder, or pass --force to replace the folder and everything in it")


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2_vl",
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    hidden_size: int = 64,
    num_layers: int = 2,
    force: bool = False,
) -> Path:
    """Write a loadable tiny ``arch`` checkpoint (model, tokenizer, processor, chat template) to ``out_dir``.

    A tiny model already there with the same settings is kept; one with other settings is replaced. Any other
    non-empty folder is refused with :class:`OccupiedFolderError` unless ``force`` (a file always is). Built in a
    sibling temporary directory and renamed (or swapped) in whole at the end, so a crash never leaves a
    half-written checkpoint that a later ``from_pretrained`` would half-load.
    """
    _check_arch(arch)
    out_dir = Path(out_dir)
    settings = _settings_line(arch, seed, min_pixels, max_pixels, hidden_size, num_layers)
    previous = tiny_model_settings(out_dir)
    if previous == settings:
        return out_dir
    holds_other_things = previous is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if holds_other_things and not (force and out_dir.is_dir()):
        raise _occupied_folder_error(out_dir)
    # Decided here, where the folder's contents were checked: a folder that only appears during the build
    # (another process's) is never swapped out.
    replace_existing = out_dir.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = build_tokenizer(arch)
        processor = build_processor(arch, tokenizer, min_pixels, max_pixels)
        model = build_model(arch, seed, hidden_size=hidden_size, num_layers=num_layers)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # The tokenizer alone (AutoTokenizer) must also render the official template, as with the real repo.
        tokenizer.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(chat_template(arch), encoding="utf-8")
        give_umask_mode(tmp)  # safetensors writes its weights 0600
        (tmp / _MARKER).write_text(settings + "\n", encoding="utf-8")
        _publish(tmp, out_dir, settings, replace_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish(built: Path, out_dir: Path, settings: str, replace_existing: bool) -> None:
    """Move the finished build to ``out_dir``, unless another process (a second rank of the same job) finished
    the same build there first: its copy has the same bytes and may already be loading, so it stays."""
    if tiny_model_settings(out_dir) == settings:
        shutil.rmtree(built, ignore_errors=True)
        return
    if replace_existing:
        replace_directory(built, out_dir)
        return
    try:
        os.replace(built, out_dir)  # fails on a non-empty folder: nothing that appeared meanwhile is overwritten
    except OSError:
        if not out_dir.exists():
            raise
        now = tiny_model_settings(out_dir)
        if now == settings:
            shutil.rmtree(built, ignore_errors=True)
            return
        what = f"a tiny model with other settings ({now})" if now is not None else "other files"
        raise OccupiedFolderError(f"{out_dir}: another process wrote {what} there while this one was being built; "
                                  "nothing was replaced") from None


def tiny_model_dirname(arch: str, seed: int, min_pixels: int, max_pixels: int, hidden_size: int = 64,
                       num_layers: int = 2) -> str:
    size = "" if (hidden_size, num_layers) == (64, 2) else f"-h{hidden_size}-l{num_layers}"
    return f"tiny-{arch}-seed{seed}-px{min_pixels}-{max_pixels}{size}"


def ensure_tiny_model(
    cache_dir: str | Path,
    arch: str = "qwen2_vl",
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Return the cached tiny checkpoint for these settings, building it first if it is not complete."""
    path = Path(cache_dir) / tiny_model_dirname(arch, seed, min_pixels, max_pixels, hidden_size, num_layers)
    if (path / _MARKER).is_file():
        return path
    # The folder's name is this cache's own: whatever it holds without a marker is an unfinished build.
    return build_tiny_model(path, arch=arch, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
                            hidden_size=hidden_size, num_layers=num_layers, force=True)
