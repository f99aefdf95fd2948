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

from vlm_export.runtime.families.positions import decode_position_ids, prefill_with_deltas

__all__ = ["decode_position_ids", "get_rope_index", "prefill_position_ids"]

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def _grids(grid_thw: np.ndarray | None, *, split_frames: bool) -> list[tuple[int, int, int]]:
    """Grid rows in consumption order; videos become one ``(1, h, w)`` row per frame, as transformers does."""
    if grid_thw is None:
        return []
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if split_frames:
        grid = np.repeat(grid, grid[:, 0], axis=0)
        grid[:, 0] = 1
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]


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
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got {ids.shape}")
    batch, seq = ids.shape
    mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    types = np.where(ids == image_token_id, _IMAGE, np.where(ids == video_token_id, _VIDEO, _TEXT))
    grids = {
        _IMAGE: iter(_grids(image_grid_thw, split_frames=False)),
        _VIDEO: iter(_grids(video_grid_thw, split_frames=True)),
    }
    m = int(spatial_merge_size)

    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        row_types = types[b] if mask is None else types[b][mask[b]]
        n = len(row_types)
        if n == 0:
            raise ValueError(f"batch row {b} has no attended tokens")
        # Runs of equal token type, as itertools.groupby in transformers.
        bounds = np.flatnonzero(np.diff(row_types)) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), n]
        row = np.empty((3, n), dtype=np.int64)
        pos = 0
        for start, end in zip(starts, ends, strict=True):
            kind = int(row_types[start])
            if kind == _TEXT:
                row[:, start:end] = np.arange(pos, pos + end - start, dtype=np.int64)
                pos += end - start
                continue
            name = "image" if kind == _IMAGE else "video frame"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"more {name} token runs than {name}s in the grids (batch row {b})")
            lt, lh, lw = grid[0], grid[1] // m, grid[2] // m
            if lt * lh * lw != end - start:
                raise ValueError(
                    f"{name} run of {end - start} tokens in batch row {b} does not match grid {grid} "
                    f"({lt * lh * lw} tokens); adjacent {name}s must be separated by a text token"
                )
            row[0, start:end] = np.repeat(np.arange(lt, dtype=np.int64), lh * lw) + pos
            row[1, start:end] = np.tile(np.repeat(np.arange(lh, dtype=np.int64), lw), lt) + pos
            row[2, start:end] = np.tile(np.arange(lw, dtype=np.int64), lt * lh) + pos
            pos += max(lh, lw)
        if mask is None:
            position_ids[:, b] = row
        else:
            position_ids[:, b, mask[b]] = row
        deltas[b, 0] = row.max() + 1 - n
    return position_ids, deltas


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
