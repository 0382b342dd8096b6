"""The one conversation builder, used by training and by inference.

Training renders ``prompt + assistant answer``; inference renders the same messages without the answer and with
the generation prompt (plus the opening sentinel in ``sentinel`` mode). Because both come from
:func:`build_messages` and the model's own chat template, the inference prompt is a prefix of the training text
by construction — a prompt that drifts between training and inference is the most common silent failure in
fine-tuning projects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgvqa.core.config import PromptConfig
from surgvqa.data.records import Record
from surgvqa.models.special_tokens import ANSWER_CLOSE, ANSWER_OPEN, chat_template_kwargs
from surgvqa.tasks import get_task

END_OF_TURN = "<|im_end|>"


def user_text(record: Record, prompt: PromptConfig) -> str:
    """The question as the user turn puts it; the record's task words it (surgvqa.tasks)."""
    return get_task(record.task).user_text(record, prompt)


def training_target(record: Record, prompt: PromptConfig) -> str:
    """The answer text the model is taught to produce; the record's task decides its form (surgvqa.tasks)."""
    return get_task(record.task).training_target(record, prompt)


def assistant_content(answer: str, strategy: str) -> str:
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}" if strategy == "sentinel" else answer


def build_messages(record: Record, prompt: PromptConfig, answer: str | None = None,
                   strategy: str = "span") -> list[dict[str, Any]]:
    """System / user(image + text) / assistant(answer, training only) in the chat-template message format."""
    task = get_task(record.task)  # the record's task words the system and user turns
    messages: list[dict[str, Any]] = []
    if system := task.system_text(prompt):
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": task.user_text(record, prompt)}]})
    if answer is not None:
        messages.append({"role": "assistant",
                         "content": [{"type": "text", "text": assistant_content(answer, strategy)}]})
    return messages


@dataclass(frozen=True)
class RenderedChat:
    text: str  # the whole rendered conversation (training) or the prompt (inference), before image expansion
    prompt_chars: int  # where the assistant's content starts in ``text``
    content: str  # the assistant content ("" at inference, or the opening sentinel)


def render_prompt(processor: Any, record: Record, prompt: PromptConfig, strategy: str = "span") -> str:
    """The inference prompt: the training text up to the answer (and the opening sentinel in sentinel mode)."""
    text = processor.apply_chat_template(build_messages(record, prompt), tokenize=False,
                                         add_generation_prompt=True, **chat_template_kwargs(processor))
    return text + (ANSWER_OPEN if strategy == "sentinel" else "")


def render_training(processor: Any, record: Record, prompt: PromptConfig, strategy: str = "span",
                    answer: str | None = None) -> RenderedChat:
    answer = training_target(record, prompt) if answer is None else answer
    generation_prompt = processor.apply_chat_template(build_messages(record, prompt), tokenize=False,
                                                      add_generation_prompt=True, **chat_template_kwargs(processor))
    full = processor.apply_chat_template(build_messages(record, prompt, answer, strategy), tokenize=False,
                                      **chat_template_kwargs(processor))
    content = assistant_content(answer, strategy)
    if not full.startswith(generation_prompt + content + END_OF_TURN):
        # The chat template must render the prompt as a prefix of the whole conversation; a template that
        # rewrites earlier turns (e.g. strips reasoning) would make training and inference see different text.
        raise ValueError(f"{record.id}: the chat template does not render the prompt as a prefix of the "
                         f"conversation; answer-only supervision cannot be located")
    return RenderedChat(text=full, prompt_chars=len(generation_prompt), content=content)
