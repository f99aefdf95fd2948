"""The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `/health`, `/metrics`, `/version`.

The model loads in a background thread when the app starts, so `/health` answers 503 (with `Retry-After`) until
it is ready, as load balancers and Kubernetes readiness probes expect. Media are resolved and preprocessed
(decode, resize, tokenize) in a small thread pool; inference runs in the engine thread (`engine.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vlm_export.errors import VLMExportError
from vlm_export.runtime.pipeline import VLMPipeline
from vlm_export.runtime.text_stream import SequenceText
from vlm_export.serve import schemas
from vlm_export.serve.engine import Engine, Event, Job
from vlm_export.serve.errors import APIError, bad_request, error_body, install_error_handlers, unavailable
from vlm_export.serve.media import MediaFolder, MediaPolicy, to_conversation
from vlm_export.serve.metrics import Metrics

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024  # when the export records no sequence limit to fill


@dataclass
class ServeConfig:
    """Everything `vlm-serve`'s flags choose (also what a Ray Serve replica is built from)."""

    model: Path
    backend: str = "ort-cpu"
    backend_options: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    media: MediaPolicy = field(default_factory=MediaPolicy)
    preprocess_threads: int = 2

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


class ServerState:
    """The app's model, engine and flags; the model loads in `load()` (a background thread)."""

    def __init__(self, config: ServeConfig, pipe: VLMPipeline | None = None):
        self.config = config
        self.metrics = Metrics()
        self.pipe = pipe
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.draining = False
        self.created = schemas.now()
        self.preprocess = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="vlm-serve-media")
        self.on_load_failure: Callable[[], None] | None = None

    def load(self) -> None:
        try:
            if self.pipe is None:
                options = self.config.backend_options
                self.pipe = VLMPipeline.from_pretrained(self.config.model, backend=self.config.backend, **options)
            limit = self.pipe.manifest.limits.max_batch
            if limit is not None and self.config.max_batch > limit:
                raise VLMExportError(
                    f"--max-batch {self.config.max_batch} exceeds this export's limit of {limit}; use at most {limit}"
                )
            engine = Engine(
                self.pipe, max_batch=self.config.max_batch, max_queue=self.config.max_queue, metrics=self.metrics
            )
            engine.start()
            self.engine = engine
            logger.info(
                "model %s loaded (%s); serving as %r", self.config.model, self.pipe.manifest.family, self.model_name
            )
        except Exception as error:
            self.load_error = str(error) if isinstance(error, VLMExportError) else repr(error)
            logger.error("cannot load the model: %s", self.load_error, exc_info=not isinstance(error, VLMExportError))
            if self.on_load_failure is not None:
                self.on_load_failure()

    def close(self) -> None:
        self.draining = True
        if self.engine is not None:
            self.engine.close(timeout=30)
        self.preprocess.shutdown(wait=False, cancel_futures=True)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def ready_engine(self) -> Engine:
        if self.draining:
            raise unavailable("the server is shutting down", code="shutting_down")
        if self.load_error is not None:
            raise unavailable(f"the model failed to load: {self.load_error}", code="model_failed", retry_after=60)
        if self.engine is None:
            raise unavailable("the model is still loading", code="model_loading", retry_after=5)
        return self.engine


