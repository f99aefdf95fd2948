"""Grid-dependent inputs of the exported Qwen2-VL / Qwen2.5-VL vision encoder, computed on the host.

The exported vision graph cannot derive these from ``grid_thw`` (data-dependent loops and splits
either fail to export or get baked in), so the runtime feeds them precomputed, exactly as
``transformers.vision_utils`` computes them (``get_vision_position_ids``, ``get_vision_cu_seqlens``,
``get_vision_window_index``; transformers 5.24). Pure numpy: the runtime never imports torch.
All outputs are int64 (transformers returns int32 for the cumulative lengths; the values agree).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "qwen2_5_vl_vision_inputs",
    "qwen2_vl_vision_inputs",
    "vision_cu_seqlens",
    "vision_position_ids",
    "vision_window_index",
]


def _as_grid(grid_thw: np.ndarray, merge_size: int | None = None) -> np.ndarray:
    """Validate ``grid_thw`` as int64 ``[n, 3]``; transformers would fail later with a reshape error."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3], got {grid.shape}")
    if grid.size and not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer, got {grid.dtype}")
    grid = grid.astype(np.int64, copy=False)
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    if merge_size is not None and ((grid[:, 1:] % merge_size) != 0).any():
        raise ValueError(f"grid h and w must be multiples of merge_size={merge_size}, got {grid.tolist()}")
    return grid


def vision_position_ids(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(row, col) patch coordinates ``[N, 2]`` in spatial-merge-block order, repeated per frame.

    Equals ``vision_utils.get_vision_position_ids(grid_thw, merge_size)``: patches are laid out
    block-major over ``merge x merge`` blocks, which is the order the patch merger consumes them.
    Vectorised over all patches of all grids (no per-image loop).
    """
    grid = _as_grid(grid_thw, merge_size)
    m = int(merge_size)
    if len(grid) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    frame = np.repeat(h * w, counts)
    blocks_w = np.repeat(w // m, counts)
    # Index of the patch inside its frame; frames of a video repeat the same layout.
    within = (np.arange(int(counts.sum()), dtype=np.int64) - starts) % frame
    in_col = within % m
    in_row = (within // m) % m
    block_col = (within // (m * m)) % blocks_w
    block_row = within // (m * m * blocks_w)
    return np.stack([block_row * m + in_row, block_col * m + in_col], axis=-1)


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Cumulative full-attention segment boundaries ``[sum(t) + 1]``: one segment per frame.

    Equals ``vision_utils.get_vision_cu_seqlens(grid_thw)`` (``merge_temporal=False``, the
    Qwen2-VL / Qwen2.5-VL convention: frames of a video do not attend to each other).
    """
    grid = _as_grid(grid_thw)
    seqlens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(seqlens, dtype=np.int64)])


def vision_window_index(
    grid_thw: np.ndarray, merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window permutation of merged tokens and window boundaries for Qwen2.5-VL window attention.

    Returns ``(window_index [N / merge**2], cu_window_seqlens [w + 1])`` equal to
    ``vision_utils.get_vision_window_index``. ``cu_window_seqlens`` counts patches (not merged
    tokens) and has empty windows removed, as ``torch.unique_consecutive`` does there. transformers
    pads a full extra window when a side is already a multiple of the window; those windows are
    empty and vanish in the same way.
    """
    grid = _as_grid(grid_thw, merge_size)
    m = int(merge_size)
    vws = int(window_size) // m // int(patch_size)  # window side in merged tokens
    if vws <= 0:
        raise ValueError(f"window_size={window_size} is smaller than merge_size*patch_size={m * patch_size}")
    unit = m * m
    indices: list[np.ndarray] = []
    seqlens: list[np.ndarray] = []
    offset = 0
    for grid_t, grid_h, grid_w in grid.tolist():
        lh, lw = grid_h // m, grid_w // m
        pad_h = vws - lh % vws
        pad_w = vws - lw % vws
        nwh, nww = (lh + pad_h) // vws, (lw + pad_w) // vws
        index = np.arange(grid_t * lh * lw, dtype=np.int64).reshape(grid_t, lh, lw)
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        windows = padded.reshape(grid_t, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4).reshape(grid_t * nwh * nww, -1)
        valid = windows >= 0
        seqlens.append(valid.sum(axis=1))
        indices.append(windows[valid] + offset)
        offset += grid_t * lh * lw
    window_index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    cu = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(np.concatenate(seqlens or [[]])) * unit])
    cu = cu.astype(np.int64, copy=False)
    # Lengths are >= 0, so unique_consecutive == dropping repeats of the previous boundary.
    keep = np.concatenate([[True], np.diff(cu) != 0])
    return window_index.astype(np.int64, copy=False), cu[keep]


def qwen2_5_vl_vision_inputs(
    grid_thw: np.ndarray, *, merge_size: int, window_size: int, patch_size: int
) -> dict[str, np.ndarray]:
    """All grid-dependent inputs of the exported Qwen2.5-VL vision graph, fed instead of ``grid_thw``."""
    window_index, cu_window_seqlens = vision_window_index(grid_thw, merge_size, window_size, patch_size)
    return {
        "position_ids": vision_position_ids(grid_thw, merge_size),
        "cu_seqlens": vision_cu_seqlens(grid_thw),
        "window_index": window_index,
        "cu_window_seqlens": cu_window_seqlens,
    }


def qwen2_vl_vision_inputs(grid_thw: np.ndarray, *, merge_size: int) -> dict[str, np.ndarray]:
    """Grid-dependent inputs of the exported Qwen2-VL vision graph (no window attention there)."""
    return {
        "position_ids": vision_position_ids(grid_thw, merge_size),
        "cu_seqlens": vision_cu_seqlens(grid_thw),
    }
