"""Generic embedding-merge graph: token embeddings with visual rows scattered in at placeholder positions.

One `visual_embeds` tensor holds the rows of every image and video placeholder in the order they appear in
the flattened batch; the graph picks row `k` for the k-th placeholder with a gather (cumsum of the mask as
row index into [zeros(1,H); visual_embeds]), which exports under any exporter and allows zero visual rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class EmbeddingMerge(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, placeholder_token_ids: Sequence[int]):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.placeholder_token_ids = tuple(int(t) for t in placeholder_token_ids)

    def forward(self, input_ids: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.placeholder_token_ids:
            is_visual = is_visual | (input_ids == token_id)
        flat = is_visual.reshape(-1).to(torch.int64)
        row = torch.cumsum(flat, dim=0) * flat
        table = torch.cat([embeds.new_zeros((1, embeds.shape[-1])), visual_embeds.to(embeds.dtype)], dim=0)
        rows = table.index_select(0, row).reshape(embeds.shape)
        return torch.where(is_visual[..., None], rows, embeds)
