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

from collections.abc import Iterator, Sequence

import numpy as np

from vlm_export.runtime.families.positions import decode_position_ids, prefill_with_deltas

__all__ = ["decode_position_ids", "get_rope_index", "prefill_position_ids"]

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def _token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """``mm_token_type_ids`` as the HF processor builds it: 0 text, 1 image, 2 video."""
    types = np.zeros(input_ids.shape, dtype=np.int64)
    types[input_ids == image_token_id] = _IMAGE
    types[input_ids == video_token_id] = _VIDEO
    return types


def _grid_rows(grid_thw: np.ndarray | None) -> Iterator[tuple[int, int, int]] | None:
    if grid_thw is None:
        return None
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return iter([tuple(int(v) for v in row) for row in grid])


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
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got {ids.shape}")
    batch, seq = ids.shape
    mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    types = _token_types(ids, image_token_id, video_token_id)
    grids = {_IMAGE: _grid_rows(image_grid_thw), _VIDEO: _grid_rows(video_grid_thw)}
    seconds = None
    if second_per_grid_ts is not None:
        seconds = iter(np.asarray(second_per_grid_ts, dtype=np.float64).reshape(-1).tolist())
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
        starts = np.concatenate([[0], bounds]).tolist()
        ends = [*bounds.tolist(), n]
        row = np.empty((3, n), dtype=np.int64)
        pos = 0
        for start, end in zip(starts, ends, strict=True):
            kind = int(row_types[start])
            if kind == _TEXT:
                row[:, start:end] = np.arange(pos, pos + end - start, dtype=np.int64)
                pos += end - start
                continue
            name = "image" if kind == _IMAGE else "video"
            it = grids[kind]
            grid = next(it, None) if it is not None else None
            if grid is None:
                raise ValueError(f"more {name} token runs than {name}_grid_thw rows (batch row {b})")
            grid_t, grid_h, grid_w = grid
            lt, lh, lw = grid_t, grid_h // m, grid_w // m
            if lt * lh * lw != end - start:
                raise ValueError(
                    f"{name} run of {end - start} tokens in batch row {b} does not match grid {grid} "
                    f"({lt * lh * lw} tokens); adjacent {name}s must be separated by a text token"
                )
            if kind == _VIDEO:
                second = next(seconds, None) if seconds is not None else None
                if seconds is not None and second is None:
                    raise ValueError("fewer second_per_grid_ts entries than videos")
                temporal = _video_temporal(lt, tokens_per_second, second)
            else:
                temporal = np.arange(lt, dtype=np.int64)
            row[0, start:end] = np.repeat(temporal, lh * lw) + pos
            row[1, start:end] = np.tile(np.repeat(np.arange(lh, dtype=np.int64), lw), lt) + pos
            row[2, start:end] = np.tile(np.arange(lw, dtype=np.int64), lt * lh) + pos
            pos += max(grid_h, grid_w) // m
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
