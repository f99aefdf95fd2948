# ruff: noqa: E501  (QWEN3_VL_CHAT_TEMPLATE keeps the hub file's long lines verbatim)
"""Chat templates of the supported families, rebuilt because no package ships them.

The Qwen2-VL / Qwen2.5-VL template below reproduces, character for character, the renderings that
transformers' Qwen2.5-VL documentation gives as the expected output (``EXPECTED_*`` below are copied
from it), so tests can check a tokenizer / processor directory renders real prompts.

The Qwen3-VL template is the ``chat_template.json`` of the Qwen/Qwen3-VL-*-Instruct hub repos (shared by
the dense and the MoE models), reconstructed source line for source line; ``EXPECTED_QWEN3_VL_*`` are
the renderings it gives (transformers' Qwen3-VL docs show the calls but not the rendered text).

The LLaVA-OneVision template is the one transformers' conversion script wrote into the llava-hf hub repos;
``LLAVA_ONEVISION_DOC_EXAMPLES`` pair the docs' conversations with the decoded outputs the docs print.
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


#: Jinja chat template of Qwen3-VL-*-Instruct and Qwen3-VL-30B-A3B-Instruct / 235B-A22B-Instruct (MoE).
#: Unlike Qwen2.5-VL's:
#: - no default system turn; a system message is honoured only as the *first* message (a later one is
#:   dropped), and only its text parts are kept;
#: - ``tools`` renders the Qwen3 "# Tools" system block (merged with a first system message) and asks for
#:   ``<tool_call>`` JSON; assistant ``tool_calls`` render as ``<tool_call>`` blocks; consecutive ``tool``
#:   messages become one user turn of ``<tool_response>`` blocks, which may hold images / videos too;
#: - assistant content parts keep only their text (no image placeholders in assistant turns);
#: - image parts (type "image", or an "image"/"image_url" key) -> ``<|vision_start|><|image_pad|><|vision_end|>``,
#:   video parts (type "video", or a "video" key) -> ``<|vision_start|><|video_pad|><|vision_end|>``;
#:   ``add_vision_id=True`` prefixes "Picture N: " / "Video N: " as before;
#: - nothing about ``<think>``: that is the Thinking models' template.
#: Written for transformers' environment (``trim_blocks``/``lstrip_blocks``, a ``tojson`` that keeps
#: key order and non-ASCII): with the plain jinja2 ``tojson`` filter the tools block differs.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

#: The dense and the MoE Qwen3-VL Instruct models ship the same template.
QWEN3_VL_MOE_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE

#: The single-image request of transformers' Qwen3-VL / Qwen3-VL-MoE usage examples.
QWEN3_VL_DOC_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {
                "type": "image",
                "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg",
            },
            {"type": "text", "text": "Describe this image."},
        ],
    }
]

#: QWEN3_VL_DOC_MESSAGES rendered with add_generation_prompt=True: no system turn.
EXPECTED_QWEN3_VL_DOC_RENDERING = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

#: REFERENCE_CONVERSATION under the Qwen3-VL template: Qwen2.5-VL's rendering without the default system turn.
EXPECTED_QWEN3_VL_REFERENCE_RENDERING = EXPECTED_REFERENCE_RENDERING.removeprefix(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
)
EXPECTED_QWEN3_VL_REFERENCE_RENDERING_WITH_IDS = EXPECTED_REFERENCE_RENDERING_WITH_IDS.removeprefix(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
)

#: A function-calling round trip (tools, assistant tool_calls, two tool results with an image).
QWEN3_VL_TOOL_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "zoom_in",
            "description": "Crop the image to a box.",
            "parameters": {
                "type": "object",
                "properties": {"bbox": {"type": "array", "items": {"type": "integer"}}},
                "required": ["bbox"],
            },
        },
    }
]
QWEN3_VL_TOOL_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the sign?"}]},
    {
        "role": "assistant",
        "content": "Let me zoom in.",
        "tool_calls": [{"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox": [1, 2, 30, 40]}}}],
    },
    {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "cropped"}]},
    {"role": "tool", "content": "done"},
]
EXPECTED_QWEN3_VL_TOOL_RENDERING = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "zoom_in", "description": "Crop the image to a box.", '
    '"parameters": {"type": "object", "properties": {"bbox": {"type": "array", "items": {"type": "integer"}}}, '
    '"required": ["bbox"]}}}\n</tools>\n\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is on the sign?<|im_end|>\n"
    '<|im_start|>assistant\nLet me zoom in.\n<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [1, 2, 30, 40]}}'
    "\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>cropped\n</tool_response>"
    "\n<tool_response>\ndone\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ------------------------------------------------------------------------------------ LLaVA-OneVision

#: Jinja chat template of llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-{ov,si}-hf, character for character the
#: ``chat_template`` string of transformers' convert_llava_onevision_weights_to_hf.py (which wrote the hub's
#: ``chat_template.json``; its ``'\n'`` are real newlines inside the Jinja string literals). Per message:
#: - ``<|im_start|>{role}\n``, then one ``<image>\n`` per image part, then one ``<video>\n`` per video part,
#:   then the text parts concatenated, then ``<|im_end|>\n``: media always come first, whatever their position;
#: - parts are selected by ``type`` only (``selectattr('type', 'equalto', ...)``), so a part without a ``type`` key
#:   is dropped, and a *string* content renders nothing at all (callers must pass lists of parts);
#: - no default system turn; a system message renders like any other role;
#: - assistant text sits in ``{% generation %}`` blocks: a transformers extension (for
#:   ``return_assistant_tokens_mask``) that plain jinja2 cannot parse without a ``generation`` tag extension.
#: ``add_generation_prompt=True`` opens an assistant turn (``<|im_start|>assistant\n``).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The conversations of transformers' LLaVA-OneVision docs (reference doc 003), in document order. Each pairs
#: the messages with the decoded output the docs print (``decode(..., skip_special_tokens=True)`` of prompt +
#: generation); the rendered prompt, tokenized and decoded the same way, must be a prefix of it.
LLAVA_ONEVISION_DOC_EXAMPLES: list[tuple[list[dict[str, Any]], str]] = [
    (  # "Single image inference"
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "url": "https://github.com/haotian-liu/LLaVA/blob/1a91fc274d7c35a9b50b3cb29c4247ae5837ce39/images/llava_v1_5_radar.jpg?raw=true",
                    },
                    {"type": "text", "text": "What is shown in this image?"},
                ],
            }
        ],
        "user\n\nWhat is shown in this image?\nassistant\nThe image shows a radar chart, also known as a spider "
        "chart or a star chart, which is used to compare multiple quantitative variables. Each axis represents a "
        "different variable, and the chart is filled with",
    ),
    (  # "Multi image inference", first conversation of the batch
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": "https://www.ilankelman.org/stopsigns/australia.jpg"},
                    {"type": "text", "text": "What is shown in this image?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "There is a red stop sign in the image."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": "http://images.cocodataset.org/val2017/000000039769.jpg"},
                    {"type": "text", "text": "What about this image? How many cats do you see?"},
                ],
            },
        ],
        "user\n\nWhat is shown in this image?\nassistant\nThere is a red stop sign in the image.\nuser\n\n"
        "What about this image? How many cats do you see?\nassistant\ntwo",
    ),
    (  # "Video inference"
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "path": "sample_demo_1.mp4"},
                    {"type": "text", "text": "Why is this video funny?"},
                ],
            }
        ],
        "user\n\nWhy is this video funny?\nassistant\nThe video appears to be humorous because it shows a young "
        "child, who is wearing glasses and holding a book, seemingly reading with a serious and focused expression. "
        "The child's glasses are a bit oversized for their face, which adds a comical touch, as it's a common trope "
        "to see children wearing",
    ),
    (  # LlavaOnevisionForConditionalGeneration.forward example: the text part comes *before* the image
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is shown in this image?"}, {"type": "image"}],
            }
        ],
        "user\n\nWhat is shown in this image?\nassistant\ncat",
    ),
]

#: The multi-turn conversation of the docs' "Formatting Prompts with Chat Templates" section, and what the
#: template renders for it with add_generation_prompt=True (the docs print a garbled string there instead).
LLAVA_ONEVISION_CHAT_CONVERSATION: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What\u2019s shown in this image?"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "This image shows a red stop sign."}]},
    {"role": "user", "content": [{"type": "text", "text": "Describe the image in more details."}]},
]
EXPECTED_LLAVA_ONEVISION_CHAT_RENDERING = (
    "<|im_start|>user\n<image>\nWhat\u2019s shown in this image?<|im_end|>\n"
    "<|im_start|>assistant\nThis image shows a red stop sign.<|im_end|>\n"
    "<|im_start|>user\nDescribe the image in more details.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def chat_template_for(family: str) -> str:
    """The chat template string of a model family (e.g. ``"qwen2_5_vl"``)."""
    templates = {
        "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
        "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
        "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
        "qwen3_vl_moe": QWEN3_VL_MOE_CHAT_TEMPLATE,
        "llava_onevision": LLAVA_ONEVISION_CHAT_TEMPLATE,
    }
    try:
        return templates[family]
    except KeyError:
        raise ValueError(f"no chat template for family {family!r}; known: {sorted(templates)}") from None
