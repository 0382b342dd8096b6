"""The token length of a training sample, measured without running its image through the processor."""

from __future__ import annotations

from typing import Any

from surgvqa.core.config import Config
from surgvqa.data.records import Record
from surgvqa.models.loading import load_processor, resolve_model_path
from surgvqa.prompting.chat import render_training, training_target


class SampleLengths:
    """The token length of a sample exactly as :func:`surgvqa.prompting.encoding.encode_example` encodes it.

    Computed from the tokenizer and the image processor's own resize rule instead of running every image
    through the processor, which would make prepare minutes slower at Kvasir scale: the image placeholder is a
    special token, so the text around it tokenizes the same before and after it expands to the image tokens.
    """

    def __init__(self, config: Config, processor: Any = None):
        self.config = config
        self.prompt = config.prompt
        self.strategy = config.masking.strategy
        self.max_length = config.masking.max_length
        self._processor = processor
        self._special_tokens: list[str] | None = None
        self._text_tokens: dict[tuple, int] = {}

    @property
    def processor(self) -> Any:
        """Loaded at the first row that needs it: a source that fails before its first row costs no model load."""
        if self._processor is None:
            self._processor = _load_processor(self.config)
        return self._processor

    @property
    def special_tokens(self) -> list[str]:
        if self._special_tokens is None:
            self._special_tokens = sorted(self.processor.tokenizer.get_added_vocab(), key=len, reverse=True)
        return self._special_tokens

    def image_tokens(self, width: int, height: int) -> int:
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size ** 2

    def special_token_in(self, text: str) -> str | None:
        return next((token for token in self.special_tokens if token in text), None)

    def text_tokens(self, record: Record) -> int:
        """Tokens of the rendered conversation other than the image's (its one placeholder excluded)."""
        # Keyed by what the rendering reads; Kvasir repeats a few thousand question/answer pairs over 58k rows.
        key = (record.question, training_target(record, self.prompt), record.question_type,
               tuple(record.candidates), record.source, record.task)
        if key not in self._text_tokens:
            rendered = render_training(self.processor, record, self.prompt, self.strategy)
            self._text_tokens[key] = len(self.processor.tokenizer(rendered.text)["input_ids"]) - 1
        return self._text_tokens[key]

    def total(self, record: Record, image_tokens: int) -> int:
        return self.text_tokens(record) + image_tokens

    def too_long(self, record: Record, image_tokens: int) -> str | None:
        """None when the sample fits, else a message that names the length and what makes it long."""
        total = self.total(record, image_tokens)
        if total <= self.max_length:
            return None
        text = self.text_tokens(record)
        empty = Record(id=record.id, img_id=record.img_id, image=record.image, question="", answer="",
                       source=record.source, question_type=record.question_type, task=record.task)
        listed = f" with its {len(record.candidates)} listed candidates" if self.prompt.list_candidates and \
            record.candidates else ""
        if self.total(empty, image_tokens) <= self.max_length:
            return (f"{total} tokens ({text} text + {image_tokens} image) exceed masking.max_length="
                    f"{self.max_length}: the question/answer text{listed} is too long "
                    f"(question {len(record.question):,} chars, answer {len(record.answer):,} chars)")
        return (f"{total} tokens ({text} text + {image_tokens} image) exceed masking.max_length={self.max_length} "
                f"even with an empty question and answer: lower model.max_pixels (image tokens) or raise "
                f"masking.max_length")


def _load_processor(config: Config) -> Any:

    path = resolve_model_path(config)
    try:
        return load_processor(path, config.model, config.masking.strategy)
    except OSError as exc:
        raise ValueError(f"cannot load the processor of {path}, which prepare needs to measure every sample "
                         f"in tokens ({exc})") from None
