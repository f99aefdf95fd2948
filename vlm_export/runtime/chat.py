"""Render the model's own chat template the way transformers' `apply_chat_template` does, within limits.

Messages are copied to plain JSON-like values (media objects become inert placeholders: templates only test for
the presence of media keys) and rendered in :mod:`template_sandbox`'s bounded jinja2 environment, which gives
transformers' output for real templates and one-line errors for broken or hostile ones: a `ManifestError` for a
template that cannot compile, an `InputError` for a render that fails or runs out of budget.

One deliberate difference: where a template renders nothing of a message whose content is a plain string
(LLaVA-OneVision's renders only lists of parts, so transformers silently drops the text), that content is passed
as one text part instead, which is what the caller meant.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import jinja2

from vlm_export.errors import InputError, VLMExportError
from vlm_export.runtime.template_sandbox import (
    DEFAULT_LIMITS,
    RenderLimitError,
    RenderLimits,
    compile_chat_template,
    render_budget,
)

logger = logging.getLogger(__name__)

MAX_MESSAGE_DEPTH = 64  # nesting of the message structures handed to the template


def _plain(value: Any, counter: list[int], depth: int = 0) -> Any:
    """JSON-like copy of the messages; anything else (images, arrays) becomes a placeholder string. `counter[0]`
    accumulates the characters of every string (the budget scales with it)."""
    if depth > MAX_MESSAGE_DEPTH:
        raise InputError(f"the messages nest deeper than {MAX_MESSAGE_DEPTH} levels; pass plain chat messages")
    if isinstance(value, str):
        counter[0] += len(value) + 1
        return value
    if value is None or isinstance(value, bool | int | float):
        counter[0] += 1
        return value
    if isinstance(value, dict):
        counter[0] += 1
        return {str(k): _plain(v, counter, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        counter[0] += 1
        return [_plain(v, counter, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


_PROBE = "\ue000vlm-export-probe\ue001"
_PROBE_LIMITS = RenderLimits(seconds=0.5, steps=100_000)  # one short message: real templates need far less


@lru_cache(maxsize=64)
def _drops_string_content(template: str, role: str) -> bool:
    """Whether the template renders nothing of a `role` message whose content is a plain string (LLaVA-OneVision's
    renders only lists of parts: transformers then silently drops the text)."""
    try:
        probe = _render(template, [{"role": role, "content": _PROBE}], True, {}, 0, _PROBE_LIMITS)
    except Exception:  # a template may refuse a lone message of this role: then leave the messages as they are
        return False
    return _PROBE not in probe


def _with_text_parts(template: str, messages: list[Any]) -> list[Any]:
    """String contents turned into one text part where the template would drop them (as users mean them)."""
    converted = list(messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not message["content"]:
            continue
        role = message.get("role")
        if isinstance(role, str) and _drops_string_content(template, role):
            logger.debug("the chat template ignores string content; passing %s message %d as a text part", role, index)
            converted[index] = {**message, "content": [{"type": "text", "text": message["content"]}]}
    return converted


def _render(
    template: str,
    messages: Any,
    add_generation_prompt: bool,
    kwargs: dict[str, Any],
    chars: int,
    limits: RenderLimits | None = None,
) -> str:
    compiled = compile_chat_template(template)
    with render_budget(limits or DEFAULT_LIMITS, chars):
        return "".join(compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs))


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """One conversation -> prompt text (placeholders not yet expanded)."""
    counter = [0]
    plain_messages = _plain(messages, counter)
    plain_kwargs = _plain(kwargs, counter)
    if isinstance(plain_messages, list):
        plain_messages = _with_text_parts(template, plain_messages)
    try:
        return _render(template, plain_messages, add_generation_prompt, plain_kwargs, counter[0])
    except VLMExportError:
        raise
    except RenderLimitError as error:
        raise InputError(
            f"the chat template was stopped: {error}; the template may be broken or malicious (check "
            "chat_template.jinja in the export folder), or the messages too large"
        ) from None
    except jinja2.exceptions.TemplateError as error:
        raise InputError(f"the chat template rejected the messages: {_one_line(error)}") from None
    except RecursionError:
        raise InputError("the chat template recursed too deeply on these messages") from None
    except MemoryError:
        raise InputError("the chat template ran out of memory on these messages") from None
    except Exception as error:  # a template's own bug or unexpected message values: TypeError, KeyError...
        raise InputError(
            f"the chat template failed on these messages ({type(error).__name__}: {_one_line(error)}); check the "
            "message structure (transformers' chat format)"
        ) from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
