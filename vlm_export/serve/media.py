"""Image and video URLs of a request, under the server's media rules, turned into `VLMPipeline` message parts.

* `data:<mime>;base64,...` always (the body size cap bounds them);
* `file://` only with `--media-dir`, and only files inside it: no `..` component, and the resolved path (symlinks
  followed) must stay inside the resolved directory;
* `http(s)://` only with `--allow-remote-media`, streamed with a byte cap and a total time cap (httpx).

Images are passed to the runtime as bytes or paths; videos as paths (PyAV reads files), so fetched or inlined
videos are written to a per-request temporary folder that the caller removes once the media are decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from vlm_export.serve.errors import bad_request
from vlm_export.serve.schemas import ChatCompletionRequest, ImagePart, TextPart, VideoPart


@dataclass(frozen=True)
class MediaPolicy:
    media_dir: Path | None = None
    allow_remote: bool = False
    max_bytes: int = 32 * 1024 * 1024  # per fetched file
    timeout_s: float = 20.0  # per fetched file, connect to last byte


class MediaFolder:
    """A request's temporary folder for videos (PyAV reads files); `close` removes it."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None

    def write(self, data: bytes, suffix: str = ".bin") -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="vlm-serve-")
        fd, path = tempfile.mkstemp(suffix=suffix, dir=self._dir.name)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _scheme(url: str) -> str:
    head = url[:12].lower()
    return head.split(":", 1)[0] if ":" in head else ""


def _decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(f"{param}: only base64 data URLs work (data:<mime>;base64,<payload>)", param=param)
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL's base64 payload is corrupt", param=param) from None


def local_path(url: str, policy: MediaPolicy, param: str) -> str:
    """The file a `file://` URL names, if `--media-dir` allows it."""
    if policy.media_dir is None:
        raise bad_request(
            f"{param}: file:// URLs are refused; start the server with --media-dir DIR to serve files from DIR",
            param=param,
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"{param}: file:// URLs must name a local path (file:///path)", param=param)
    raw = unquote(parsed.path)
    if ".." in Path(raw).parts:
        raise bad_request(f"{param}: '..' is not allowed in file:// paths", param=param)
    root = policy.media_dir.resolve()
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise bad_request(f"{param}: {raw} is outside the server's --media-dir", param=param)
    if not resolved.is_file():
        raise bad_request(f"{param}: no file {raw} in the server's --media-dir", param=param)
    return str(resolved)


async def fetch_remote(url: str, policy: MediaPolicy, param: str) -> bytes:
    """Download with the byte and time caps; any failure is the client's 400 (the URL is theirs)."""
    if not policy.allow_remote:
        raise bad_request(
            f"{param}: http(s) media URLs are refused; send a data: URL, or start the server with --allow-remote-media",
            param=param,
        )

    async def download() -> bytes:
        async with (
            httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=True, max_redirects=3) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise bad_request(f"{param}: fetching {url} gave HTTP {response.status_code}", param=param)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_large(url, policy, param)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > policy.max_bytes:
                    raise _too_large(url, policy, param)
            return bytes(data)

    try:
        return await asyncio.wait_for(download(), timeout=policy.timeout_s)
    except asyncio.TimeoutError:  # noqa: UP041 (the builtin TimeoutError is not this before Python 3.11)
        raise bad_request(f"{param}: fetching {url} took longer than {policy.timeout_s:g} s", param=param) from None
    except httpx.HTTPError as error:
        raise bad_request(f"{param}: cannot fetch {url}: {type(error).__name__}: {error}", param=param) from None


def _too_large(url: str, policy: MediaPolicy, param: str):
    return bad_request(f"{param}: {url} is larger than the server's cap of {policy.max_bytes} bytes", param=param)


async def _source(url: str, policy: MediaPolicy, param: str) -> tuple[str, Any]:
    """('bytes', data) or ('path', path) for a media URL."""
    scheme = _scheme(url)
    if scheme == "data":
        return "bytes", _decode_data_url(url, param)
    if scheme == "file":
        return "path", local_path(url, policy, param)
    if scheme in ("http", "https"):
        return "bytes", await fetch_remote(url, policy, param)
    raise bad_request(f"{param}: unsupported URL {url[:40]!r}; use a data:, file:// or http(s):// URL", param=param)


async def to_conversation(
    request: ChatCompletionRequest, policy: MediaPolicy, folder: MediaFolder
) -> list[dict[str, Any]]:
    """The request's messages in the transformers chat format `VLMPipeline` takes, media resolved."""
    video_defaults = dict((request.media_io_kwargs or {}).get("video", {}))
    conversation = []
    for m, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            conversation.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            param = f"messages.{m}.content.{p}"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                _, source = await _source(part.image_url.url, policy, f"{param}.image_url.url")
                parts.append({"type": "image", "image": source})
            elif isinstance(part, VideoPart):
                kind, source = await _source(part.video_url.url, policy, f"{param}.video_url.url")
                path = folder.write(source, ".video") if kind == "bytes" else source
                options = {k: v for k, v in video_defaults.items() if k in ("fps", "num_frames")}
                for key in ("fps", "num_frames"):
                    value = getattr(part.video_url, key)
                    if value is not None:
                        options = {key: value}  # a part's own choice replaces the request-wide one
                if len(options) > 1:
                    raise bad_request(f"{param}: give fps or num_frames, not both", param=f"{param}.video_url")
                parts.append({"type": "video", "path": path, **options})
        conversation.append({"role": role, "content": parts})
    return conversation
