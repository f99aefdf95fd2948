"""Grid-dependent inputs of the exported Qwen3-VL / Qwen3-VL-MoE vision encoder, computed on the host.

Qwen3-VL's vision forward derives four tensors from ``grid_thw`` with data-dependent code that cannot be
exported; transformers 5.24 lets ``Qwen3VLVisionModel.forward`` take them precomputed (with
``grid_thw=None``) under these keyword names, popped by the helpers in ``transformers.vision_utils``:

* ``position_ids`` ``[N, 2]`` int64: (row, col) of each patch for the 2D vision rotary
  (``get_vision_position_ids``), identical to Qwen2.5-VL's;
* ``cu_seqlens`` ``[sum(t) + 1]``: one full-attention segment per frame (``get_vision_cu_seqlens``,
  transformers returns int32, the values agree);
* ``interp_indices`` ``[N, 4]`` int64 and ``interp_weights`` ``[N, 4]`` float32: bilinear
  (``align_corners=True``) resampling of the learned ``num_grid_per_side x num_grid_per_side``
  position-embedding table to each grid, in patch (spatial-merge-block) order
  (``get_vision_interpolation_indices_and_weights``); the model computes
  ``(pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)``.

Qwen3-VL-MoE's vision tower is a copy of Qwen3-VL's, so the same inputs serve both. Pure numpy: the
runtime never imports torch.
"""

from __future__ import annotations

import numpy as np

from vlm_export.runtime.families.qwen2_vl.vision_inputs import vision_cu_seqlens, vision_position_ids

__all__ = ["qwen3_vl_vision_inputs", "vision_cu_seqlens", "vision_interpolation", "vision_position_ids"]


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps ``[N, 2]`` into a ``side``-long axis and their float32 weights.

    Mirrors ``vision_utils._interpolation_axis_taps_weights(mode="bilinear", align_corners=True)``
    operation by operation in float32 (``index * (side - 1) / max(size - 1, 1)``, then
    ``1 - |src - floor - offset|``), so the weights come out bit-identical to transformers'.
    """
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs((src - floor)[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0))
    return taps, weights.astype(np.float32, copy=False)


def vision_interpolation(
    grid_thw: np.ndarray, merge_size: int, num_grid_per_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(interp_indices [N, 4] int64, interp_weights [N, 4] float32)`` for the learned position table.

    Equals ``vision_utils.get_vision_interpolation_indices_and_weights(grid_thw, num_grid_per_side,
    mode="bilinear", align_corners=True, spatial_merge_size=merge_size)``, the call in
    ``Qwen3VLVisionModel.forward``. Taps per patch are ``(h0, w0), (h0, w1), (h1, w0), (h1, w1)`` as flat
    indices ``h * side + w``; taps past the edge are clamped and carry weight 0.
    """
    side = int(num_grid_per_side)
    if side < 1:
        raise ValueError(f"num_grid_per_side must be >= 1, got {num_grid_per_side}")
    position_ids = vision_position_ids(grid_thw, merge_size)  # validates the grid
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    counts = grid.prod(axis=1)
    heights = np.repeat(grid[:, 1], counts)
    widths = np.repeat(grid[:, 2], counts)
    h_taps, h_weights = _axis_taps(position_ids[:, 0], heights, side)
    w_taps, w_weights = _axis_taps(position_ids[:, 1], widths, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int64, copy=False), weights.astype(np.float32, copy=False)


def qwen3_vl_vision_inputs(grid_thw: np.ndarray, *, merge_size: int, num_grid_per_side: int) -> dict[str, np.ndarray]:
    """Every grid-dependent input of the Qwen3-VL vision encoder, keyed by transformers' kwarg names.

    ``position_ids [N, 2]``, ``cu_seqlens [sum(t) + 1]``, ``interp_indices [N, 4]`` (int64) and
    ``interp_weights [N, 4]`` (float32) can be passed straight to ``Qwen3VLVisionModel.forward(pixel_values,
    grid_thw=None, **inputs)`` (as torch tensors). ``num_grid_per_side = int(num_position_embeddings ** 0.5)``.
    """
    indices, weights = vision_interpolation(grid_thw, merge_size, num_grid_per_side)
    return {
        "position_ids": vision_position_ids(grid_thw, merge_size),
        "cu_seqlens": vision_cu_seqlens(grid_thw),
        "interp_indices": indices,
        "interp_weights": weights,
    }
