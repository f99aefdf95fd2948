"""`VLMPipeline`: load an exported folder and generate text from conversations in transformers' chat format."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlm_export.errors import InputError, ManifestError
from vlm_export.manifest import MANIFEST_NAME, Manifest
from vlm_export.runtime.backends import create_backend
from vlm_export.runtime.backends.base import GraphSession
from vlm_export.runtime.chat import render_chat
from vlm_export.runtime.families import MediaItem, runtime_family_for
from vlm_export.runtime.generation import GenerationOutput, Generator, StepEvent
from vlm_export.runtime.graph_forms import select_forms
from vlm_export.runtime.sampling import GenerationSettings
from vlm_export.runtime.template_sandbox import compile_chat_template
from vlm_export.runtime.tokenizer import StreamDecoder, TextTokenizer

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]
MEDIA_KEYS = {"image": ("image", "path", "url", "image_url"), "video": ("video", "path", "url")}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value) and bool(value)


def _media_items(conversation: Conversation) -> list[MediaItem]:
    items: list[MediaItem] = []
    for message in conversation:
        if not isinstance(message["role"], str):
            raise InputError(f"a message role must be a string like 'user', got {type(message['role']).__name__}")
        content = message.get("content")
        if isinstance(content, str):
            _check_text(content)
            continue
        if content is None:
            continue
        if not isinstance(content, list):
            raise InputError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        for part in content:
            if not isinstance(part, dict):
                raise InputError(f"content parts must be dicts like {{'type': 'text', 'text': ...}}, got {part!r}")
            kind = part.get("type")
            if kind in ("text", None) and "text" in part:
                _check_text(part["text"])
                continue
            if kind == "image_url":
                kind = "image"
            if kind not in MEDIA_KEYS:
                raise InputError(f"unsupported content type {kind!r}; use 'text', 'image' or 'video'")
            source = next((part[k] for k in MEDIA_KEYS[kind] if part.get(k) is not None), None)
            if isinstance(source, dict) and "url" in source:  # OpenAI-style {"image_url": {"url": ...}}
                source = source["url"]
            if source is None:
                raise InputError(f"{kind} part has none of the keys {', '.join(MEDIA_KEYS[kind])}: {part!r}")
            options = {k: v for k, v in part.items() if k not in ("type", *MEDIA_KEYS[kind])}
            items.append(MediaItem(kind=kind, source=source, options=options))
    return items


def _check_text(text: Any) -> None:
    """Text parts must be strings the tokenizer can encode (no lone surrogates, e.g. from undecodable bytes)."""
    if not isinstance(text, str):
        raise InputError(f"message text must be a string, got {type(text).__name__}: {repr(text)[:60]}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"message text is not valid Unicode (a lone surrogate at character {error.start}, e.g. from bytes "
            "that are not UTF-8); decode the text as UTF-8 first"
        ) from None


class LazySessions(Mapping[str, GraphSession]):
    """Graph sessions by name, each loaded by its loader on first access and kept. Loading is serialized, so
    concurrent first requests load a graph once."""

    def __init__(self, loaders: dict[str, Callable[[], GraphSession]]):
        self._loaders = loaders
        self._loaded: dict[str, GraphSession] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> GraphSession:
        session = self._loaded.get(name)
        if session is None:
            with self._lock:
                session = self._loaded.get(name)
                if session is None:
                    session = self._loaded[name] = self._loaders[name]()  # KeyError: no such graph
        return session

    def __contains__(self, name: object) -> bool:  # without loading it
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    @property
    def loaded(self) -> list[str]:
        """Names of the graphs loaded so far, in load order."""
        return list(self._loaded)


class VLMPipeline:
    """An exported model ready to generate. Build with `from_pretrained`."""

    def __init__(self, folder: Path, manifest: Manifest, backend_name: str, **backend_options: Any):
        self.folder = folder
        self.manifest = manifest
        self.backend = create_backend(backend_name, **backend_options)
        self.tokenizer = TextTokenizer(manifest.file_path(folder, "tokenizer"))
        self.chat_template = self._read_chat_template()
        self.generation_config = self._read_generation_config()
        # the file of each graph this backend's onnxruntime can load (the decoder has an opset 23 form for < 1.25)
        onnxruntime_version = getattr(self.backend, "onnxruntime_version", None)
        self.graph_forms = select_forms(manifest, onnxruntime_version)
        for name, info in manifest.graphs.items():
            form = self.graph_forms[name]
            manifest.graph_path(folder, name, form.file)  # inside the folder, with its external data: before loading
            if form.file != info.file:
                logger.info("%s: %s (opset %s) for onnxruntime %s", name, form.file, form.opset, onnxruntime_version)
        self.sessions = LazySessions({name: self._graph_loader(name) for name in manifest.graphs})
        try:  # family sections are checked by the family's own config classes; this catches what they leave
            self.family = runtime_family_for(manifest, folder)
            in_place = self.graph_forms["decoder"].in_place_cache
            self.generator = Generator(manifest, self.sessions, self.family, in_place_cache=in_place)
            self.token_text = {}
            for kind in ("image", "video"):
                text = self.tokenizer.id_to_token(self.family.placeholder_token(kind))
                if text is None:
                    raise ManifestError(f"the tokenizer has no {kind} placeholder token; re-export the model")
                self.token_text[kind] = text
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise ManifestError(
                f"{folder / MANIFEST_NAME} is malformed ({type(error).__name__}: {error}); re-export the model"
            ) from None
        # The decoder loads first: while ONNX Runtime pre-packs a weight it briefly holds it twice, and with the
        # vision encoder already loaded that moment was the process's peak memory.
        # The vision encoder loads on the first request with an image or video: text-only use never holds it.
        for name in ("decoder", "embedding"):
            self.sessions[name]  # loads it now

    @classmethod
    def from_pretrained(cls, folder: str | Path, backend: str = "ort-cpu", **backend_options: Any) -> VLMPipeline:
        folder = Path(folder).expanduser()
        manifest = Manifest.load(folder)
        return cls(folder, manifest, backend, **backend_options)

    def _graph_loader(self, name: str) -> Callable[[], GraphSession]:
        def load() -> GraphSession:  # the path is checked again when it is read (the folder may have changed)
            form = self.graph_forms[name]
            path = self.manifest.graph_path(self.folder, name, form.file)
            return self.backend.load(path, replace(self.manifest.graphs[name], file=form.file))

        return load

    def _read_chat_template(self) -> str:
        path = self.manifest.file_path(self.folder, "chat_template")
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ManifestError(f"cannot read the chat template {path} ({error}); re-export the model") from None
        compile_chat_template(template)  # refuses a template that cannot render, before any request
        return template

    def _read_generation_config(self) -> dict[str, Any]:
        path = self.manifest.file_path(self.folder, "generation_config", required=False)
        if path is None:
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise ManifestError(f"{path} is not valid JSON ({error}); re-export the model") from None
        if not isinstance(config, dict):
            raise ManifestError(f"{path} must hold a JSON object; re-export the model")
        try:
            GenerationSettings.from_generation_config(config)
        except InputError as error:
            raise ManifestError(f"{path}: {error}; fix the file or re-export the model") from None
        return config

    # -- request preparation ------------------------------------------------------------------------
    def settings(self, **overrides: Any) -> GenerationSettings:
        """Generation settings: the model's generation_config.json, then the given overrides (None = unset)."""
        return GenerationSettings.from_generation_config(self.generation_config, **overrides)

    def prepare(self, conversations: Sequence[Conversation]):
        """Template, media preprocessing, placeholder expansion and tokenization for a batch."""
        items_per_conversation = [_media_items(c) for c in conversations]
        all_items = [item for items in items_per_conversation for item in items]
        visual = self.family.encode_media(all_items, [len(items) for items in items_per_conversation])
        prompts: list[list[int]] = []
        offset = 0
        for conversation, items in zip(conversations, items_per_conversation, strict=True):
            text = render_chat(self.chat_template, conversation, add_generation_prompt=True)
            text = self.family.expand_placeholders(text, items, visual, offset, self.token_text)
            offset += len(items)
            prompts.append(self.tokenizer.encode(text))
        return prompts, visual

    @staticmethod
    def _as_batch(messages_or_batch: Any) -> tuple[list[Conversation], bool]:
        if _is_conversation(messages_or_batch):
            return [messages_or_batch], False
        if (
            isinstance(messages_or_batch, list)
            and messages_or_batch
            and all(_is_conversation(c) for c in messages_or_batch)
        ):
            return list(messages_or_batch), True
        raise InputError(
            "expected a conversation (a list of {'role': ..., 'content': ...} messages) or a list of conversations"
        )

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self, messages_or_batch: Conversation | list[Conversation], **settings: Any
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one conversation (returns a result) or a batch (returns a list of results).

        Keyword settings (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed) override
        the model's generation_config.json, as in transformers.
        """
        conversations, is_batch = self._as_batch(messages_or_batch)
        output: GenerationOutput | None = None
        for event in self._events(conversations, settings):
            if isinstance(event, GenerationOutput):
                output = event
        assert output is not None
        results = [
            GenerationResult(
                text=self.tokenizer.decode(ids),
                token_ids=ids,
                prompt_tokens=prompt,
                finish_reason=reason,
                timings=output.timings,
            )
            for ids, prompt, reason in zip(output.token_ids, output.prompt_tokens, output.finish_reasons, strict=True)
        ]
        return results if is_batch else results[0]

    def stream(self, messages: Conversation, **settings: Any) -> Iterator[str]:
        """Text pieces of one conversation's answer as they are generated."""
        conversations, is_batch = self._as_batch(messages)
        if is_batch:
            raise InputError("stream() takes one conversation; use generate() for batches")
        decoder = StreamDecoder(self.tokenizer)
        eos = set(self.settings(**settings).eos_token_ids)
        for event in self._events(conversations, settings):
            if isinstance(event, StepEvent):
                token = int(event.tokens[0])
                if token in eos:
                    continue
                piece = decoder.push(token)
                if piece:
                    yield piece

    def _events(self, conversations: list[Conversation], settings: dict[str, Any]):
        resolved = self.settings(**settings)
        prompts, visual = self.prepare(conversations)
        yield from self.generator.steps(prompts, visual, resolved)
