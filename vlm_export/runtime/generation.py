"""The generation loop: vision -> embedding merge -> decoder prefill -> decode steps reusing the KV cache.

Backend-agnostic: the KV cache is allocated once per call on the backend's device, with room for the prompt and
every new token, and each decoder call updates it in place (the same buffer is its `past` input and its `present`
output); only the last-position logits are copied to the host each step. Mirrors transformers' `generate()`:
left padding, finished rows continue with the pad token, the attention mask grows by one column per step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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
    timings: dict[str, float] = field(default_factory=dict)


class Generator:
    def __init__(self, manifest: Manifest, sessions: dict[str, GraphSession], family: RuntimeFamily):
        self.manifest = manifest
        self.sessions = sessions
        self.family = family
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
    def _check_limits(self, prompts: list[list[int]]) -> None:
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

    # -- loop ---------------------------------------------------------------------------------------
    def steps(
        self, prompts: list[list[int]], visual: VisualBatch, settings: GenerationSettings
    ) -> Iterator[StepEvent | GenerationOutput]:
        """Yield a `StepEvent` per generated position, then the `GenerationOutput`."""
        self._check_limits(prompts)
        batch = len(prompts)
        longest = max(len(p) for p in prompts)
        pad_id = settings.resolved_pad_token_id
        if pad_id is None:
            pad_id = 0
        input_ids = np.full((batch, longest), pad_id, dtype=np.int64)
        attention_mask = np.zeros((batch, longest), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = prompt
            attention_mask[row, longest - len(prompt) :] = 1

        timings: dict[str, float] = {}
        start = time.perf_counter()
        vision_outputs = self._vision(input_ids, visual)
        visual_embeds = vision_outputs["visual_embeds"]
        timings["vision_s"] = time.perf_counter() - start

        max_new = settings.max_new_tokens
        limit = self.manifest.limits.max_seq_len
        if limit is not None:
            max_new = min(max_new, limit - longest)

        embedding, decoder = self.sessions["embedding"], self.sessions["decoder"]
        prefill_start = time.perf_counter()
        # Capacity for the prompt and every new token, no more: attention spans the whole cache.
        cache_shape = (batch, self.kv_heads, longest + max(max_new, 1), self.head_dim)
        cache = {name: decoder.allocate(name, cache_shape) for name in self.past_names}
        into = dict(zip(self.present_names, (cache[name] for name in self.past_names), strict=True))
        embeds = embedding.run({"input_ids": input_ids, "visual_embeds": visual_embeds})["inputs_embeds"]
        position_ids, state = self.family.prefill_positions(input_ids, attention_mask, visual)
        feeds: dict[str, Any] = {
            "inputs_embeds": embeds,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
        }
        feeds.update(self.family.decoder_feeds(input_ids, vision_outputs))
        feeds.update(cache)
        outputs = decoder.run(feeds, into=into)
        timings["prefill_s"] = time.perf_counter() - prefill_start
        timings["ttft_s"] = time.perf_counter() - start

        selector = TokenSelector(settings)
        eos = np.asarray(settings.eos_token_ids, dtype=np.int64)
        all_ids = input_ids
        finished = np.zeros(batch, dtype=bool)
        generated: list[np.ndarray] = []
        no_visual = np.zeros((0, self.hidden), dtype=self.dtype)
        decode_start = time.perf_counter()
        for step in range(max_new):
            logits = decoder.to_numpy(outputs["logits"])[:, -1, :].astype(np.float32, copy=False)
            tokens = selector.select(logits, all_ids, attention_mask).astype(np.int64)
            tokens = np.where(finished, pad_id, tokens)
            generated.append(tokens)
            all_ids = np.concatenate([all_ids, tokens[:, None]], axis=1)
            if eos.size:
                finished = finished | np.isin(tokens, eos)
            yield StepEvent(step=step, tokens=tokens, finished=finished.copy(), logits=logits)
            if finished.all() or step == max_new - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            embeds = embedding.run({"input_ids": tokens[:, None], "visual_embeds": no_visual})["inputs_embeds"]
            feeds = {
                "inputs_embeds": embeds,
                "position_ids": self.family.decode_positions(attention_mask, state, 1),
                "attention_mask": attention_mask,
            }
            feeds.update(self.family.decoder_feeds(tokens[:, None], None))
            feeds.update(cache)
            outputs = decoder.run(feeds, into=into)
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
