"""Qwen3-VL and Qwen3-VL-MoE: vision encoder with DeepStack outputs, embedding merge, decoder with DeepStack.

Vision: transformers' `Qwen3VLVisionModel.forward` with the learned position embedding's bilinear interpolation
(indices and weights) and the rotary positions fed in from the host, and attention restricted to each frame
through `graphs.attention`. The DeepStack features (one per `deepstack_visual_indexes` layer) come out stacked as
`deepstack_embeds [L_ds, N/merge^2, H]`, rows in the same order as `visual_embeds`.

Decoder: the shared `DecoderWithCache`, plus `visual_pos_masks [B,S]` and `deepstack_embeds [L_ds,Nv,H]`
added to the hidden states of the first L_ds layers at visual positions (a gather, no boolean indexing: ONNX
Runtime rejects the broadcast the latter exports to). Decode steps pass an all-false mask and 0 rows.

MoE: the experts export in the form `--moe-form` picks (graphs/moe.py: ONNX Runtime's fused MoE kernel by
default, `dense` for TensorRT, `batched_mm`); none bakes in which experts the example hit, and the form is
recorded in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from vlm_export.graphs.attention import vision_block_with_segments
from vlm_export.graphs.decoder import DecoderWithCache, ExtraDecoderInputs, decoder_spec
from vlm_export.graphs.depth import LayerSelection, ends, reduce_text_config
from vlm_export.graphs.moe import apply_moe_form, moe_form
from vlm_export.graphs.patch_embed import patch_embed_as_linear
from vlm_export.graphs.qwen2_5_vl import Qwen2_5_VLGraphs
from vlm_export.graphs.registry import GraphSpec, register_graph_family
from vlm_export.runtime.families.qwen3_vl.family import qwen3_vl_vision_feeds
from vlm_export.runtime.families.qwen3_vl.video import QWEN3_VL_VIDEO_DEFAULTS

VISION_INPUTS = ["pixel_values", "position_ids", "interp_indices", "interp_weights", "segment_index", "row_position"]
DEFAULT_MOE_FORM = "ort_moe"  # the ONNX Runtime target; TensorRT needs "dense"


class Qwen3VisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.deepstack_layers = list(visual.deepstack_visual_indexes)

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        interp_indices: torch.Tensor,
        interp_weights: torch.Tensor,
        segment_index: torch.Tensor,
        row_position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        hidden = patch_embed_as_linear(visual.patch_embed, pixel_values)
        pos_embeds = (visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
        hidden = hidden + pos_embeds.to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        features = []
        for index, block in enumerate(visual.blocks):
            hidden = vision_block_with_segments(
                block, hidden, cos, sin, segment_index, row_position, apply_rotary_pos_emb_vision
            )
            if index in self.deepstack_layers:
                merger = visual.deepstack_merger_list[self.deepstack_layers.index(index)]
                features.append(merger(hidden))
        return visual.merger(hidden), torch.stack(features)


def add_deepstack(hidden: torch.Tensor, visual_pos_masks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`hidden[mask] += rows` as a gather: row k of `rows` goes to the k-th True of the flattened mask."""
    flat = visual_pos_masks.reshape(-1).to(torch.int64)
    index = torch.cumsum(flat, dim=0) * flat
    table = torch.cat([hidden.new_zeros((1, hidden.shape[-1])), rows.to(hidden.dtype)], dim=0)
    return hidden + table.index_select(0, index).reshape(hidden.shape)


class Qwen3DecoderWithCache(DecoderWithCache):
    def __init__(self, text_model: nn.Module, lm_head: nn.Module, num_deepstack: int):
        super().__init__(text_model, lm_head, layer_hook=self._deepstack_hook)
        self.num_deepstack = num_deepstack

    def _deepstack_hook(self, index: int, hidden: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        if index >= self.num_deepstack:
            return hidden
        return add_deepstack(hidden, extra["visual_pos_masks"], extra["deepstack_embeds"][index])

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_pos_masks: torch.Tensor,
        deepstack_embeds: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ):
        extra = {"visual_pos_masks": visual_pos_masks, "deepstack_embeds": deepstack_embeds}
        return self.run(inputs_embeds, position_ids, attention_mask, past_key_values, extra)


