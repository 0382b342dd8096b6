"""surgvqa: instruction-tune Qwen2-VL-family models on surgical / GI-endoscopy VQA and measure them per type."""

__version__ = "0.1.0"
