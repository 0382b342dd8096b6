"""Loading the processor and the model the config names, and preparing them for the masking strategy.

The supported architectures and everything that differs between them are in :data:`FAMILIES` (one table,
documented in docs/models.md); the stages never branch on the architecture themselves. The architecture is the
checkpoint's own ``config.json`` ``model_type``: no setting chooses it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from surgvqa.core.config import Config, ModelConfig
from surgvqa.models.families import (
    CONFIG_TOKEN_SIDE,
    ModelFamily,
    ModelLoadError,
    family_of,
    family_pixel_budget,
)
from surgvqa.models.special_tokens import ANSWER_CLOSE, ANSWER_OPEN
from surgvqa.models.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

# "org/name" (or a bare "name"): the shape of a hub id, as huggingface_hub's validate_repo_id accepts it.
HUB_ID_PATTERN = re.compile(r"[\w.-]+(/[\w.-]+)?")
# How torch reports a tensor whose shape differs from the checkpoint's in load_state_dict.
SIZE_MISMATCH_PATTERN = re.compile(r"size mismatch for (?P<name>\S+): copying a param with shape "
                                   r"(?:torch\.Size\()?(?P<saved>\[[^\]]*\])\)? from checkpoint, the shape in "
                                   r"current model is (?:torch\.Size\()?(?P<current>\[[^\]]*\])")




def model_family(path: str) -> ModelFamily:
    """The family of the checkpoint at ``path`` (folder or cached hub id), from its config.json."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path)
    return family_of(str(config.get("model_type")), path)


def max_image_tokens(model: ModelConfig) -> int:
    """Image tokens of the largest image the pixel budget allows, on every family."""
    return model.max_pixels // (CONFIG_TOKEN_SIDE * CONFIG_TOKEN_SIDE)


