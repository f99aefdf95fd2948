"""Position ids as transformers' `generate()` feeds them, shared by every family.

Prefill: a family's rope index (3D M-RoPE for the Qwen-VL families) or, for text, `cumsum(mask) - 1` with
pads at 0 (`GenerationMixin._prepare_position_ids_for_generation`). Decode: generate continues each axis from
the last prefill position (+1 per step), which `decode_position_ids` reproduces as `cumsum(mask) - 1 + delta`.
"""

from __future__ import annotations

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
