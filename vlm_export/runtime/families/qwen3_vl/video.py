"""Qwen3-VL video specifics: ``Qwen3VLVideoProcessor``'s frame sampling and resize budget, and the per-frame
timestamps ``Qwen3VLProcessor`` writes into the prompt (transformers 5.24). The pixel path is Qwen2-VL's
(``families/qwen2_vl/video.py``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlm_export.errors import InputError
from vlm_export.runtime.families.qwen2_vl.video import QwenVideoConfig, VideoOptions
from vlm_export.runtime.video_io import VideoMetadata

__all__ = [
    "QWEN3_VL_VIDEO_DEFAULTS",
    "qwen3_vl_frame_size",
    "qwen3_vl_sample_indices",
    "qwen3_vl_timestamps",
    "video_prompt",
]

#: Class attributes of ``Qwen3VLVideoProcessor`` (video_processing_qwen3_vl.py).
QWEN3_VL_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_frames": 4,
    "max_frames": 768,
    "do_sample_frames": True,
    "fps": 2,
    "num_frames": None,
    "cap_pixels_per_frame": None,
    "max_video_tokens": 768,
    "pixels_override_size": False,  # BaseVideoProcessor keeps `size`; min_pixels / max_pixels keys do nothing
}

# Qwen3VLProcessor's defaults when the tokenizer names no vision_start / vision_end token.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def qwen3_vl_sample_indices(meta: VideoMetadata, cfg: QwenVideoConfig, options: VideoOptions) -> np.ndarray:
    """Frame indices ``Qwen3VLVideoProcessor.sample_frames`` picks: ``linspace(0, total - 1, n).round()``."""
    total = meta.total_frames
    if not (cfg.do_sample_frames or options.samples):
        return np.arange(total, dtype=np.int64)
    num_frames = options.num_frames if options.samples else cfg.num_frames
    fps = options.fps if options.samples else cfg.fps
    if num_frames is None and fps is not None:
        num_frames = int(total / meta.fps * fps)
        num_frames = min(max(num_frames, cfg.min_frames), cfg.max_frames, total)
    if num_frames is None:
        num_frames = min(max(total, cfg.min_frames), cfg.max_frames)
    if num_frames > total:
        # transformers' PyAV loader would silently keep fewer frames than the timestamps it writes.
        raise InputError(f"cannot sample {num_frames} frames from a video with {total} frames; ask for fewer frames")
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def qwen3_vl_frame_size(num_frames: int, height: int, width: int, cfg: QwenVideoConfig) -> tuple[int, int]:
    """Resized (height, width) as ``Qwen3VLVideoProcessor.resize`` computes it (the budget spans all frames)."""
    factor, temporal = cfg.factor, cfg.temporal_patch_size
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.max_video_tokens * factor * factor
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if num_frames < temporal:
        raise InputError(
            f"the video gave {num_frames} frame(s), fewer than the {temporal} frames of one temporal patch that "
            "Qwen3-VL needs; pass a longer video or a higher num_frames"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"video frames of {width}x{height} pixels have an aspect ratio above 200, which Qwen3-VL refuses"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen3_vl_timestamps(indices: np.ndarray, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: ``Qwen3VLProcessor._calculate_timestamps`` (pad the indices to whole
    patches with the last one, then average the first and last frame time of each patch)."""
    values = [int(i) for i in indices]
    if len(values) % temporal_patch_size:
        values.extend(values[-1] for _ in range(temporal_patch_size - len(values) % temporal_patch_size))
    seconds = [index / fps for index in values]
    return [
        (seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in range(0, len(seconds), temporal_patch_size)
    ]


def video_prompt(timestamps: list[float], tokens_per_frame: int, video_token: str) -> str:
    """What ``Qwen3VLProcessor.replace_video_token`` puts in place of one ``<|video_pad|>``."""
    return "".join(
        f"<{seconds:.1f} seconds>{VISION_START}{video_token * tokens_per_frame}{VISION_END}" for seconds in timestamps
    )