def processor_token_side(path: str) -> int:
    """Pixels per token side from the saved image processor itself (also where a trained adapter folder holds the
    processor but no config.json)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    settings, _ = ImageProcessingMixin.get_image_processor_dict(path)
    return int(settings.get("patch_size", 14)) * int(settings.get("merge_size", 2))


def _looks_like_path(name: str) -> bool:
    if os.path.isabs(name) or name.startswith((".", "~")):
        return True
    return os.sep in name and not HUB_ID_PATTERN.fullmatch(name)


def weights_file_damage(file: Path) -> str | None:
    """Why a weights file (safetensors, or a ``torch.save`` zip: ``.pt``, ``.pth``, ``.bin``) cannot be loaded, or
    None. Only headers are read: safetensors' header, checked against the file's size, and the zip directory at
    the end of a ``torch.save`` file, which a truncation cuts off. The loaders' own errors name no file."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt"):
                pass
        elif file.suffix in (".pt", ".pth", ".bin"):
            zipfile.ZipFile(file).close()
    except (SafetensorError, zipfile.BadZipFile, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# A model folder's tokenizer is one of these sets of files. Without any, transformers builds a tokenizer with an
# empty vocabulary: every question encodes to nothing, and prepare would keep every row.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def _check_model_folder(folder: Path, key: str) -> None:
    """A local model folder's tokenizer is there and its weights' headers read, so that neither fails later
    without naming a file."""
    if (folder / "config.json").is_file() and not any(all((folder / name).is_file() for name in names)
                                                      for names in TOKENIZER_FILE_SETS):
        raise ModelLoadError(f"{key}: {folder} has no tokenizer (tokenizer.json is missing, and so are vocab.json "
                             "with merges.txt and tokenizer.model): copy the model's tokenizer files into it, or "
                             "download the model again")
    for file in sorted(folder.glob("*.safetensors")):
        damage = weights_file_damage(file)
        if damage is not None:
            raise ModelLoadError(f"{key}: {file} is damaged ({damage}): copy or download the model again")


def check_model_source(name: str, key: str = "model.name_or_path") -> str:
    """Fail early, in one line, for a model that cannot load: a missing folder, or a hub id that is not in the
    local cache while the hub is offline (transformers would answer both with a hub-id traceback)."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    local = Path(name).expanduser()
    if local.exists():
        # A trained LoRA adapter folder (adapter_config.json, no config.json) is a model to predict with too.
        if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise ModelLoadError(f"{key}: {name} is not a model directory (no config.json in it)")
        _check_model_folder(local, key)
        return str(local) if name.startswith("~") else name
    if _looks_like_path(name):
        raise ModelLoadError(f"{key}: {name} does not exist")
    if not HUB_ID_PATTERN.fullmatch(name):
        raise ModelLoadError(f"{key}: {name!r} is neither an existing folder nor a hub id (org/name)")
    if is_offline_mode() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelLoadError(f"{key}: {name} is not a folder here and not in the local hub cache, and the hub is "
                             "offline (HF_HUB_OFFLINE); download it first (`hf download "
                             f"{name}`) or point {key} at a local copy")
    return name


def resolve_model_path(config: Config) -> str:
    """The directory or hub id to load; "tiny" builds the offline demo model into the cache once."""
    model = config.model
    if model.name_or_path != "tiny":
        return check_model_source(model.name_or_path)

    return str(ensure_tiny_model(Path(config.cache_dir) / "models", arch=model.tiny_arch, seed=model.tiny_seed,
                                 min_pixels=model.min_pixels, max_pixels=model.max_pixels,
                                 hidden_size=model.tiny_hidden_size, num_layers=model.tiny_layers))


def register_sentinel_tokens(tokenizer: Any) -> tuple[int, int]:
    """Make ``<ANS>`` and ``</ANS>`` atomic added tokens, so BPE can never merge them with the answer.

    Without this, ``<ANS>No`` tokenizes as ``< ANS >No`` and the token ``>No`` straddles the sentinel/answer
    boundary: no labelling of it is right. Idempotent.
    """
    from tokenizers import AddedToken

    new = [AddedToken(text, special=False, normalized=False, lstrip=False, rstrip=False)
           for text in (ANSWER_OPEN, ANSWER_CLOSE) if text not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
        # A tokenizer saved after training already has them, with trained embedding rows to keep.
        tokenizer.surgvqa_new_sentinels = True
    return tokenizer.convert_tokens_to_ids(ANSWER_OPEN), tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)


def load_processor(path: str, model: ModelConfig, strategy: str = "span") -> Any:
    """The checkpoint's processor with the config's pixel limits; loaded once per process for the same files.

    The config's pixel limits override the checkpoint's, so training and inference always agree on them; they are
    converted to the family's pixels, so that a budget means the same number of image tokens on each.
    """
    min_pixels, max_pixels = family_pixel_budget(model.min_pixels, model.max_pixels, processor_token_side(path))
    return _load_processor(path, _processor_files_signature(path), min_pixels, max_pixels, strategy)


# The stages of one `surgvqa run` load the same processor up to five times, and transformers parses an 18 MB
# tokenizer.json three times per load (seconds each). The files' identity is part of the key, so a checkpoint
# written again in place (a new run, a retrained model) is read again.
@functools.lru_cache(maxsize=4)
def _load_processor(path: str, _files: tuple, min_pixels: int, max_pixels: int, strategy: str) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        path, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, trust_remote_code=False)
    if strategy == "sentinel":
        register_sentinel_tokens(processor.tokenizer)
    return processor


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "processor_config.json",
                   "preprocessor_config.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json")


def _processor_files_signature(path: str) -> tuple:
    """(name, inode, size, mtime) of the processor's files in a local checkpoint; () for a hub id."""
    folder = Path(path)
    if not folder.is_dir():
        return ()
    signature = []
    for name in PROCESSOR_FILES:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            continue
        signature.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return (str(folder.resolve()), *signature)


def torch_dtype(model: ModelConfig) -> torch.dtype:
    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def attention_implementation(requested: str) -> str:
    """``auto``: flash-attention 2 on CUDA when the package is installed, else PyTorch's sdpa."""
    flash_available = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if flash_available else "sdpa"
    if requested == "flash_attention_2" and not flash_available:
        log.warning("flash_attention_2 requested but flash-attn (or CUDA) is not available; using sdpa")
        return "sdpa"
    return requested


def init_sentinel_embeddings(model: Any, tokenizer: Any, *, initialise: bool = True) -> None:
    """Grow the embedding table if the sentinel ids do not fit, and (for newly added sentinels) start each
    sentinel row at the mean of the embeddings of its text pieces (a sensible start instead of a random row)."""
    open_id, close_id = register_sentinel_tokens(tokenizer)
    embeddings = model.get_input_embeddings()
    if max(open_id, close_id) >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings()
    if not initialise:
        return
    backend = tokenizer.backend_tokenizer
    with torch.no_grad():
        for token_id, text in ((open_id, ANSWER_OPEN), (close_id, ANSWER_CLOSE)):
            pieces = [piece_id for piece_id in backend.model.tokenize(text)]
            piece_ids = [tokenizer.convert_tokens_to_ids(piece.value) for piece in pieces]
            embeddings.weight[token_id] = embeddings.weight[piece_ids].mean(dim=0)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr():
                output.weight[token_id] = output.weight[piece_ids].mean(dim=0)


def load_model(path: str, config: Config, processor: Any, *, for_training: bool = True) -> Any:
    """Load the base model on the right dtype; freeze the vision tower unless asked; prepare sentinels."""
    from transformers import AutoModelForImageTextToText

    settings = config.model
    model_family(path)  # an unsupported architecture fails here, in one line, before gigabytes load
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype(settings), attn_implementation=attention_implementation(settings.attn_implementation),
        trust_remote_code=False)
    if config.masking.strategy == "sentinel":
        init_sentinel_embeddings(model, processor.tokenizer,
                                 initialise=getattr(processor.tokenizer, "surgvqa_new_sentinels", False))
    if for_training:
        freeze_vision_tower(model, train_merger=settings.train_merger, freeze=settings.freeze_vision)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.config.use_cache = False
    return model


def load_adapter(model: Any, adapter_dir: str | Path, base_path: str) -> Any:
    """Wrap ``model`` (the base loaded from ``base_path``) with the LoRA adapter in ``adapter_dir``.

    An adapter trained on another base model does not fit its weights: peft reports that as a many-line
    ``size mismatch`` RuntimeError, or as missing target modules; both become one :class:`ModelLoadError`.
    """
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as exc:
        mismatch = SIZE_MISMATCH_PATTERN.search(str(exc))
        if mismatch is None:
            raise
        raise ModelLoadError(
            f"adapter {adapter_dir} does not fit base model {base_path}: {mismatch['name']} has shape "
            f"{mismatch['saved']} in the adapter but {mismatch['current']} in the base model (trained on another "
            "base model? set model.name_or_path to the adapter's base)") from None
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise ModelLoadError(f"adapter {adapter_dir} does not fit base model {base_path}: "
                             f"{' '.join(str(exc).split())}") from None


def vision_tower(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None)


def freeze_vision_tower(model: Any, *, train_merger: bool = False, freeze: bool = True) -> None:
    visual = vision_tower(model)
    if visual is None or not freeze:
        return
    mergers = family_of(model.config.model_type).merger_prefixes
    for name, parameter in visual.named_parameters():
        parameter.requires_grad = train_merger and name.startswith(mergers)
