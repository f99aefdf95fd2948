"""Request models of `POST /v1/chat/completions` (pydantic v2) and the response shapes OpenAI's clients parse.

Unknown request fields are accepted and logged, as vLLM does, so that additions to the SDKs do not break clients;
fields we cannot honour (`n > 1`, `tools`, `response_format`, `logit_bias`, penalties) are refused with 400 rather
than silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: str | None = None  # accepted; the model's own image budget decides the resolution


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Part):
    url: str
    fps: float | None = Field(None, gt=0, description="sample the video at this many frames per second")
    num_frames: int | None = Field(None, ge=1, description="sample this many frames from the video")


class VideoPart(_Part):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; 0 or -1 disables top-k")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    user: str | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description="vLLM extension: {'video': {'fps': F, 'num_frames': N}} for every video of the request"
    )

    def refused_fields(self) -> tuple[str, str] | None:
        """(param, message) for the first field set to something this server does not do, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported; send the request several times for several answers"
        if self.tools:
            return "tools", "tool calling is not supported by this server"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool calling is not supported by this server"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format", "structured output (response_format) is not supported; leave it unset"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; leave it unset or empty"
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported; use repetition_penalty"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported; use repetition_penalty"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            return "max_tokens", "max_tokens and max_completion_tokens differ; send one of them"
        return None

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# -- responses (plain dicts: exactly OpenAI's field names, nothing optional left out) ---------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    *,
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    include_usage: bool = False,
    usage_value: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage chunk (`choices: []`)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish_reason,
            }
        ],
    }
    if include_usage:
        body["usage"] = usage_value
    return body


def model_card(name: str, created: int, max_model_len: int | None, modalities: list[str]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vlm-export",
        "max_model_len": max_model_len,
        "input_modalities": modalities,
    }


def now() -> int:
    return int(time.time())
