"""Teacher-forced top-1 agreement of a candidate export (e.g. int4 weights) with a reference export (fp32).

A quantized model is not exact, so it cannot be held to transformers' tokens. What is measured instead: the
reference generates greedily; the candidate is fed the reference's tokens (teacher forcing, so one early
divergence does not change every later context) and at each position its argmax is compared with the
reference's choice. Only numpy and the runtime (no torch): tools/bench.py uses it on the torch-free side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vlm_export.runtime.families import VisualBatch
from vlm_export.runtime.generation import StepEvent, forced_logits


@dataclass
class Agreement:
    """Top-1 agreement over ``positions`` forced positions, and how far the logits moved."""

    top1: float  # candidate's argmax == reference's token
    top5: float  # reference's token among the candidate's 5 highest logits
    positions: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    relative_logit_rms: float  # rms(candidate - reference) / rms(reference - its mean over the vocabulary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def greedy_reference(
    reference: Any, conversations: list[list[dict[str, Any]]], new_tokens: int
) -> tuple[list[list[int]], VisualBatch, np.ndarray, np.ndarray]:
    """The reference pipeline's greedy tokens [B, T] and their logits [B, T, V] (no EOS stop, no penalty)."""
    prompts, visual = reference.prepare(conversations)
    settings = reference.settings(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0, eos_token_ids=[])
    tokens, logits = [], []
    for event in reference.generator.steps(prompts, visual, settings):
        if isinstance(event, StepEvent):
            tokens.append(event.tokens)
            logits.append(event.logits)
    return prompts, visual, np.stack(tokens, axis=1), np.stack(logits, axis=1)


def top1_agreement(
    reference: Any, candidate: Any, conversations: list[list[dict[str, Any]]], new_tokens: int = 32
) -> Agreement:
    """Teacher-forced top-1 agreement of ``candidate`` with ``reference`` (two `VLMPipeline`s of one model).

    Both pipelines must share tokenizer and preprocessing (same model, different weight formats): the prompts
    are prepared once, by the reference.
    """
    prompts, visual, tokens, ref_logits = greedy_reference(reference, conversations, new_tokens)
    cand_logits = forced_logits(candidate.generator, prompts, visual, tokens)
    diff = np.abs(cand_logits - ref_logits)
    top5 = np.argpartition(-cand_logits, 5, axis=-1)[..., :5]
    spread = ref_logits - ref_logits.mean(axis=-1, keepdims=True)
    return Agreement(
        top1=float((cand_logits.argmax(-1) == tokens).mean()),
        top5=float((top5 == tokens[..., None]).any(-1).mean()),
        positions=int(tokens.size),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        relative_logit_rms=float(np.sqrt((diff**2).mean() / (spread**2).mean())),
    )
