"""Qwen2.5-VL on the host: images -> patches and vision-graph layout, placeholder counts, 3D MRoPE positions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import InputError
from vlm_export.manifest import Manifest
from vlm_export.runtime.families import (
    MediaItem,
    VisualBatch,
    expand_in_order,
    register_runtime_family,
)
from vlm_export.runtime.families.qwen2_vl.preprocess import (
    Qwen2VLImageConfig,
    num_image_tokens,
    preprocess_images,
)
from vlm_export.runtime.families.qwen2_vl.rope_index import decode_position_ids, prefill_position_ids
from vlm_export.runtime.families.qwen2_vl.vision_inputs import qwen2_5_vl_vision_inputs
from vlm_export.runtime.image_io import load_image
from vlm_export.runtime.segments import segment_layout

logger = logging.getLogger(__name__)


def qwen2_5_vl_vision_feeds(
    grid_thw: np.ndarray, *, merge_size: int, window_size: int, patch_size: int
) -> dict[str, np.ndarray]:
    """Every vision-graph input except pixel_values (see graphs/qwen2_5_vl.py for how each is used)."""
    base = qwen2_5_vl_vision_inputs(grid_thw, merge_size=merge_size, window_size=window_size, patch_size=patch_size)
    full_index, full_position = segment_layout(base["cu_seqlens"])
    window_table, window_position = segment_layout(base["cu_window_seqlens"])
    return {
        "position_ids": base["position_ids"],
        "window_index": base["window_index"],
        "reverse_window_index": np.argsort(base["window_index"], kind="stable").astype(np.int64),
        "full_segment_index": full_index,
        "full_row_position": full_position,
        "window_segment_index": window_table,
        "window_row_position": window_position,
    }


@register_runtime_family("qwen2_5_vl")
class Qwen2_5_VLRuntime:
    def __init__(self, manifest: Manifest, folder: Path):
        self.manifest = manifest
        self.vision = manifest.vision
        self.tokens = manifest.tokens
        self.image_config = Qwen2VLImageConfig.from_dict(manifest.preprocessing)
        limit = manifest.limits.max_image_pixels
        self.max_pixels = limit if limit and limit < self.image_config.max_pixels else None
        self._warned_resize = False

    def placeholder_token(self, kind: str) -> int:
        return int(self.tokens[f"{kind}_token_id"])

    def encode_media(self, items: list[MediaItem], per_conversation: list[int]) -> VisualBatch:
        if not items:
            return VisualBatch(feeds={}, token_counts=[], kinds=[])
        videos = [item for item in items if item.kind == "video"]
        if videos:
            raise InputError("video input is not supported by this version of vlm-export yet; pass images")
        images = [load_image(item.source) for item in items]
        budget = self.max_pixels
        if budget is not None and not self._warned_resize and any(i.width * i.height > budget for i in images):
            logger.warning(
                "images above the export's pixel budget (%d pixels) are resized to fit; re-export with a "
                "larger --max-image-pixels to keep more detail",
                budget,
            )
            self._warned_resize = True
        visual = preprocess_images(images, self.image_config, max_pixels=self.max_pixels)
        merge = int(self.vision["spatial_merge_size"])
        feeds = {"pixel_values": visual.pixel_values, **self.vision_feeds(visual.grid_thw)}
        counts = num_image_tokens(visual.grid_thw, merge)
        return VisualBatch(
            feeds=feeds,
            token_counts=list(counts),
            kinds=[item.kind for item in items],
            meta={"image_grid_thw": visual.grid_thw},
        )

    def vision_feeds(self, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
        """Grid-dependent vision-graph inputs (everything but the pixels)."""
        return qwen2_5_vl_vision_feeds(
            grid_thw,
            merge_size=int(self.vision["spatial_merge_size"]),
            window_size=int(self.vision["window_size"]),
            patch_size=int(self.vision["patch_size"]),
        )

    def expand_placeholders(
        self, text: str, items: list[MediaItem], visual: VisualBatch, offset: int, token_text: dict[str, str]
    ) -> str:
        counts = visual.token_counts[offset : offset + len(items)]
        return expand_in_order(text, token_text, items, counts)

    def prefill_positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: VisualBatch
    ) -> tuple[np.ndarray, Any]:
        grid = visual.meta.get("image_grid_thw")
        position_ids, rope_deltas = prefill_position_ids(
            input_ids,
            attention_mask,
            image_token_id=self.placeholder_token("image"),
            video_token_id=self.placeholder_token("video"),
            image_grid_thw=grid,
            video_grid_thw=visual.meta.get("video_grid_thw"),
            second_per_grid_ts=visual.meta.get("second_per_grid_ts"),
            spatial_merge_size=int(self.vision["spatial_merge_size"]),
            tokens_per_second=float(self.vision["tokens_per_second"]),
        )
        return position_ids, rope_deltas

    def decode_positions(self, attention_mask: np.ndarray, state: Any, num_new: int) -> np.ndarray:
        return decode_position_ids(attention_mask, state, num_new)

    def postprocess_vision(self, outputs: dict[str, np.ndarray], visual: VisualBatch) -> dict[str, np.ndarray]:
        return outputs

    def decoder_feeds(self, input_ids: np.ndarray, vision_outputs: dict[str, np.ndarray] | None) -> dict[str, Any]:
        return {}
