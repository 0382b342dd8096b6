"""Loading the processor and the model the config names, and preparing them for the masking strategy."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from surgvqa.chat import ANSWER_CLOSE, ANSWER_OPEN
from surgvqa.config import Config, ModelConfig

log = logging.getLogger(__name__)


def resolve_model_path(config: Config) -> str:
    """The directory or hub id to load; "tiny" builds the offline demo model into the cache once."""
    model = config.model
    if model.name_or_path != "tiny":
        return model.name_or_path
    from surgvqa.tiny import ensure_tiny_model

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
    from transformers import AutoProcessor

    # The config's pixel limits override the checkpoint's, so training and inference always agree on them.
    processor = AutoProcessor.from_pretrained(
        path, size={"shortest_edge": model.min_pixels, "longest_edge": model.max_pixels}, trust_remote_code=False)
    if strategy == "sentinel":
        register_sentinel_tokens(processor.tokenizer)
    return processor


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


def vision_tower(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None)


def freeze_vision_tower(model: Any, *, train_merger: bool = False, freeze: bool = True) -> None:
    visual = vision_tower(model)
    if visual is None or not freeze:
        return
    for name, parameter in visual.named_parameters():
        parameter.requires_grad = train_merger and name.startswith("merger.")
