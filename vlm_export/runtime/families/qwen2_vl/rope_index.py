"""Multimodal RoPE (M-RoPE) position ids for Qwen2-VL / Qwen2.5-VL, computed on the host.

The exported decoder takes ``position_ids [3, B, S]`` (temporal, height, width) as an input, so the
runtime must build them exactly as transformers 5.24 does:

* ``get_rope_index`` mirrors ``Qwen2_5_VLModel.get_rope_index`` (and ``Qwen2VLModel.get_rope_index``
  when called with ``tokens_per_second=1`` and no ``second_per_grid_ts``).
* ``prefill_position_ids`` / ``decode_position_ids`` reproduce what ``generate()`` actually feeds
  the language model, which is not always what ``get_rope_index``'s ``rope_deltas`` imply (see
  ``prefill_position_ids``).

Pure numpy: the runtime never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_export.runtime.families.positions import (
    decode_position_ids,
    grid_rows,
    mrope_positions,
    prefill_with_deltas,
)

__all__ = ["decode_position_ids", "get_rope_index", "prefill_position_ids"]


def _video_temporal(llm_t: int, tokens_per_second: float, second_per_grid: float | None) -> np.ndarray:
    """Temporal index of each video frame group, before the start offset.

    transformers computes ``(arange(t) * tokens_per_second * second_per_grid_ts[i]).long()``. The
    processor hands ``second_per_grid_ts`` over as a float32 tensor, so torch multiplies in float32
    and truncates; float64 would truncate differently for some fps (e.g. 25 tokens/s at 3 fps).
    """
    if second_per_grid is None and float(tokens_per_second).is_integer():
        # No seconds given: transformers multiplies by the python int ``tokens_per_second * 1``.
        return np.arange(llm_t, dtype=np.int64) * int(tokens_per_second)
    seconds = np.float32(1.0 if second_per_grid is None else second_per_grid)
    interval = np.float32(np.float32(tokens_per_second) * seconds)
    return (np.arange(llm_t, dtype=np.float32) * interval).astype(np.int64)


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    second_per_grid_ts: Sequence[float] | None,
    spatial_merge_size: int,
    tokens_per_second: float,
) -> tuple[np.ndarray, np.ndarray]:
    """3D positions ``[3, B, S]`` and ``rope_deltas [B, 1]``, equal to ``Qwen2_5_VLModel.get_rope_index``.

    Text tokens advance all three axes by one; a vision span of ``t x h x w`` merged tokens starting
    at ``p`` gets ``(p + temporal, p + row, p + col)`` and moves ``p`` on by ``max(h, w)``. Grids and
    ``second_per_grid_ts`` are consumed in order across the whole batch, one per run of
    consecutive image (or video) tokens. Padding (``attention_mask == 0``) gets position 0.
    ``rope_deltas = max(position) + 1 - n_real_tokens``. For Qwen2-VL pass ``tokens_per_second=1``
    and ``second_per_grid_ts=None`` (it has no temporal scaling).
    """
    seconds = None
    if second_per_grid_ts is not None:
        seconds = iter(np.asarray(second_per_grid_ts, dtype=np.float64).reshape(-1).tolist())

    def video_temporal(llm_t: int) -> np.ndarray:
        second = next(seconds, None) if seconds is not None else None
        if seconds is not None and second is None:
            raise ValueError("fewer second_per_grid_ts entries than videos")
        return _video_temporal(llm_t, tokens_per_second, second)

    return mrope_positions(
        input_ids,
        attention_mask,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        image_grids=grid_rows(image_grid_thw),
        video_grids=grid_rows(video_grid_thw),
        spatial_merge_size=spatial_merge_size,
        video_temporal=video_temporal,
    )


def prefill_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    second_per_grid_ts: Sequence[float] | None,
    spatial_merge_size: int,
    tokens_per_second: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``[3, B, S]`` that ``generate()`` feeds at prefill, and deltas for ``decode_position_ids``.

    With a grid given, generate uses ``get_rope_index``; without one (text only) it uses
    ``cumsum(attention_mask) - 1`` with pads at 0 on all three axes. The language model also gets a
    fourth, text-only row first (``cumsum - 1``), used only for packed-mask detection; it is omitted.

    The returned ``rope_deltas`` are NOT ``get_rope_index``'s: generate decodes with
    ``last_prefill_position + k`` on each axis, while ``get_rope_index``'s deltas imply
    ``max_position + k``. The two differ when a video's scaled temporal axis overshoots the text after
    it (e.g. a long video followed by a short prompt). The deltas returned here make
    ``decode_position_ids`` reproduce generate: ``delta = last_position - (n_real_tokens - 1)``.
    That needs the three axes to agree at the last column, which holds whenever the prompt ends in
    a text token (the processor always closes a vision span with ``<|vision_end|>``).
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
            second_per_grid_ts=second_per_grid_ts,
            spatial_merge_size=spatial_merge_size,
            tokens_per_second=tokens_per_second,
        )
    return prefill_with_deltas(rope_positions, input_ids, attention_mask)