def _deepstack_inputs(num_deepstack: int, hidden: int) -> ExtraDecoderInputs:
    def make(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask = torch.rand(batch, seq, generator=generator) < 0.5
        if seq == 1:
            mask[:] = False  # decode steps carry no visual rows
        rows = torch.randn(num_deepstack, int(mask.sum()), hidden, generator=generator)
        return {"visual_pos_masks": mask, "deepstack_embeds": rows}

    def dynamic(batch: Any, seq: Any) -> dict[str, dict[int, Any]]:
        return {"visual_pos_masks": {0: batch, 1: seq}, "deepstack_embeds": {1: Dim("num_visual_tokens")}}

    def reference_kwargs(feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        mask, rows = feeds["visual_pos_masks"], feeds["deepstack_embeds"]
        if not bool(mask.any()):
            return {}
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(rows.unbind(0))}

    return ExtraDecoderInputs(
        names=["visual_pos_masks", "deepstack_embeds"],
        make=make,
        dynamic=dynamic,
        axes={
            "visual_pos_masks": {0: "batch", 1: "sequence"},
            "deepstack_embeds": {1: "num_visual_tokens"},
        },
        reference_kwargs=reference_kwargs,
    )


def _vision_inputs(grids: list[list[int]], vc: Any, dtype: torch.dtype, seed: int):
    grid_thw = np.asarray(grids, dtype=np.int64)
    num_patches = int(grid_thw.prod(axis=1).sum())
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    generator = torch.Generator().manual_seed(seed)
    feeds = {"pixel_values": torch.randn(num_patches, patch_dim, generator=generator).to(dtype)}
    host = qwen3_vl_vision_feeds(
        grid_thw,
        merge_size=vc.spatial_merge_size,
        num_grid_per_side=int(vc.num_position_embeddings**0.5),
    )
    for name, value in host.items():
        tensor = torch.from_numpy(value)
        feeds[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return feeds, torch.from_numpy(grid_thw)


class Qwen3VLGraphs(Qwen2_5_VLGraphs):
    """Graph family for `qwen3_vl` checkpoints (and, with MoE experts, `qwen3_vl_moe`)."""

    name = "qwen3_vl"
    model_types: tuple[str, ...] = ("qwen3_vl",)
    model_class: Any = Qwen3VLForConditionalGeneration
    video_defaults: dict[str, Any] = QWEN3_VL_VIDEO_DEFAULTS
    video_sampler = "qwen3_vl"
    deepstack_merger_keys = r"^(?:model\.)?visual\.deepstack_merger_list\.(\d+)\."

    def reduce_depth(self, config: Any) -> list[LayerSelection]:
        """Keep the first and last text layers, the first vision block and the first DeepStack tap."""
        text_keep = ends(config.text_config.num_hidden_layers)
        reduce_text_config(config.text_config, text_keep)
        vc = config.vision_config
        tap = vc.deepstack_visual_indexes[0]
        vision_keep = sorted({0, tap}) if vc.depth > 1 else [0]
        if len(vision_keep) == 1 and vc.depth > 1:
            vision_keep = [0, 1]
        vc.deepstack_visual_indexes = [vision_keep.index(tap)]
        vc.depth = len(vision_keep)
        return [
            LayerSelection("text layers", self.text_layer_keys, text_keep),
            LayerSelection("vision blocks", self.vision_block_keys, vision_keep),
            LayerSelection("DeepStack mergers", self.deepstack_merger_keys, [0]),
        ]

    def _vision_spec(self, model: nn.Module, dtype: torch.dtype) -> GraphSpec:
        visual = model.model.visual
        vc = visual.config
        example, _ = _vision_inputs([[1, 4, 6], [1, 8, 8]], vc, dtype, seed=0)
        verify = [
            _vision_inputs([[1, 10, 14]], vc, dtype, seed=1),
            _vision_inputs([[1, 6, 4], [2, 12, 10], [1, 2, 2]], vc, dtype, seed=2),
        ]
        patches = Dim("num_patches")
        dyn = {
            "pixel_values": {0: patches},
            "position_ids": {0: patches},
            "interp_indices": {0: patches},
            "interp_weights": {0: patches},
            "segment_index": {0: Dim("num_segments"), 1: Dim("segment_len")},
            "row_position": {0: patches},
        }
        grids = {id(feeds["pixel_values"]): grid for feeds, grid in verify}

        def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            out = visual(feeds["pixel_values"], grid_thw=grids[id(feeds["pixel_values"])])
            return [out.pooler_output, torch.stack(out.deepstack_features)]

        return GraphSpec(
            name="vision_encoder",
            module=Qwen3VisionEncoder(visual),
            input_names=list(VISION_INPUTS),
            output_names=["visual_embeds", "deepstack_embeds"],
            example_args=tuple(example[name] for name in VISION_INPUTS),
            dynamic_shapes=tuple(dyn[name] for name in VISION_INPUTS),
            verify_feeds=[feeds for feeds, _ in verify],
            reference=reference,
            tolerance=1e-4 if dtype == torch.float32 else 5e-2,
            input_axes={
                "pixel_values": {0: "num_patches"},
                "position_ids": {0: "num_patches"},
                "interp_indices": {0: "num_patches"},
                "interp_weights": {0: "num_patches"},
                "segment_index": {0: "num_segments", 1: "segment_len"},
                "row_position": {0: "num_patches"},
            },
            output_axes={"visual_embeds": {0: "num_visual_tokens"}, "deepstack_embeds": {1: "num_visual_tokens"}},
        )

    def _decoder(self, model: nn.Module, dtype: torch.dtype) -> GraphSpec:
        config = model.config
        text = model.model.language_model
        num_deepstack = len(config.vision_config.deepstack_visual_indexes)
        module = Qwen3DecoderWithCache(text, model.lm_head, num_deepstack)
        extra = _deepstack_inputs(num_deepstack, config.text_config.hidden_size)
        return decoder_spec(module, text, model.lm_head, dtype, extra=extra)

    def manifest_section(self, model: nn.Module, image_processor: dict[str, Any]) -> dict[str, Any]:
        section = super().manifest_section(model, image_processor)
        section["tokens"]["vision_end_token_id"] = model.config.vision_end_token_id
        return section

    def _vision_section(self, vision_config: Any) -> dict[str, Any]:
        vc = vision_config
        return {
            "patch_size": vc.patch_size,
            "temporal_patch_size": vc.temporal_patch_size,
            "spatial_merge_size": vc.spatial_merge_size,
            "num_grid_per_side": int(vc.num_position_embeddings**0.5),
            "num_deepstack_layers": len(vc.deepstack_visual_indexes),
            "out_hidden_size": vc.out_hidden_size,
        }


class Qwen3VLMoeGraphs(Qwen3VLGraphs):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = Qwen3VLMoeForConditionalGeneration
    options = ("moe_form",)

    def load_model(self, model_dir: Path, dtype: torch.dtype, moe_form: str = DEFAULT_MOE_FORM) -> nn.Module:
        model = super().load_model(model_dir, dtype)
        self.prepare_model(model, moe_form)
        return model

    def prepare_model(self, model: nn.Module, moe_form: str = DEFAULT_MOE_FORM) -> None:
        """The export options' changes to a built model (real or weightless)."""
        apply_moe_form(model, moe_form)  # transformers' default grouped_mm does not export (see graphs/moe.py)

    def _text_extras(self, text_config: Any) -> dict[str, Any]:
        return {
            "num_experts": text_config.num_experts,
            "num_experts_per_tok": text_config.num_experts_per_tok,
        }

    def manifest_section(self, model: nn.Module, image_processor: dict[str, Any]) -> dict[str, Any]:
        section = super().manifest_section(model, image_processor)
        section["text"]["moe_form"] = moe_form(model)
        return section


register_graph_family(Qwen3VLGraphs())
register_graph_family(Qwen3VLMoeGraphs())
