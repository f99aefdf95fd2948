"""Values shared by the families' image and video processor configs (transformers' own constants and parsing)."""

from __future__ import annotations

from typing import Any

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (image_utils.py), the default of the Qwen and LLaVA processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def three_floats(value: Any) -> tuple[float, float, float]:
    """Per-channel mean/std; a scalar applies to all three channels, as in transformers' normalize."""
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {len(values)}")
    return values  # type: ignore[return-value]
