"""Qwen2.5-VL: vision encoder, embedding merge and decoder graphs.

The vision forward is transformers' `Qwen2_5_VisionTransformerPretrainedModel.forward` with every grid-
dependent tensor fed in (computed on the host by `runtime.families.qwen2_vl.vision_inputs`) and the per-segment
Python loop of its attention replaced by `graphs.attention.segment_attention`. Verification compares each graph
with transformers' own forward on inputs of other shapes than the traced example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from vlm_export.graphs.attention import vision_block_with_segments
from vlm_export.graphs.decoder import DecoderWithCache, decoder_spec
from vlm_export.graphs.depth import LayerSelection, ends, reduce_text_config
from vlm_export.graphs.embedding import embedding_spec
from vlm_export.graphs.patch_embed import patch_embed_as_linear
from vlm_export.graphs.registry import GraphSpec, register_graph_family
from vlm_export.runtime.families.qwen2_vl.family import qwen2_5_vl_vision_feeds
from vlm_export.runtime.families.qwen2_vl.preprocess import Qwen2VLImageConfig
from vlm_export.runtime.families.qwen2_vl.video import (
    QWEN2_VL_VIDEO_DEFAULTS,
    QwenVideoConfig,
    find_video_processor_dict,
)

VISION_INPUTS = [
    "pixel_values",
    "position_ids",
    "window_index",
    "reverse_window_index",
    "full_segment_index",
    "full_row_position",
    "window_segment_index",
    "window_row_position",
]


class Qwen2_5_VisionEncoder(nn.Module):
    """Patches + host-computed layout -> merged visual embeddings [N/merge^2, out_hidden]."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.full_layers = set(visual.config.fullatt_block_indexes)
        self.merge_unit = visual.spatial_merge_unit

    def _window_order(self, rows: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        grouped = rows.reshape(-1, self.merge_unit, rows.shape[-1])
        return grouped.index_select(0, window_index).reshape(rows.shape)

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        window_index: torch.Tensor,
        reverse_window_index: torch.Tensor,
        full_segment_index: torch.Tensor,
        full_row_position: torch.Tensor,
        window_segment_index: torch.Tensor,
        window_row_position: torch.Tensor,
    ) -> torch.Tensor:
        visual = self.visual
        hidden = patch_embed_as_linear(visual.patch_embed, pixel_values)
        hidden = self._window_order(hidden, window_index)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        cos = self._window_order(cos, window_index)
        sin = self._window_order(sin, window_index)
        for index, block in enumerate(visual.blocks):
            if index in self.full_layers:
                segments, positions = full_segment_index, full_row_position
            else:
                segments, positions = window_segment_index, window_row_position
            hidden = vision_block_with_segments(
                block, hidden, cos, sin, segments, positions, apply_rotary_pos_emb_vision
            )
        merged = visual.merger(hidden)
        return merged.index_select(0, reverse_window_index)


def vision_feeds(grid_thw: np.ndarray, vision_config: Any) -> dict[str, np.ndarray]:
    """Host-side vision inputs, computed by the runtime's own code so export and runtime cannot drift."""
    return qwen2_5_vl_vision_feeds(
        grid_thw,
        merge_size=vision_config.spatial_merge_size,
        window_size=vision_config.window_size,
        patch_size=vision_config.patch_size,
    )


def _patch_dim(vision_config: Any) -> int:
    vc = vision_config
    return vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size


def _vision_inputs(grids: list[list[int]], vision_config: Any, dtype: torch.dtype, seed: int):
    grid_thw = np.asarray(grids, dtype=np.int64)
    num_patches = int(grid_thw.prod(axis=1).sum())
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_patches, _patch_dim(vision_config), generator=generator).to(dtype)
    feeds = {"pixel_values": pixels}
    feeds.update({k: torch.from_numpy(v) for k, v in vision_feeds(grid_thw, vision_config).items()})
    return feeds, torch.from_numpy(grid_thw)


