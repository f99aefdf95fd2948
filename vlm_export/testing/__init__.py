"""Test assets built offline: the real Qwen2 / Qwen3 / LLaVA-OneVision tokenizers, chat templates and tiny
random-weight models.

Importing this package is cheap; torch / transformers are imported only by the builders that need them.
"""

from vlm_export.testing.chat_templates import (
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN3_VL_MOE_CHAT_TEMPLATE,
    chat_template_for,
)
from vlm_export.testing.qwen_tokenizer import (
    build_llava_onevision_tokenizer,
    build_qwen2_tokenizer,
    build_qwen3_tokenizer,
    llava_onevision_tokenizer_json,
    qwen2_tokenizer_json,
    qwen3_tokenizer_json,
    write_llava_onevision_tokenizer,
    write_qwen2_tokenizer,
    write_qwen3_tokenizer,
)
from vlm_export.testing.tiny_models import (
    build_tiny_llava_onevision,
    build_tiny_model,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
    build_tiny_qwen3_vl_moe,
    expert_usage,
)

__all__ = [
    "LLAVA_ONEVISION_CHAT_TEMPLATE",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN3_VL_CHAT_TEMPLATE",
    "QWEN3_VL_MOE_CHAT_TEMPLATE",
    "build_llava_onevision_tokenizer",
    "build_qwen2_tokenizer",
    "build_qwen3_tokenizer",
    "build_tiny_llava_onevision",
    "build_tiny_model",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen3_vl_moe",
    "chat_template_for",
    "expert_usage",
    "llava_onevision_tokenizer_json",
    "qwen2_tokenizer_json",
    "qwen3_tokenizer_json",
    "write_llava_onevision_tokenizer",
    "write_qwen2_tokenizer",
    "write_qwen3_tokenizer",
]
