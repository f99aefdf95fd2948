"""Test assets built offline: the real Qwen2 tokenizer, chat templates and tiny random-weight models.

Importing this package is cheap; torch / transformers are imported only by the builders that need them.
"""

from vlm_export.testing.chat_templates import QWEN2_5_VL_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE, chat_template_for
from vlm_export.testing.qwen_tokenizer import build_qwen2_tokenizer, qwen2_tokenizer_json, write_qwen2_tokenizer
from vlm_export.testing.tiny_models import build_tiny_model, build_tiny_qwen2_5_vl

__all__ = [
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "build_qwen2_tokenizer",
    "build_tiny_model",
    "build_tiny_qwen2_5_vl",
    "chat_template_for",
    "qwen2_tokenizer_json",
    "write_qwen2_tokenizer",
]