class Qwen2_5_VLGraphs:
    """Graph family for `qwen2_5_vl` checkpoints."""

    name = "qwen2_5_vl"
    model_types: tuple[str, ...] = ("qwen2_5_vl",)
    model_class: Any = Qwen2_5_VLForConditionalGeneration
    # The video processor AutoVideoProcessor builds for this family: class defaults and sampling rules.
    video_defaults: dict[str, Any] = QWEN2_VL_VIDEO_DEFAULTS
    video_sampler = "qwen2_vl"

    #: Checkpoint keys of the text layers and vision blocks, hub and transformers 5 layouts (depth reduction).
    text_layer_keys = r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
    vision_block_keys = r"^(?:model\.)?visual\.blocks\.(\d+)\."

    def reduce_depth(self, config: Any) -> list[LayerSelection]:
        """Keep the first and last text layers, and a window-attention and a full-attention vision block."""
        text_keep = ends(config.text_config.num_hidden_layers)
        reduce_text_config(config.text_config, text_keep)
        vc = config.vision_config
        full = list(vc.fullatt_block_indexes)
        vision_keep = sorted({0, full[0]}) if full else ends(vc.depth)
        if len(vision_keep) == 1 and vc.depth > 1:  # block 0 is a full-attention one: add a window block
            vision_keep = [0, 1]
        vc.fullatt_block_indexes = [vision_keep.index(i) for i in full if i in vision_keep]
        vc.depth = len(vision_keep)
        return [
            LayerSelection("text layers", self.text_layer_keys, text_keep),
            LayerSelection("vision blocks", self.vision_block_keys, vision_keep),
        ]

    def load_model(self, model_dir: Path, dtype: torch.dtype) -> nn.Module:
        model = self.model_class.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False, use_safetensors=True
        )
        return model.eval()

    # -- vision -----------------------------------------------------------------------------------
    def _vision_spec(self, model: nn.Module, dtype: torch.dtype) -> GraphSpec:
        visual = model.model.visual
        vc = visual.config
        example, _ = _vision_inputs([[1, 4, 6], [1, 8, 8]], vc, dtype, seed=0)
        verify = [
            _vision_inputs([[1, 10, 14]], vc, dtype, seed=1),
            _vision_inputs([[1, 6, 4], [2, 12, 10], [1, 2, 2]], vc, dtype, seed=2),
        ]
        patches, merged = Dim("num_patches"), Dim("num_merged")
        dyn = {
            "pixel_values": {0: patches},
            "position_ids": {0: patches},
            "window_index": {0: merged},
            "reverse_window_index": {0: merged},
            "full_segment_index": {0: Dim("num_full_segments"), 1: Dim("full_segment_len")},
            "full_row_position": {0: patches},
            "window_segment_index": {0: Dim("num_windows"), 1: Dim("window_len")},
            "window_row_position": {0: patches},
        }
        grids = {id(feeds["pixel_values"]): grid for feeds, grid in verify}

        def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            grid = grids[id(feeds["pixel_values"])]
            return [visual(feeds["pixel_values"], grid_thw=grid).pooler_output]

        return GraphSpec(
            name="vision_encoder",
            module=Qwen2_5_VisionEncoder(visual),
            input_names=list(VISION_INPUTS),
            output_names=["visual_embeds"],
            example_args=tuple(example[name] for name in VISION_INPUTS),
            dynamic_shapes=tuple(dyn[name] for name in VISION_INPUTS),
            verify_feeds=[feeds for feeds, _ in verify],
            reference=reference,
            tolerance=1e-4 if dtype == torch.float32 else 5e-2,
            input_axes={
                "pixel_values": {0: "num_patches"},
                "position_ids": {0: "num_patches"},
                "window_index": {0: "num_visual_tokens"},
                "reverse_window_index": {0: "num_visual_tokens"},
                "full_segment_index": {0: "num_full_segments", 1: "full_segment_len"},
                "full_row_position": {0: "num_patches"},
                "window_segment_index": {0: "num_windows", 1: "window_len"},
                "window_row_position": {0: "num_patches"},
            },
            output_axes={"visual_embeds": {0: "num_visual_tokens"}},
        )

    def _decoder(self, model: nn.Module, dtype: torch.dtype) -> GraphSpec:
        text = model.model.language_model
        return decoder_spec(DecoderWithCache(text, model.lm_head), text, model.lm_head, dtype)

    def graph_specs(self, model: nn.Module, dtype: torch.dtype) -> list[GraphSpec]:
        config = model.config
        embed = model.model.language_model.embed_tokens
        return [
            self._vision_spec(model, dtype),
            embedding_spec(embed, config.image_token_id, config.video_token_id, dtype),
            self._decoder(model, dtype),
        ]

    def _vision_section(self, vision_config: Any) -> dict[str, Any]:
        vc = vision_config
        return {
            "patch_size": vc.patch_size,
            "temporal_patch_size": vc.temporal_patch_size,
            "spatial_merge_size": vc.spatial_merge_size,
            "window_size": vc.window_size,
            "tokens_per_second": vc.tokens_per_second,
            "out_hidden_size": vc.out_hidden_size,
        }

    def _text_extras(self, text_config: Any) -> dict[str, Any]:
        return {}

    def manifest_section(self, model: nn.Module, image_processor: dict[str, Any]) -> dict[str, Any]:
        config = model.config
        tc = config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return {
            "preprocessing": {
                **Qwen2VLImageConfig.from_processor_dict(image_processor).to_dict(),
                "video": self._video_preprocessing(model),
            },
            "tokens": {
                "image_token_id": config.image_token_id,
                "video_token_id": config.video_token_id,
                "vision_start_token_id": config.vision_start_token_id,
            },
            "text": {
                "hidden_size": tc.hidden_size,
                "num_layers": tc.num_hidden_layers,
                "num_kv_heads": tc.num_key_value_heads,
                "head_dim": head_dim,
                "vocab_size": tc.vocab_size,
                "max_position_embeddings": tc.max_position_embeddings,
                "position_ids_shape": ["3", "batch", "sequence"],
                **self._text_extras(tc),
            },
            "vision": self._vision_section(config.vision_config),
        }

    def _video_preprocessing(self, model: nn.Module) -> dict[str, Any]:
        """Video processor settings from the model folder, resolved as ``AutoVideoProcessor.from_pretrained`` does
        (processor_config.json's ``video_processor``, video_preprocessor_config.json, preprocessor_config.json)."""
        folder = Path(model.name_or_path)
        found = find_video_processor_dict(folder) if folder.is_dir() else {}
        return QwenVideoConfig.from_processor_dict(found, self.video_defaults, self.video_sampler).to_dict()


register_graph_family(Qwen2_5_VLGraphs())
