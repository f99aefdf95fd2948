"""Qwen3-VL / Qwen3-VL-MoE on the host: Qwen2.5-VL's image path with Qwen3-VL's vision inputs (interpolated
learned position embeddings, no windows), its rope index, and the DeepStack decoder inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm_export.runtime.families import MediaItem, VisualBatch, expand_with, register_runtime_family
from vlm_export.runtime.families.qwen2_vl.family import Qwen2_5_VLRuntime
from vlm_export.runtime.families.qwen2_vl.video import VideoOptions
from vlm_export.runtime.families.qwen3_vl.rope_index import decode_position_ids, prefill_position_ids
from vlm_export.runtime.families.qwen3_vl.video import (
    qwen3_vl_frame_size,
    qwen3_vl_sample_indices,
    qwen3_vl_timestamps,
    video_prompt,
)
from vlm_export.runtime.families.qwen3_vl.vision_inputs import qwen3_vl_vision_inputs
from vlm_export.runtime.segments import segment_layout
from vlm_export.runtime.video_io import VideoClip, VideoMetadata


def qwen3_vl_vision_feeds(grid_thw: np.ndarray, *, merge_size: int, num_grid_per_side: int) -> dict[str, np.ndarray]:
    """Every vision-graph input except pixel_values (see graphs/qwen3_vl.py): attention per frame."""
    base = qwen3_vl_vision_inputs(grid_thw, merge_size=merge_size, num_grid_per_side=num_grid_per_side)
    segment_index, row_position = segment_layout(base["cu_seqlens"])
    indices, weights = base["interp_indices"], base["interp_weights"]
    num_patches = base["position_ids"].shape[0]
    if indices.shape[0] != num_patches:  # [4, N] -> [N, 4], the layout the graph gathers with
        indices, weights = indices.T, weights.T
    return {
        "position_ids": base["position_ids"],
        "interp_indices": np.ascontiguousarray(indices, dtype=np.int64),
        "interp_weights": np.ascontiguousarray(weights, dtype=np.float32),
        "segment_index": segment_index,
        "row_position": row_position,
    }


@register_runtime_family("qwen3_vl")
@register_runtime_family("qwen3_vl_moe")
class Qwen3VLRuntime(Qwen2_5_VLRuntime):
    VISION_KEYS = ("spatial_merge_size", "num_grid_per_side", "num_deepstack_layers")

    def vision_feeds(self, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
        return qwen3_vl_vision_feeds(
            grid_thw,
            merge_size=int(self.vision["spatial_merge_size"]),
            num_grid_per_side=int(self.vision["num_grid_per_side"]),
        )

    # -- video: Qwen3VLVideoProcessor sampling and budget, Qwen3VLProcessor timestamps ------------------
    def sample_indices(self, meta: VideoMetadata, options: VideoOptions) -> np.ndarray:
        return qwen3_vl_sample_indices(meta, self._video_config(), options)

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        return qwen3_vl_frame_size(num_frames, height, width, self._video_config())

    def video_info(self, clip: VideoClip) -> dict[str, Any]:
        """Seconds of each temporal patch, written as ``<t seconds>`` before its frame tokens (no rope scaling)."""
        tps = self._video_config().temporal_patch_size
        return {"timestamps": qwen3_vl_timestamps(clip.indices, clip.metadata.fps, tps)}

    def expand_placeholders(
        self, text: str, items: list[MediaItem], visual: VisualBatch, offset: int, token_text: dict[str, str]
    ) -> str:
        """Images: the token run. Videos: per temporal patch ``<t seconds><|vision_start|>run<|vision_end|>``
        (Qwen3VLProcessor.replace_video_token), which splits each frame group into its own rope-index run."""
        merge = int(self.vision["spatial_merge_size"]) ** 2
        first_video = sum(kind == "video" for kind in visual.kinds[:offset])  # videos of earlier conversations
        videos = iter(visual.meta.get("videos", [])[first_video:])
        replacements = []
        for item, count in zip(items, visual.token_counts[offset : offset + len(items)], strict=True):
            if item.kind != "video":
                replacements.append(token_text[item.kind] * count)
                continue
            video = next(videos)
            _, height, width = video["grid"]
            replacements.append(video_prompt(video["timestamps"], height * width // merge, token_text["video"]))
        return expand_with(text, token_text, items, replacements)

    def prefill_positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: VisualBatch
    ) -> tuple[np.ndarray, Any]:
        return prefill_position_ids(
            input_ids,
            attention_mask,
            image_token_id=self.placeholder_token("image"),
            video_token_id=self.placeholder_token("video"),
            image_grid_thw=visual.meta.get("image_grid_thw"),
            video_grid_thw=visual.meta.get("video_grid_thw"),
            spatial_merge_size=int(self.vision["spatial_merge_size"]),
        )

    def decode_positions(self, attention_mask: np.ndarray, state: Any, num_new: int) -> np.ndarray:
        return decode_position_ids(attention_mask, state, num_new)

    def decoder_feeds(self, input_ids: np.ndarray, vision_outputs: dict[str, np.ndarray] | None) -> dict[str, Any]:
        if vision_outputs is None:  # decode step: generated tokens never carry DeepStack rows
            mask = np.zeros(input_ids.shape, dtype=bool)
        else:
            mask = np.isin(input_ids, [self.placeholder_token("image"), self.placeholder_token("video")])
        rows = None if vision_outputs is None else vision_outputs.get("deepstack_embeds")
        if rows is None:
            layers = int(self.vision["num_deepstack_layers"])
            hidden = int(self.manifest.text["hidden_size"])
            rows = np.zeros((layers, 0, hidden), dtype=np.float16 if self.manifest.dtype == "float16" else np.float32)
        return {"visual_pos_masks": mask, "deepstack_embeds": rows}
