"""Attention over ragged segments (images, windows) as one batched call, with no Python loop in the graph.

transformers' vision towers loop over `cu_seqlens` segments in Python (`lengths.tolist()` + `torch.split`),
which either fails to export or bakes the example's split sizes into the graph. Instead the host lays the
segments out as a padded `[num_segments, max_len]` table of row indices (pad entries point at an extra zero
row), the graph gathers the rows, runs one SDPA call with a key-padding mask and scatters the rows back.
Memory grows with `num_segments * max_len**2`: per image for full-attention layers, per window for windowed
layers, never with the square of the total patch count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def gather_segments(rows: torch.Tensor, segment_index: torch.Tensor) -> torch.Tensor:
    """`rows` [N, ...] -> [num_segments, max_len, ...]; entries equal to N read a zero row."""
    pad = rows.new_zeros((1, *rows.shape[1:]))
    table = torch.cat([rows, pad], dim=0)
    gathered = table.index_select(0, segment_index.reshape(-1))
    return gathered.reshape(*segment_index.shape, *rows.shape[1:])


def scatter_segments(padded: torch.Tensor, row_position: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_segments`: [num_segments, max_len, ...] -> [N, ...] using each row's flat slot."""
    flat = padded.reshape(-1, *padded.shape[2:])
    return flat.index_select(0, row_position)


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_index: torch.Tensor,
    row_position: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Bidirectional attention restricted to each segment.

    query/key/value: [N, heads, head_dim]; segment_index: int64 [num_segments, max_len] (N marks padding);
    row_position: int64 [N], the flat slot of each row in the padded table. Returns [N, heads, head_dim].
    """
    num_rows = query.shape[0]
    q = gather_segments(query, segment_index).transpose(1, 2)  # [S, heads, L, hd]
    k = gather_segments(key, segment_index).transpose(1, 2)
    v = gather_segments(value, segment_index).transpose(1, 2)
    valid = segment_index < num_rows  # [S, L]
    min_value = torch.finfo(q.dtype).min
    bias = torch.where(valid, 0.0, min_value).to(q.dtype)[:, None, None, :]
    # ONNX Runtime's Attention op does not broadcast the mask over query positions: [S, 1, L, L].
    bias = bias.expand(-1, -1, q.shape[2], -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    return scatter_segments(out.transpose(1, 2), row_position)


RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def vision_block_with_segments(
    block: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segment_index: torch.Tensor,
    row_position: torch.Tensor,
    apply_rope: RopeFn,
) -> torch.Tensor:
    """One pre-norm ViT block of the Qwen-VL families (norm1 -> qkv -> rope -> attention -> proj, norm2 -> mlp),
    using the block's own submodules, with attention restricted to the host-described segments."""
    attn = block.attn
    num_rows = hidden.shape[0]
    qkv = attn.qkv(block.norm1(hidden)).reshape(num_rows, 3, attn.num_heads, -1)
    query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)
    query, key = apply_rope(query, key, cos, sin)
    out = segment_attention(query, key, value, segment_index, row_position, attn.scaling)
    hidden = hidden + attn.proj(out.reshape(num_rows, -1))
    return hidden + block.mlp(block.norm2(hidden))
