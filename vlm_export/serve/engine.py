"""One inference thread running a continuous batch; requests reach it through a bounded queue.

Everything that touches the graphs (vision encoder, prefill, decode steps) runs in this thread, so the event loop
never waits on inference and backends never see two callers at once. Between decode steps the thread admits
waiting requests (each is prefilled alone and joins the batch: `runtime.batching.ContinuousBatch`), drops the
ones whose client went away, then steps every sequence by one token. Text, stop strings and logprobs are worked
out here too and handed to the request's asyncio queue as `Event`s (`loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vlm_export.errors import InputError, VLMExportError
from vlm_export.runtime.batching import ContinuousBatch, SequenceStep
from vlm_export.runtime.families import VisualBatch
from vlm_export.runtime.pipeline import VLMPipeline
from vlm_export.runtime.sampling import GenerationSettings, token_logprobs
from vlm_export.runtime.text_stream import SequenceText
from vlm_export.serve.errors import APIError, bad_request, unavailable
from vlm_export.serve.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request learns after one step: text to send, the logprobs that go with it, and whether it ended."""

    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" (or "cancelled", never sent to a client)
    completion_tokens: int = 0
    error: APIError | None = None


class Job:
    """A request between the route and the engine thread."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        visual: VisualBatch,
        settings: GenerationSettings,
        text: SequenceText,
        *,
        top_logprobs: int | None,
        loop: asyncio.AbstractEventLoop,
        arrived: float,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.visual: VisualBatch | None = visual
        self.settings = settings
        self.text = text
        self.top_logprobs = top_logprobs  # None: no logprobs; 0..20: that many alternatives per token
        self.loop = loop
        self.arrived = arrived
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.last_token_at: float | None = None
        self.pending_logprobs: list[dict[str, Any]] = []
        self.eos = frozenset(settings.eos_token_ids)

    def cancel(self) -> None:
        """The client is gone: the engine drops the request before its next step (no-op once finished)."""
        self.cancelled = True

    def post(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed (server shutting down)
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Owns the pipeline's graphs: admits queued jobs into a `ContinuousBatch` and steps it."""

    def __init__(self, pipe: VLMPipeline, *, max_batch: int, max_queue: int, metrics: Metrics):
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.batch = ContinuousBatch(pipe.generator, max_batch)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlm-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise unavailable("the server is shutting down", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise unavailable(
                    f"the server is busy ({len(self._waiting)} requests waiting, --max-queue {self.max_queue}); "
                    "retry shortly",
                    code="queue_full",
                )
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not len(self.batch) and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._waiting and not len(self.batch):
                    return
            self._drop_cancelled()
            self._admit()
            if not len(self.batch):
                continue
            self.metrics.running.set(len(self.batch))
            self.metrics.batch_size.observe(len(self.batch))
            try:
                steps = self.batch.step()
            except Exception as error:  # a backend failure: every running request gets a 500
                self._fail_batch(error)
                continue
            for step in steps:
                self._emit(step)
            self.metrics.running.set(len(self.batch))

    def _next_job(self) -> Job | None:
        with self._wake:
            job = self._waiting.popleft() if self._waiting else None
            self.metrics.queue_depth.set(len(self._waiting))
        return job

    def _admit(self) -> None:
        while len(self.batch) < self.max_batch:
            job = self._next_job()
            if job is None:
                return
            if job.cancelled:
                self._finish(job, "cancelled", 0)
                continue
            visual, job.visual = job.visual, None
            assert visual is not None
            try:
                step = self.batch.add(job.prompt, visual, job.settings, tag=job)
            except InputError as error:
                job.post(Event(error=bad_request(str(error), param="messages")))
                self.metrics.requests.labels("error").inc()
                continue
            except Exception as error:
                logger.exception("request %s failed in its prefill", job.request_id)
                message = str(error) if isinstance(error, VLMExportError) else "internal error in the prefill"
                job.post(Event(error=APIError(500, f"{message} (request id {job.request_id})")))
                self.metrics.requests.labels("error").inc()
                continue
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self._emit(step)

    def _drop_cancelled(self) -> None:
        for sequence in self.batch.sequences:
            job: Job = sequence.tag
            if job.cancelled:
                sequence.finish("cancelled")
                self._finish(job, "cancelled", len(sequence.generated))

    def _fail_batch(self, error: Exception) -> None:
        logger.error("decode step failed: %s", error, exc_info=True)
        for sequence in self.batch.sequences:
            job = sequence.tag
            job.post(Event(error=APIError(500, f"the decode step failed (request id {job.request_id})")))
            self.metrics.requests.labels("error").inc()
        self.batch = ContinuousBatch(self.pipe.generator, self.max_batch)

    def _emit(self, step: SequenceStep) -> None:
        sequence, job = step.sequence, step.sequence.tag
        now = time.perf_counter()
        if job.last_token_at is None:
            self.metrics.ttft.observe(now - job.arrived)
        else:
            self.metrics.inter_token.observe(now - job.last_token_at)
        job.last_token_at = now
        self.metrics.generation_tokens.inc()

        text, released = "", 0
        if step.token not in job.eos:
            if job.top_logprobs is not None:
                job.pending_logprobs.append(self._logprob_entry(step, job.top_logprobs))
            delta = job.text.push(step.token)
            text, released = delta.text, delta.tokens
            if delta.stopped:
                sequence.finish("stop")
        if sequence.finished and not job.text.stopped:
            tail = job.text.finish()
            text, released = text + tail.text, released + tail.tokens
        entries, job.pending_logprobs = job.pending_logprobs[:released], job.pending_logprobs[released:]
        if sequence.finished:
            self._finish(job, sequence.finish_reason or "stop", len(sequence.generated), text, entries)
        elif text or entries:
            job.post(Event(text=text, logprobs=entries))

    def _finish(self, job: Job, reason: str, tokens: int, text: str = "", entries: list | None = None) -> None:
        job.post(Event(text=text, logprobs=entries or [], finish_reason=reason, completion_tokens=tokens))
        self.metrics.requests.labels(reason).inc()
        self.metrics.latency.observe(time.perf_counter() - job.arrived)

    def _logprob_entry(self, step: SequenceStep, top_n: int) -> dict[str, Any]:
        chosen, top_ids, top = token_logprobs(step.logits[None, :], [step.token], top_n)
        return {
            **self._token(step.token),
            "logprob": float(chosen[0]),
            "top_logprobs": [
                {**self._token(int(i)), "logprob": float(v)} for i, v in zip(top_ids[0], top[0], strict=True)
            ],
        }

    def _token(self, token_id: int) -> dict[str, Any]:
        data = self.pipe.tokenizer.token_bytes(token_id)
        return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}