class BodyLimit:
    """413 for request bodies over the cap (declared or streamed), before anything reads them whole."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(self._body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, self._body()["error"]["message"], code="request_too_large")
            return message

        await self.app(scope, limited, send)

    def _body(self) -> dict:
        message = f"request body larger than the server's cap of {self.max_bytes} bytes (--max-body-mb)"
        return error_body(413, message, code="request_too_large")


def create_app(config: ServeConfig, pipe: VLMPipeline | None = None) -> FastAPI:
    """The app; `pipe` skips loading (tests, or a caller that built the pipeline already)."""
    state = ServerState(config, pipe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="vlm-serve-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="vlm-serve", version=_version(), lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        state.ready_engine()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> dict:
        limits = state.pipe.manifest.limits if state.pipe is not None else None
        return schemas.model_card(
            state.model_name, state.created, limits.max_seq_len if limits else None, ["text", "image", "video"]
        )

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise _unknown_model(model_id, state.model_name)
        return card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        request.state.request_id = request_id
        engine = state.ready_engine()
        if body.model != state.model_name:
            raise _unknown_model(body.model, state.model_name)
        refused = body.refused_fields()
        if refused is not None:
            raise bad_request(refused[1], param=refused[0])
        if body.model_extra:
            logger.warning("request %s: ignoring unknown fields %s", request_id, sorted(body.model_extra))
        job = await _prepare(state, engine, body, request_id, arrived)
        engine.submit(job)
        created = schemas.now()
        if body.stream:
            first = await job.events.get()
            if first.error is not None:
                raise first.error
            events = _sse(job, first, body, request_id, state.model_name, created)
            return StreamingResponse(events, media_type="text/event-stream", headers={"X-Request-Id": request_id})
        return await _complete(job, body, request, request_id, state.model_name, created)

    return app


def _unknown_model(asked: str, served: str) -> APIError:
    message = f"the model {asked!r} does not exist; this server serves {served!r}"
    return APIError(404, message, param="model", code="model_not_found")


async def _prepare(
    state: ServerState, engine: Engine, body: schemas.ChatCompletionRequest, request_id: str, arrived: float
) -> Job:
    """Media, chat template, preprocessing and tokenization (thread pool), then the request's settings."""
    pipe = engine.pipe
    folder = MediaFolder()
    loop = asyncio.get_running_loop()
    try:
        conversation = await to_conversation(body, state.config.media, folder)
        prompts, visual = await loop.run_in_executor(state.preprocess, pipe.prepare, [conversation])
    except VLMExportError as error:
        raise bad_request(str(error), param="messages") from None
    finally:
        folder.close()
    prompt = prompts[0]
    limit = pipe.manifest.limits.max_seq_len
    if limit is not None and len(prompt) >= limit:
        raise bad_request(
            f"the prompt is {len(prompt)} tokens (images and videos included) and this model's limit is {limit} "
            "tokens; shorten the conversation or send smaller images",
            param="messages",
            code="context_length_exceeded",
        )
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and limit is not None and len(prompt) + asked > limit:
        raise bad_request(
            f"this model's limit is {limit} tokens, but {len(prompt)} prompt tokens plus max_tokens {asked} exceed "
            "it; ask for fewer tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_new = asked or (limit - len(prompt) if limit is not None else DEFAULT_MAX_TOKENS)
    overrides: dict[str, Any] = {"max_new_tokens": max_new}
    if body.temperature is not None:
        sampling = {"do_sample": True, "temperature": body.temperature}
        overrides.update({"do_sample": False} if body.temperature == 0 else sampling)
    for name in ("top_p", "min_p", "repetition_penalty", "seed"):
        if getattr(body, name) is not None:
            overrides[name] = getattr(body, name)
    if body.top_k is not None:
        overrides["top_k"] = max(body.top_k, 0)
    try:
        settings = pipe.settings(**overrides)
        text = SequenceText(pipe.tokenizer, body.stops)
    except VLMExportError as error:
        raise bad_request(str(error)) from None
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Job(
        request_id,
        prompt,
        visual,
        settings,
        text,
        top_logprobs=top_logprobs,
        loop=asyncio.get_running_loop(),
        arrived=arrived,
    )


def _data(payload: dict | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _sse(
    job: Job, first: Event, body: schemas.ChatCompletionRequest, request_id: str, model: str, created: int
) -> AsyncIterator[str]:
    usage_on = body.include_usage
    logprobs_on = job.top_logprobs is not None

    def chunk(delta: dict | None, **kwargs: Any) -> str:
        return _data(schemas.chunk(request_id, model, created, delta, include_usage=usage_on, **kwargs))

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            if event.error is not None:
                yield _data(event.error.body())
                break
            if event.text or event.logprobs:
                yield chunk({"content": event.text}, logprobs=event.logprobs if logprobs_on else None)
            if event.finish_reason is not None:
                yield chunk({}, finish_reason=event.finish_reason)
                if usage_on:
                    usage = schemas.usage(len(job.prompt), event.completion_tokens)
                    yield chunk(None, usage_value=usage)
                break
            event = await job.events.get()
        yield _data("[DONE]")
    finally:
        job.cancel()  # a client that left mid-stream frees its batch row at the next step


async def _complete(
    job: Job, body: schemas.ChatCompletionRequest, request: Request, request_id: str, model: str, created: int
) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, job))
    texts: list[str] = []
    entries: list[dict] = []
    try:
        while True:
            event = await job.events.get()
            if event.error is not None:
                raise event.error
            texts.append(event.text)
            entries += event.logprobs
            if event.finish_reason is not None:
                break
    finally:
        watcher.cancel()
        job.cancel()
    logprobs = entries if job.top_logprobs is not None else None
    reason, tokens = event.finish_reason, event.completion_tokens
    result = schemas.completion(request_id, model, created, "".join(texts), reason, len(job.prompt), tokens, logprobs)
    return JSONResponse(result, headers={"X-Request-Id": request_id})


async def _cancel_on_disconnect(receive: Callable[[], Awaitable[dict]], job: Job) -> None:
    """After the body, the next ASGI message is the client's disconnect: cancel the job when it comes."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _version() -> str:
    try:
        return metadata.version("vlm-export")
    except metadata.PackageNotFoundError:
        return "0+unknown"
