"""The text markers every family shares: the answer sentinels and the chat-template switches.

A leaf beside the family table: the conversation builder and model loading both import it.
"""

from __future__ import annotations

from typing import Any

# The sentinels around the answer in masking.strategy "sentinel" (registered as tokens when the model loads).
ANSWER_OPEN = "<ANS>"
ANSWER_CLOSE = "</ANS>"


# The answer is never preceded by reasoning: a template with a thinking switch (Qwen3.5's) then renders an empty,
# closed think block both in training and in the prompt, so that the prompt stays a prefix of the training text.
THINKING_SWITCH = "enable_thinking"


def chat_template_kwargs(processor: Any) -> dict[str, Any]:
    """Variables for every chat-template rendering: thinking off where the template has the switch. Only there:
    transformers warns on each call about a variable the template does not use."""
    template = getattr(processor, "chat_template", None)
    return {THINKING_SWITCH: False} if isinstance(template, str) and THINKING_SWITCH in template else {}

