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
    """`rows` [N, ...] -> [num_segments, max_len, ...]; padding entries (equal to N) read row 0 instead, which the
    caller masks out (keys) or never scatters back (queries). No zero row is appended: that was a copy of every
    row per tensor per layer."""
    index = torch.where(segment_index < rows.shape[0], segment_index, 0).reshape(-1)
    return rows.index_select(0, index).reshape(*segment_index.shape, *rows.shape[1:])


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
    num_heads: int,
) -> torch.Tensor:
    """Bidirectional attention restricted to each segment.

    query/key/value: [N, heads * head_dim]; segment_index: int64 [num_segments, max_len] (N marks padding);
    row_position: int64 [N], the flat slot of each row in the padded table. Returns [N, heads * head_dim].
    While tracing, ONNX `Attention` takes the heads-packed [S, L, heads * head_dim] layout directly: no transposes
    in the graph (there were four per layer, each a copy of every row).
    """
    num_rows = query.shape[0]
    q, k, v = (gather_segments(t, segment_index) for t in (query, key, value))  # [S, L, hidden]
    valid = segment_index < num_rows  # [S, L]
    min_value = torch.finfo(q.dtype).min
    bias = torch.where(valid, 0.0, min_value).to(q.dtype)[:, None, None, :]
    # ONNX Runtime's Attention op does not broadcast the mask over query positions: [S, 1, L, L].
    bias = bias.expand(-1, -1, q.shape[1], -1)
    if torch.onnx.is_in_onnx_export():
        out = torch.onnx.ops.attention(q, k, v, bias, q_num_heads=num_heads, kv_num_heads=num_heads, scale=scaling)[0]
    else:
        heads = [t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, attn_mask=bias, scale=scaling).transpose(1, 2).flatten(2)
    return scatter_segments(out, row_position)


RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def traceable_vision_rope(reference: RopeFn) -> RopeFn:
    """transformers' vision RoPE (`q * cos + rotate_half(q) * sin` on [N, heads, head_dim], in float32), traced as
    one ONNX `RotaryEmbedding` per tensor instead of twelve elementwise ops per layer.

    Each row is a batch entry of one position ([N, heads, 1, head_dim] against cos/sin [N, 1, head_dim / 2]), so
    no transpose is needed; the op takes the first half of cos/sin, which rotate-half RoPE duplicates over both
    halves (the graph verification against transformers catches a model where it does not)."""

    def rope(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.onnx.is_in_onnx_export():
            return reference(q, k, cos, sin)
        half = cos.shape[-1] // 2
        cos_half, sin_half = cos[:, None, :half].float(), sin[:, None, :half].float()

        def rotate(x: torch.Tensor) -> torch.Tensor:
            return torch.onnx.ops.rotary_embedding(x.float().unsqueeze(2), cos_half, sin_half).squeeze(2).to(x.dtype)

        return rotate(q), rotate(k)

    return rope


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
    heads = attn.num_heads
    query, key, value = attn.qkv(block.norm1(hidden)).chunk(3, dim=-1)  # [N, hidden] each: one Split, no transpose
    query, key = traceable_vision_rope(apply_rope)(
        query.unflatten(-1, (heads, -1)), key.unflatten(-1, (heads, -1)), cos, sin
    )
    out = segment_attention(query.flatten(1), key.flatten(1), value, segment_index, row_position, attn.scaling, heads)
    hidden = hidden + attn.proj(out)
    return hidden + block.mlp(block.norm2(hidden))
