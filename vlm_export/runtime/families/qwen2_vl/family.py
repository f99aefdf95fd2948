"""Qwen2.5-VL on the host: images and videos -> patches and vision-graph layout, placeholder counts, 3D MRoPE
positions (videos scaled in time by ``second_per_grid_ts``)."""

from __future__ import annotations

import logging
import math
import os
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
    require_positive,
)
from vlm_export.runtime.families.qwen2_vl.preprocess import (
    Qwen2VLImageConfig,
    num_image_tokens,
    preprocess_images,
)
from vlm_export.runtime.families.qwen2_vl.rope_index import decode_position_ids, prefill_position_ids
from vlm_export.runtime.families.qwen2_vl.video import (
    QwenVideoConfig,
    VideoOptions,
    qwen2_vl_frame_size,
    qwen2_vl_sample_indices,
    video_patches,
)
from vlm_export.runtime.families.qwen2_vl.vision_inputs import qwen2_5_vl_vision_inputs
from vlm_export.runtime.families.video_budget import check_video_tokens, token_limit
from vlm_export.runtime.image_io import load_image
from vlm_export.runtime.segments import segment_layout
from vlm_export.runtime.video_io import VideoClip, VideoMetadata, load_video

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
    #: manifest.vision entries read on every request
    VISION_KEYS: tuple[str, ...] = ("spatial_merge_size", "window_size", "patch_size", "tokens_per_second")

    def __init__(self, manifest: Manifest, folder: Path):
        self.manifest = manifest
        self.vision = manifest.vision
        require_positive(self.vision, self.VISION_KEYS, "vision")
        self.tokens = manifest.tokens
        self.image_config = Qwen2VLImageConfig.from_dict(manifest.preprocessing)
        video = manifest.preprocessing.get("video")
        self.video_config = None if video is None else QwenVideoConfig.from_dict(video)
        limit = manifest.limits.max_image_pixels
        self.max_pixels = limit if limit and limit < self.image_config.max_pixels else None
        self._warned_resize = False

    def placeholder_token(self, kind: str) -> int:
        return int(self.tokens[f"{kind}_token_id"])

    def encode_media(self, items: list[MediaItem], per_conversation: list[int]) -> VisualBatch:
        """Images and videos of a batch in item order: one vision-graph call over all their patches.

        The vision tower encodes each image / frame group on its own, so one call over every item in conversation
        order gives the rows each placeholder run needs; the rope index gets the image and the video grids
        separately, as transformers keeps them (``image_grid_thw``, ``video_grid_thw``).
        """
        if not items:
            return VisualBatch(feeds={}, token_counts=[], kinds=[])
        patches: list[np.ndarray] = []
        grids: list[tuple[int, int, int]] = []
        videos: list[dict[str, Any]] = []
        for item in items:
            if item.kind == "video":
                pixels, grid, info = self.encode_video(item)
                videos.append({"grid": grid, **info})
            else:
                pixels, grid = self.encode_image(item)
            patches.append(pixels)
            grids.append(grid)
        grid_thw = np.asarray(grids, dtype=np.int64)
        merge = int(self.vision["spatial_merge_size"])
        feeds = {"pixel_values": np.concatenate(patches, axis=0), **self.vision_feeds(grid_thw)}
        image_grids = [g for g, item in zip(grids, items, strict=True) if item.kind != "video"]
        meta: dict[str, Any] = {
            "image_grid_thw": np.asarray(image_grids, dtype=np.int64) if image_grids else None,
            "video_grid_thw": np.asarray([v["grid"] for v in videos], dtype=np.int64) if videos else None,
            "videos": videos,
        }
        if videos and all("second_per_grid" in v for v in videos):  # Qwen2.5-VL's temporal rope scaling
            meta["second_per_grid_ts"] = [v["second_per_grid"] for v in videos]
        return VisualBatch(
            feeds=feeds,
            token_counts=num_image_tokens(grid_thw, merge),
            kinds=[item.kind for item in items],
            meta=meta,
        )

    def encode_image(self, item: MediaItem) -> tuple[np.ndarray, tuple[int, int, int]]:
        image = load_image(item.source)
        budget = self.max_pixels
        if budget is not None and not self._warned_resize and image.width * image.height > budget:
            logger.warning(
                "images above the export's pixel budget (%d pixels) are resized to fit; re-export with a "
                "larger --max-image-pixels to keep more detail",
                budget,
            )
            self._warned_resize = True
        visual = preprocess_images([image], self.image_config, max_pixels=self.max_pixels)
        return visual.pixel_values, tuple(int(v) for v in visual.grid_thw[0])

    # -- video ----------------------------------------------------------------------------------------
    def _video_config(self) -> QwenVideoConfig:
        if self.video_config is None:
            raise InputError(
                "this export has no video preprocessing settings (it was made by an older vlm-export); "
                "re-export the model to use video input"
            )
        return self.video_config

    def sample_indices(self, meta: VideoMetadata, options: VideoOptions) -> np.ndarray:
        """Frames the family's video processor samples (Qwen2VLVideoProcessor.sample_frames)."""
        return qwen2_vl_sample_indices(meta, self._video_config(), options)

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        return qwen2_vl_frame_size(num_frames, height, width, self._video_config())

    def check_video_tokens(self, name: str, meta: VideoMetadata, sampled: int, options: VideoOptions) -> None:
        """Refuse, from the headers alone, a video whose sampled frames need more tokens than the export takes."""
        cfg = self._video_config()
        merge, tps = cfg.merge_size, cfg.temporal_patch_size

        def tokens_for(count: int) -> int:
            original = (meta.height, meta.width)
            height, width = self.frame_size(count, *original) if cfg.do_resize else original
            grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
            return math.ceil(count / tps) * grid_h * grid_w // (merge * merge)

        sampling = "as asked" if options.samples else "the model's default sampling"
        if not (options.samples or cfg.do_sample_frames):
            sampling = "every frame: the model's default without fps or num_frames"
        check_video_tokens(name, meta, sampled, tokens_for, token_limit(self.manifest), sampling=sampling, step=tps)

    def video_info(self, clip: VideoClip) -> dict[str, Any]:
        """Timing the rope index needs: ``second_per_grid_ts = temporal_patch_size / sampled_fps``
        (Qwen2_5_VLProcessor._process_videos, with VideoMetadata.sampled_fps)."""
        meta = clip.metadata
        sampled_fps = len(clip.indices) / meta.total_frames * meta.fps
        return {"second_per_grid": self._video_config().temporal_patch_size / sampled_fps}

    def encode_video(self, item: MediaItem) -> tuple[np.ndarray, tuple[int, int, int], dict[str, Any]]:
        """Decode the sampled frames of one video, resize, normalize and patchify them like the video processor."""
        cfg = self._video_config()
        if not isinstance(item.source, str | os.PathLike):
            raise InputError(
                f"unsupported video source of type {type(item.source).__name__}: pass the path of a video file"
            )
        name = f"video {os.fspath(item.source)!r}"
        options = VideoOptions.from_item(item.options, name=name)

        def sample(meta: VideoMetadata) -> np.ndarray:
            indices = self.sample_indices(meta, options)
            self.check_video_tokens(name, meta, len(indices), options)  # before any frame is decoded
            return indices

        def resize(count: int, height: int, width: int) -> tuple[int, int, str] | None:
            return (*self.frame_size(count, height, width), cfg.resize_mode) if cfg.do_resize else None

        clip = load_video(item.source, sample, resize)
        original = clip.decoded_size or clip.frames.shape[1:3]
        size = self.frame_size(len(clip.frames), *original) if cfg.do_resize else None
        if size is not None and size != clip.frames.shape[1:3]:
            # the stream held fewer frames than its header said, and the size depends on the count: decode again
            clip = load_video(item.source, lambda meta: clip.indices, lambda *_: (*size, cfg.resize_mode))
        frames = clip.frames
        pixels, grid = video_patches(frames, size, cfg, name=name)
        info = self.video_info(clip)
        info["indices"] = clip.indices
        return pixels, grid, info

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
