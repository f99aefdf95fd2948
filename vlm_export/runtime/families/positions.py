"""Position ids as transformers' `generate()` feeds them, shared by every family.

Prefill: a family's rope index (3D M-RoPE for the Qwen-VL families) or, for text, `cumsum(mask) - 1` with
pads at 0 (`GenerationMixin._prepare_position_ids_for_generation`). Decode: generate continues each axis from
the last prefill position (+1 per step), which `decode_position_ids` reproduces as `cumsum(mask) - 1 + delta`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """``cumsum(mask) - 1``, pads at 0."""
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 0
    return positions


def prefill_with_deltas(
    rope_positions: np.ndarray | None, input_ids: np.ndarray, attention_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """`[3, B, S]` prefill positions (the rope index's, or text positions when None) and the deltas that make
    `decode_position_ids` continue them as generate does.

    generate decodes from ``last_prefill_position + k`` on each axis, not from the rope index's ``max + k``,
    so ``delta = last_position - (n_real_tokens - 1)``. A prompt whose axes disagree at the last column (it
    ends in a vision token) is refused: ``rope_deltas [B, 1]`` cannot express it.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, dtype=np.int64) if attention_mask is None else np.asarray(attention_mask)
    if rope_positions is None:
        position_ids = np.broadcast_to(text_positions(mask), (3, *ids.shape)).copy()
    else:
        position_ids = rope_positions
    last = position_ids[:, :, -1]
    if not (last == last[:1]).all():
        rows = np.flatnonzero((last != last[:1]).any(axis=0)).tolist()
        raise ValueError(
            f"prompt rows {rows} end in a vision token: generate would decode each M-RoPE axis from a "
            "different position, which rope_deltas [B, 1] cannot express; end the prompt with text"
        )
    n_real = mask.astype(bool).sum(axis=-1)
    rope_deltas = (last[0] - (n_real - 1)).astype(np.int64)[:, None]
    return position_ids, rope_deltas


def decode_position_ids(attention_mask: np.ndarray, rope_deltas: np.ndarray, num_new: int = 1) -> np.ndarray:
    """Positions ``[3, B, num_new]`` that ``generate()`` feeds at a decode step.

    ``attention_mask`` is the full ``[B, past + num_new]`` mask including the new tokens and ``rope_deltas``
    comes from ``prefill_with_deltas``. Computes ``cumsum(mask) - 1 + delta`` on the last ``num_new`` columns
    (same on the three axes), which equals generate's ``previous_last_position + 1`` because new tokens are
    always attended.
    """
    mask = np.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] < num_new:
        raise ValueError(f"attention_mask must be [B, past + {num_new}], got {mask.shape}")
    positions = text_positions(mask)[:, mask.shape[1] - num_new :]
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(positions + deltas, (3, *positions.shape)).copy()


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grids: list[tuple[int, int, int]],
    video_grids: list[tuple[int, int, int]],
    spatial_merge_size: int,
    video_temporal: Callable[[int], np.ndarray] | None = None,
    video_name: str = "video",
) -> tuple[np.ndarray, np.ndarray]:
    """The walk every Qwen-VL `get_rope_index` does: 3D positions ``[3, B, S]`` and ``rope_deltas [B, 1]``.

    Text tokens advance all three axes by one. A run of image (or video) tokens for the next grid ``t x h x w``
    (merged: ``t x h/m x w/m``) starting at ``p`` gets ``(p + temporal, p + row, p + col)`` and moves ``p`` on by
    ``max(h, w) / m``. Grids are consumed in order across the whole batch, one per run of consecutive tokens of
    their kind (runs as ``itertools.groupby`` makes them). `video_temporal(lt)` gives a video run's temporal
    indices (Qwen2.5-VL scales them by time; default ``arange``). Padding gets position 0.
    ``rope_deltas = max(position) + 1 - n_real_tokens``.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got {ids.shape}")
    batch, seq = ids.shape
    mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    text, image, video = 0, 1, 2
    types = np.where(ids == image_token_id, image, np.where(ids == video_token_id, video, text))
    grids = {image: iter(image_grids), video: iter(video_grids)}
    names = {image: "image", video: video_name}
    m = int(spatial_merge_size)

    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        row_types = types[b] if mask is None else types[b][mask[b]]
        n = len(row_types)
        if n == 0:
            raise ValueError(f"batch row {b} has no attended tokens")
        bounds = np.flatnonzero(np.diff(row_types)) + 1
        starts, ends = [0, *bounds.tolist()], [*bounds.tolist(), n]
        row = np.empty((3, n), dtype=np.int64)
        pos = 0
        for start, end in zip(starts, ends, strict=True):
            kind = int(row_types[start])
            if kind == text:
                row[:, start:end] = np.arange(pos, pos + end - start, dtype=np.int64)
                pos += end - start
                continue
            name = names[kind]
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"more {name} token runs than {name}s in the grids (batch row {b})")
            lt, lh, lw = grid[0], grid[1] // m, grid[2] // m
            if lt * lh * lw != end - start:
                raise ValueError(
                    f"{name} run of {end - start} tokens in batch row {b} does not match grid {grid} "
                    f"({lt * lh * lw} tokens); adjacent {name}s must be separated by a text token"
                )
            if kind == video and video_temporal is not None:
                temporal = video_temporal(lt)
            else:
                temporal = np.arange(lt, dtype=np.int64)
            row[0, start:end] = np.repeat(temporal, lh * lw) + pos
            row[1, start:end] = np.tile(np.repeat(np.arange(lh, dtype=np.int64), lw), lt) + pos
            row[2, start:end] = np.tile(np.arange(lw, dtype=np.int64), lt * lh) + pos
            pos += max(lh, lw)
        if mask is None:
            position_ids[:, b] = row
        else:
            position_ids[:, b, mask[b]] = row
        deltas[b, 0] = row.max() + 1 - n
    return position_ids, deltas


def grid_rows(grid_thw: np.ndarray | None, *, split_frames: bool = False) -> list[tuple[int, int, int]]:
    """Grid rows in consumption order; with `split_frames` a video becomes one ``(1, h, w)`` row per frame."""
    if grid_thw is None:
        return []
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if split_frames:
        grid = np.repeat(grid, grid[:, 0], axis=0)
        grid[:, 0] = 1
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]
