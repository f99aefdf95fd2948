"""Chat templates of the supported families, rebuilt because no package ships them.

The Qwen2-VL / Qwen2.5-VL template below reproduces, character for character, the renderings that
transformers' Qwen2.5-VL documentation gives as the expected output (``EXPECTED_*`` below are copied
from it), so tests can check a tokenizer / processor directory renders real prompts.
"""

from __future__ import annotations

from typing import Any

#: Jinja chat template of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (identical for both).
#: - a default system turn "You are a helpful assistant." when the first message is not a system one;
#: - content is a string or a list of parts; image parts (type "image", or an "image"/"image_url"
#:   key) become ``<|vision_start|><|image_pad|><|vision_end|>``, video parts
#:   ``<|vision_start|><|video_pad|><|vision_end|>``, text parts their text;
#: - ``add_vision_id=True`` prefixes "Picture N: " / "Video N: ", counted across the whole chat;
#: - ``add_generation_prompt=True`` opens an assistant turn.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen2.5-VL uses the Qwen2-VL template unchanged.
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE

#: The multi-turn, multi-image + video conversation of transformers' Qwen2.5-VL docs.
REFERENCE_CONVERSATION: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}],
    },
    {
        "role": "assistant",
        "content": "I'm doing well, thank you for asking. How can I assist you today?",
    },
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Can you describe these images and video?"},
            {"type": "image"},
            {"type": "image"},
            {"type": "video"},
            {"type": "text", "text": "These are from my vacation."},
        ],
    },
    {
        "role": "assistant",
        "content": "I'd be happy to describe the images and video for you. "
        "Could you please provide more context about your vacation?",
    },
    {
        "role": "user",
        "content": "It was a trip to the mountains. Can you see the details in the images and video?",
    },
]

#: Expected rendering of REFERENCE_CONVERSATION with add_generation_prompt=True (from the docs).
EXPECTED_REFERENCE_RENDERING = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n"
    "<|im_start|>assistant\nI'm doing well, thank you for asking. How can I assist you today?<|im_end|>\n"
    "<|im_start|>user\nCan you describe these images and video?"
    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    "<|vision_start|><|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n"
    "<|im_start|>assistant\nI'd be happy to describe the images and video for you. "
    "Could you please provide more context about your vacation?<|im_end|>\n"
    "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?"
    "<|im_end|>\n<|im_start|>assistant\n"
)

#: Same with add_vision_id=True (from the docs).
EXPECTED_REFERENCE_RENDERING_WITH_IDS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n"
    "<|im_start|>assistant\nI'm doing well, thank you for asking. How can I assist you today?<|im_end|>\n"
    "<|im_start|>user\nCan you describe these images and video?"
    "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Picture 3: <|vision_start|><|image_pad|><|vision_end|>"
    "Video 1: <|vision_start|><|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n"
    "<|im_start|>assistant\nI'd be happy to describe the images and video for you. "
    "Could you please provide more context about your vacation?<|im_end|>\n"
    "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def chat_template_for(family: str) -> str:
    """The chat template string of a model family (e.g. ``"qwen2_5_vl"``)."""
    templates = {"qwen2_vl": QWEN2_VL_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE}
    try:
        return templates[family]
    except KeyError:
        raise ValueError(f"no chat template for family {family!r}; known: {sorted(templates)}") from None
