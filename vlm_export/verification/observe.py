"""Our runtime on a case, observed at the same stages as transformers (torch-free).

The pipeline's own steps run: `prepare` (template, preprocessing, placeholders, tokenization), the family's
prefill positions, the vision graph with the family's host-side post-processing, the embedding merge, and
`Generator.steps` for greedy decoding. Teacher-forced logits (transformers' tokens fed in) come from the decoding
state the generation loop itself uses (`runtime.generation.forced_logits`, shared with `exporter.agreement`), so
`vlm-run verify` imports nothing from the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.runtime.generation import GenerationOutput, StepEvent, forced_logits, left_pad
from vlm_export.verification.golden import Conversation


@dataclass
class Observation:
    prompt_ids: list[list[int]]
    pixels: np.ndarray | None  # the vision graph's pixel input (None without media)
    positions: np.ndarray
    attention_mask: np.ndarray  # [B, L] of the left-padded prompts
    vision: np.ndarray | None  # merged embeddings at placeholder positions, prompt order
    text: np.ndarray  # merged embeddings at text positions
    placement_diff: float  # |merged placeholder rows - the vision graph's rows|: the merge must copy them exactly
    tokens: np.ndarray  # [B, T] greedy tokens (finished rows padded)
    logits: np.ndarray  # [B, T, V] the logits each token was chosen from
    prepared: Any = None  # (prompts, visual) for teacher forcing


class RuntimeObserver:
    """Runs cases through a `VLMPipeline` (any backend)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.placeholders = [pipe.family.placeholder_token(kind) for kind in ("image", "video")]

    def observe(self, conversations: list[Conversation], new_tokens: int) -> Observation:
        """Greedy decoding with the export's generation_config (repetition penalty included), as transformers'
        `generate(do_sample=False)` uses the model's."""
        pipe = self.pipe
        generator = pipe.generator
        prompts, visual = pipe.prepare(conversations)
        settings = pipe.settings(do_sample=False, max_new_tokens=new_tokens)
        pad_id = settings.resolved_pad_token_id
        input_ids, mask = left_pad(prompts, 0 if pad_id is None else pad_id)
        positions, _ = pipe.family.prefill_positions(input_ids, mask, visual)
        vision_outputs = generator._vision(input_ids, visual)
        embedding = pipe.sessions["embedding"]
        merged = embedding.to_numpy(
            embedding.run({"input_ids": input_ids, "visual_embeds": vision_outputs["visual_embeds"]})["inputs_embeds"]
        ).astype(np.float32)
        valid = mask.astype(bool)
        placeholder = np.isin(input_ids, self.placeholders) & valid
        vision_rows = np.asarray(vision_outputs["visual_embeds"], dtype=np.float32)
        placed = merged[placeholder]
        placement = (
            float(np.abs(placed - vision_rows).max()) if placed.size and placed.shape == vision_rows.shape else 0.0
        )
        if placed.shape != vision_rows.shape:
            placement = float("inf")
        pixel_name = pipe.manifest.graphs["vision_encoder"].inputs[0].name
        tokens, logits = [], []
        for event in generator.steps(prompts, visual, settings):
            if isinstance(event, StepEvent):
                tokens.append(event.tokens)
                logits.append(event.logits)
            elif isinstance(event, GenerationOutput):
                break
        return Observation(
            prompt_ids=prompts,
            pixels=None if visual.empty else np.asarray(visual.feeds[pixel_name]),
            positions=np.asarray(positions),
            attention_mask=mask,
            vision=placed if placeholder.any() else None,
            text=merged[valid & ~placeholder],
            placement_diff=placement,
            tokens=np.stack(tokens, axis=1),
            logits=np.stack(logits, axis=1).astype(np.float32),
            prepared=(prompts, visual),
        )

    def forced(self, observation: Observation, tokens: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] with `tokens` [B, T] fed in (teacher forcing: one early difference does not change
        every later context)."""
        prompts, visual = observation.prepared
        return forced_logits(self.pipe.generator, prompts, visual, np.asarray(tokens, dtype=np.int64))
