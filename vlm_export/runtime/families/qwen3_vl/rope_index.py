"""Multimodal RoPE (M-RoPE) position ids for Qwen3-VL / Qwen3-VL-MoE, computed on the host.

The exported decoder takes ``position_ids [3, B, S]`` (temporal, height, width), so the runtime must build
them exactly as transformers 5.24 does. ``get_rope_index`` mirrors ``Qwen3VLModel.get_rope_index`` (the MoE
model's is a copy), which differs from Qwen2.5-VL's:

* a video is split into its frames (``video_grid_thw`` rows repeated ``t`` times with ``t = 1``): the
  processor writes each frame as ``<{time:.1f} seconds><|vision_start|>frame<|vision_end|>``, so every frame
  is its own run of video tokens, preceded by text, and its temporal axis is just the start position;
* there is no ``tokens_per_second`` / ``second_per_grid_ts`` scaling (time is in the timestamp text).

``prefill_position_ids`` / ``decode_position_ids`` reproduce what ``generate()`` feeds the language model.
Pure numpy: the runtime never imports torch or transformers.
"""

from __future__ import annotations

import numpy as np

from vlm_export.runtime.families.positions import (
    decode_position_ids,
    grid_rows,
    mrope_positions,
    prefill_with_deltas,
)

__all__ = ["decode_position_ids", "get_rope_index", "prefill_position_ids"]


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3D positions ``[3, B, S]`` and ``rope_deltas [B, 1]`` (int64), equal to ``Qwen3VLModel.get_rope_index``.

    Text tokens advance all three axes by one. A run of image (or video-frame) tokens for a grid
    ``t x h x w`` (merged: ``t x h/m x w/m``) starting at ``p`` gets ``(p + frame, p + row, p + col)`` and moves
    ``p`` on by ``max(h, w) / m`` (not by ``t``). Grids are consumed in order across the whole batch, one per
    run of consecutive image tokens, one video frame per run of video tokens. Padding gets position 0.
    ``rope_deltas = max(position) + 1 - n_real_tokens``. ``mm_token_type_ids`` is derived from the ids.
    """
    return mrope_positions(
        input_ids,
        attention_mask,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        image_grids=grid_rows(image_grid_thw),
        video_grids=grid_rows(video_grid_thw, split_frames=True),
        spatial_merge_size=spatial_merge_size,
        video_name="video frame",
    )


def prefill_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``[3, B, S]`` that ``generate()`` feeds at prefill, and deltas for ``decode_position_ids``.

    With a grid given, generate uses ``get_rope_index``; without one (text only) it uses
    ``cumsum(attention_mask) - 1`` with pads at 0 on all three axes. The language model also gets a fourth,
    text-only row first (``cumsum - 1``), used only for mask creation; it is omitted here.

    generate decodes from ``last_prefill_position + k`` on each axis, not from ``get_rope_index``'s
    ``max + k``, so the returned deltas are ``last_position - (n_real_tokens - 1)``. For Qwen3-VL the two agree
    whenever the prompt ends in text, except for an image grid with ``t > 1`` whose frame axis outruns the
    text after it (the processor always gives images ``t = 1``). A prompt ending in a vision token is refused:
    its axes disagree at the last column, which ``rope_deltas [B, 1]`` cannot express.
    """
    rope_positions = None
    if image_grid_thw is not None or video_grid_thw is not None:
        rope_positions, _ = get_rope_index(
            np.asarray(input_ids),
            attention_mask,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            spatial_merge_size=spatial_merge_size,
        )
    return prefill_with_deltas(rope_positions, input_ids, attention_mask)
