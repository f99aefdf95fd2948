"""The generation loop: vision -> embedding merge -> decoder prefill -> decode steps reusing the KV cache.

Backend-agnostic: the KV cache is allocated per call on the backend's device, with room for the prompt and the
first new tokens (doubled when full), and each decoder call updates it in place (the same buffer is its `past`
input and its `present` output) — or, with the decoder form older onnxruntime releases load (no `TensorScatter`,
runtime/graph_forms.py), returns it as new `present` buffers that the next call takes as `past`; only the
last-position logits are copied to the host each step. Mirrors
transformers' `generate()`: left padding, finished rows continue with the pad token, the attention mask grows by
one column per step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_export.errors import InputError
from vlm_export.manifest import Manifest
from vlm_export.runtime.backends.base import GraphSession
from vlm_export.runtime.families import RuntimeFamily, VisualBatch
from vlm_export.runtime.sampling import GenerationSettings, TokenSelector

_NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class StepEvent:
    """One decode step: the token chosen for each row (pad for rows already finished)."""

    step: int
    tokens: np.ndarray
    finished: np.ndarray
    logits: np.ndarray  # raw last-position logits [B, V] this step's tokens were chosen from


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # generated ids per row, up to and including the stop token
    finish_reasons: list[str]  # "stop" (EOS) or "length"
    prompt_tokens: list[int]
    # load_s (graphs loaded by this request: the vision encoder on the first one with media), vision_s, prefill_s,
    # ttft_s (from the start, load included), decode_s, decode_tokens_per_s
    timings: dict[str, float] = field(default_factory=dict)


class Generator:
    def __init__(
        self,
        manifest: Manifest,
        sessions: Mapping[str, GraphSession],
        family: RuntimeFamily,
        *,
        in_place_cache: bool = True,
    ):
        self.manifest = manifest
        self.sessions = sessions
        self.family = family
        # whether the loaded decoder form writes `present` into the `past` buffers (GraphForm.in_place_cache)
        self.in_place_cache = in_place_cache
        text = manifest.text
        self.num_layers = int(text["num_layers"])
        self.kv_heads = int(text["num_kv_heads"])
        self.head_dim = int(text["head_dim"])
        self.hidden = int(text["hidden_size"])
        self.dtype = _NUMPY_TYPES[manifest.dtype]
        decoder = manifest.graphs["decoder"]
        self.past_names = [n for n in decoder.input_names() if n.startswith("past_key_values.")]
        self.present_names = [n for n in decoder.output_names() if n.startswith("present.")]

    # -- checks -------------------------------------------------------------------------------------
    def check_limits(self, prompts: list[list[int]]) -> None:
        limits = self.manifest.limits
        if limits.max_batch is not None and len(prompts) > limits.max_batch:
            raise InputError(
                f"batch of {len(prompts)} exceeds this export's limit of {limits.max_batch}; split the batch or "
                "re-export with a larger --max-batch"
            )
        longest = max(len(p) for p in prompts)
        if limits.max_seq_len is not None and longest >= limits.max_seq_len:
            raise InputError(
                f"prompt of {longest} tokens exceeds this export's limit of {limits.max_seq_len} tokens "
                "(prompt + generated); shorten the prompt, use smaller images, or re-export with a larger "
                "--max-seq-len"
            )

    def _visual_embeds(self, input_ids: np.ndarray, visual: VisualBatch) -> np.ndarray:
        return self._vision(input_ids, visual)["visual_embeds"]

    def _vision(self, input_ids: np.ndarray, visual: VisualBatch) -> dict[str, np.ndarray]:
        """All vision-graph outputs (`visual_embeds` first; families may add more, e.g. DeepStack features)."""
        placeholders = [self.family.placeholder_token(kind) for kind in ("image", "video")]
        needed = int(np.isin(input_ids, placeholders).sum())
        if visual.empty:
            outputs = {"visual_embeds": np.zeros((0, self.hidden), dtype=self.dtype)}
        else:
            session = self.sessions["vision_encoder"]
            raw = session.run(self._conform(session, visual.feeds))
            outputs = {name: session.to_numpy(value) for name, value in raw.items()}
            outputs = self.family.postprocess_vision(outputs, visual)
        embeds = outputs["visual_embeds"]
        if embeds.shape[0] != needed:
            raise InputError(
                f"the prompt has {needed} visual placeholder tokens but the media produced {embeds.shape[0]} "
                "embeddings; do not write placeholder tokens such as <|image_pad|> in the text yourself"
            )
        return outputs

    @staticmethod
    def _conform(session: GraphSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host-made float arrays (pixels) in the graph's declared float type (float16 exports)."""
        declared = {t.name: t.dtype for t in session.info.inputs}
        out = {}
        for name, value in feeds.items():
            want = _NUMPY_TYPES.get(declared.get(name, ""))
            out[name] = value.astype(want) if want is not None and value.dtype != want else value
        return out

    def max_new_tokens(self, requested: int, prompt_length: int) -> int:
        """`requested` new tokens, capped by what the export's sequence limit leaves after the prompt."""
        limit = self.manifest.limits.max_seq_len
        return requested if limit is None else min(requested, limit - prompt_length)

    def prefill(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        visual: VisualBatch,
        max_new: int,
        timings: dict[str, float],
    ) -> CachedDecoding:
        """Vision encoder, embedding merge and decoder prefill of left-padded prompts: the decoding whose
        `logits()` give the first new token. Adds load_s, vision_s and prefill_s to `timings`."""
        start = time.perf_counter()
        if not visual.empty:
            # The vision encoder loads on the first request with media (seconds): reported apart from its run.
            self.sessions["vision_encoder"]
        timings["load_s"] = time.perf_counter() - start
        vision_start = time.perf_counter()
        vision_outputs = self._vision(input_ids, visual)
        timings["vision_s"] = time.perf_counter() - vision_start
        prefill_start = time.perf_counter()
        decoding = CachedDecoding(self, input_ids, attention_mask, visual, vision_outputs, max_new)
        timings["prefill_s"] = time.perf_counter() - prefill_start
        return decoding

    # -- loop ---------------------------------------------------------------------------------------
    def steps(
        self, prompts: list[list[int]], visual: VisualBatch, settings: GenerationSettings
    ) -> Iterator[StepEvent | GenerationOutput]:
        """Yield a `StepEvent` per generated position, then the `GenerationOutput`."""
        self.check_limits(prompts)
        batch = len(prompts)
        longest = max(len(p) for p in prompts)
        pad_id = settings.resolved_pad_token_id
        if pad_id is None:
            pad_id = 0
        input_ids, attention_mask = left_pad(prompts, pad_id)

        timings: dict[str, float] = {}
        start = time.perf_counter()
        max_new = self.max_new_tokens(settings.max_new_tokens, longest)
        decoding = self.prefill(input_ids, attention_mask, visual, max_new, timings)
        timings["ttft_s"] = time.perf_counter() - start

        selector = TokenSelector(settings)
        eos = np.asarray(settings.eos_token_ids, dtype=np.int64)
        all_ids = input_ids
        finished = np.zeros(batch, dtype=bool)
        generated: list[np.ndarray] = []
        decode_start = time.perf_counter()
        for step in range(max_new):
            logits = decoding.logits()
            tokens = selector.select(logits, all_ids, decoding.attention_mask).astype(np.int64)
            tokens = np.where(finished, pad_id, tokens)
            generated.append(tokens)
            all_ids = np.concatenate([all_ids, tokens[:, None]], axis=1)
            if eos.size:
                finished = finished | np.isin(tokens, eos)
            yield StepEvent(step=step, tokens=tokens, finished=finished.copy(), logits=logits)
            if finished.all() or step == max_new - 1:
                break
            decoding.advance(tokens)
        decode_s = time.perf_counter() - decode_start
        timings["decode_s"] = decode_s
        steps_done = max(len(generated) - 1, 0)
        timings["decode_tokens_per_s"] = steps_done * batch / decode_s if decode_s > 0 and steps_done else 0.0

        rows = np.stack(generated, axis=1) if generated else np.zeros((batch, 0), dtype=np.int64)
        token_ids, reasons = [], []
        for row in rows:
            hits = np.flatnonzero(np.isin(row, eos)) if eos.size else np.array([], dtype=np.int64)
            if hits.size:
                token_ids.append(row[: hits[0] + 1].tolist())
                reasons.append("stop")
            else:
                token_ids.append(row.tolist())
                reasons.append("length")
        yield GenerationOutput(
            token_ids=token_ids,
            finish_reasons=reasons,
            prompt_tokens=[len(p) for p in prompts],
            timings=timings,
        )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one left-padded [B, longest] id matrix and its attention mask, as transformers batches them."""
    longest = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = prompt
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def forced_logits(
    generator: Generator, prompts: list[list[int]], visual: VisualBatch, forced: np.ndarray
) -> np.ndarray:
    """Last-position logits [B, T, V] at each of T steps when the tokens ``forced`` [B, T] are fed in.

    The same prefill / decode feeds as `Generator.steps` (family hooks for positions and extra decoder inputs),
    with the token choice replaced by ``forced``: logits[:, t] predict forced[:, t]. Teacher forcing for the
    exporter's agreement check and for `vlm-run verify`.
    """
    steps = forced.shape[1]
    input_ids, attention_mask = left_pad(prompts, pad_id=0)
    vision_outputs = generator._vision(input_ids, visual)
    decoding = CachedDecoding(generator, input_ids, attention_mask, visual, vision_outputs, steps)
    collected = []
    for step in range(steps):
        collected.append(decoding.logits())
        if step < steps - 1:
            decoding.advance(forced[:, step])
    return np.stack(collected, axis=1)


class CachedDecoding:
    """One request's decoder state: the prefill at construction, then one `advance` per chosen token.

    Every decoder call updates the KV cache in place: each cache buffer is both the `past` input and, through
    `into`, the `present` output. Attention spans the cache's whole capacity (ONNX Runtime's CPU kernel costs
    the same whatever the valid length), so the capacity follows the request. The prefill runs on a cache of
    exactly the prompt's length: room there would only be attended over and masked away (~4% of a 64-token
    int4 prefill). The first decode step grows it (one copy) to the prompt plus room for `INITIAL_ROOM` new
    tokens, and the room doubles each time it fills, never past prompt + `max_new`. A request asking for
    thousands of tokens that stops at EOS after a hundred neither allocates nor attends over the rest. Shared by
    `Generator.steps` and the exporter's teacher-forced agreement check, so both run exactly the same feeds.

    With a decoder form that cannot update in place (`generator.in_place_cache` False: opset 23, for onnxruntime
    < 1.25), nothing is bound to the outputs: each call returns the whole cache as new `present` buffers, which
    become the next call's `past` (and are what `grow` enlarges). Same capacities, same feeds, same logits.
    """

    INITIAL_ROOM = 256

    def __init__(
        self,
        generator: Generator,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        visual: VisualBatch,
        vision_outputs: dict[str, np.ndarray],
        max_new: int,
    ):
        self.generator = generator
        self.embedding, self.decoder = generator.sessions["embedding"], generator.sessions["decoder"]
        batch, longest = input_ids.shape
        self.prompt_length, self.max_new = longest, max(max_new, 1)
        self.capacity = longest
        shape = self._cache_shape(batch)
        self.cache = {name: self.decoder.allocate(name, shape) for name in generator.past_names}
        self._bind_cache()
        self.no_visual = np.zeros((0, generator.hidden), dtype=generator.dtype)
        embeds = self.embedding.run({"input_ids": input_ids, "visual_embeds": vision_outputs["visual_embeds"]})
        position_ids, self.state = generator.family.prefill_positions(input_ids, attention_mask, visual)
        self.attention_mask = attention_mask
        feeds: dict[str, Any] = {
            "inputs_embeds": embeds["inputs_embeds"],
            "position_ids": position_ids,
            "attention_mask": attention_mask,
        }
        feeds.update(generator.family.decoder_feeds(input_ids, vision_outputs))
        self._run(feeds)

    @classmethod
    def resume(
        cls,
        generator: Generator,
        cache: dict[str, Any],
        attention_mask: np.ndarray,
        state: Any,
        capacity: int,
        max_new: int,
    ) -> CachedDecoding:
        """A decoding assembled from parts instead of a prefill (sequences that joined or left a running batch):
        `cache` holds the `past` buffers (capacity `capacity`, the first `attention_mask.shape[1]` positions
        filled), `state` the family's decode state for these rows, `max_new` the most tokens any row still needs.
        Call `advance` next; `logits()` is only valid after it."""
        self = cls.__new__(cls)
        self.generator = generator
        self.embedding, self.decoder = generator.sessions["embedding"], generator.sessions["decoder"]
        self.prompt_length, self.max_new = attention_mask.shape[1], max(max_new, 1)
        self.capacity = capacity
        self.cache = dict(cache)
        self._bind_cache()
        self.no_visual = np.zeros((0, generator.hidden), dtype=generator.dtype)
        self.attention_mask = attention_mask
        self.state = state
        self.outputs = {}
        return self

    def _cache_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.generator.kv_heads, self.capacity, self.generator.head_dim)

    def _make_room(self, batch: int) -> None:
        """Make room for INITIAL_ROOM new tokens, or double it (up to max_new), once the next position would not
        fit."""
        if self.attention_mask.shape[1] <= self.capacity:
            return
        room = self.capacity - self.prompt_length
        self.capacity = self.prompt_length + min(max(2 * room, self.INITIAL_ROOM), self.max_new)
        shape = self._cache_shape(batch)
        self.cache = {name: self.decoder.grow(buffer, shape) for name, buffer in self.cache.items()}
        self._bind_cache()

    def _bind_cache(self) -> None:
        """Bind the cache buffers as the `present` outputs (in place), or nothing (new `present` buffers)."""
        in_place = self.generator.in_place_cache
        self.into = dict(zip(self.generator.present_names, self.cache.values(), strict=True)) if in_place else {}

    def _run(self, feeds: dict[str, Any]) -> None:
        feeds.update(self.cache)
        self.outputs = self.decoder.run(feeds, into=self.into)
        if not self.generator.in_place_cache:
            pairs = zip(self.generator.past_names, self.generator.present_names, strict=True)
            self.cache = {past: self.outputs[present] for past, present in pairs}

    def logits(self) -> np.ndarray:
        """Float32 logits [B, V] of the last position fed."""
        return self.decoder.to_numpy(self.outputs["logits"])[:, -1, :].astype(np.float32, copy=False)

    def advance(self, tokens: np.ndarray) -> None:
        """Feed one token per row ([B] int64): the cache grows by one position."""
        batch = tokens.shape[0]
        tokens = tokens.reshape(batch, 1).astype(np.int64, copy=False)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        self._make_room(batch)
        family = self.generator.family
        embeds = self.embedding.run({"input_ids": tokens, "visual_embeds": self.no_visual})["inputs_embeds"]
        feeds: dict[str, Any] = {
            "inputs_embeds": embeds,
            "position_ids": family.decode_positions(self.attention_mask, self.state, 1),
            "attention_mask": self.attention_mask,
        }
        feeds.update(family.decoder_feeds(tokens, None))
        self._run(feeds)
