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


def embedding_spec(embed_tokens: nn.Embedding, image_token_id: int, video_token_id: int, dtype: torch.dtype):
    """GraphSpec of the merge graph, verified against transformers' masked_scatter of image then video rows."""
    from torch.export import Dim

    from vlm_export.graphs.registry import GraphSpec

    hidden = embed_tokens.embedding_dim
    module = EmbeddingMerge(embed_tokens, [image_token_id, video_token_id])
    generator = torch.Generator().manual_seed(3)
    image_id, video_id = image_token_id, video_token_id

    def make(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(rows, dtype=torch.int64)
        n_visual = int(((ids == image_id) | (ids == video_id)).sum())
        visual = torch.randn(n_visual, hidden, generator=generator).to(dtype)
        return {"input_ids": ids, "visual_embeds": visual}

    example = make([[10, image_id, image_id, 11], [video_id, 12, 13, image_id]])
    verify = [
        make([[1, 2, video_id, video_id, image_id, 3], [image_id, 4, 5, 6, video_id, 7], [8] * 6]),
        make([[1, 2, 3]]),
    ]

    def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        ids, visual = feeds["input_ids"], feeds["visual_embeds"]
        flat = ids.reshape(-1)
        order = flat[(flat == image_id) | (flat == video_id)]
        image_rows, video_rows = visual[order == image_id], visual[order == video_id]
        embeds = embed_tokens(ids)
        image_mask = (ids == image_id)[..., None].expand_as(embeds)
        video_mask = (ids == video_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_rows)
        embeds = embeds.masked_scatter(video_mask, video_rows)
        return [embeds]

    batch, seq, n_visual = Dim("batch"), Dim("sequence"), Dim("num_visual_tokens")
    return GraphSpec(
        name="embedding",
        module=module,
        input_names=["input_ids", "visual_embeds"],
        output_names=["inputs_embeds"],
        example_args=(example["input_ids"], example["visual_embeds"]),
        dynamic_shapes=({0: batch, 1: seq}, {0: n_visual}),
        verify_feeds=verify,
        reference=reference,
        tolerance=0.0,
        input_axes={"input_ids": {0: "batch", 1: "sequence"}, "visual_embeds": {0: "num_visual_tokens"}},
        output_axes={"inputs_embeds": {0: "batch", 1: "sequence"}},
    )
