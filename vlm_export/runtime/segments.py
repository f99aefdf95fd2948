"""Host-side layout of ragged attention segments for the exported graphs (see graphs/attention.py)."""

from __future__ import annotations

import numpy as np


def segment_layout(cu_seqlens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn cumulative segment boundaries into a padded gather table and each row's slot in it.

    Returns (segment_index int64 [num_segments, max_len], where entries == N are padding,
    row_position int64 [N], the flat slot `segment * max_len + offset` of each row).
    Empty segments (repeated boundaries) are dropped.
    """
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(bounds)
    keep = lengths > 0
    starts, lengths = bounds[:-1][keep], lengths[keep]
    total = int(bounds[-1]) if bounds.size else 0
    if lengths.size == 0:
        return np.zeros((0, 1), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    max_len = int(lengths.max())
    offsets = np.arange(max_len, dtype=np.int64)
    index = starts[:, None] + offsets[None, :]
    valid = offsets[None, :] < lengths[:, None]
    segment_index = np.where(valid, index, total).astype(np.int64)
    slots = np.arange(segment_index.size, dtype=np.int64).reshape(segment_index.shape)
    row_position = np.empty(total, dtype=np.int64)
    row_position[segment_index[valid]] = slots[valid]
    return segment_index, row_position
