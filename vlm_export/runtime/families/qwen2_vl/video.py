"""Qwen2-VL / Qwen2.5-VL video preprocessing in numpy: transformers 5.24's ``Qwen2VLVideoProcessor`` without torch.

A video goes: PyAV decode of the sampled frames (:mod:`vlm_export.runtime.video_io`), ``smart_resize`` under the
video pixel budget, torch's antialiased uint8 bicubic resize (:mod:`vlm_export.runtime.video_resize`, bit-exact),
the fused rescale + normalize of transformers' torchvision backend (``(x - 255*mean) / (255*std)`` in float32),
and the same patch layout as images, with an odd frame count padded by repeating the last frame. Qwen2.5-VL also
needs ``second_per_grid_ts = temporal_patch_size / sampled_fps`` for its rope index.

:class:`QwenVideoConfig` holds the processor settings; the exporter resolves them from the model folder the way
``AutoVideoProcessor`` does and writes them into the manifest (``preprocessing["video"]``). Qwen3-VL shares the
config and the pixel path; its sampling, resize budget and timestamps live in ``families/qwen3_vl/video.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.processor_values import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    config_from_manifest,
    three_floats,
)
from vlm_export.runtime.families.qwen2_vl.preprocess import patchify, smart_resize
from vlm_export.runtime.video_io import VideoMetadata
from vlm_export.runtime.video_resize import resize_frames

__all__ = [
    "QWEN2_VL_VIDEO_DEFAULTS",
    "QwenVideoConfig",
    "VideoOptions",
    "normalize_frames",
    "qwen2_vl_frame_size",
    "qwen2_vl_sample_indices",
    "torch_arange_indices",
    "video_patches",
]

logger = logging.getLogger(__name__)

_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values transformers maps to torchvision

#: Class attributes of ``Qwen2VLVideoProcessor`` (video_processing_qwen2_vl.py) and ``BaseVideoProcessor``.
QWEN2_VL_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_frames": 4,
    "max_frames": 768,
    "do_sample_frames": False,
    "fps": None,
    "num_frames": None,
    "cap_pixels_per_frame": None,
    "max_video_tokens": 128000,
    # Qwen2VLVideoProcessor.__init__ lets top-level min_pixels / max_pixels override size (backward compat).
    "pixels_override_size": True,
}


@dataclass(frozen=True)
class QwenVideoConfig:
    """The video-processor settings the runtime needs; stored in manifest.json under ``preprocessing["video"]``."""

    sampler: str  # "qwen2_vl" or "qwen3_vl": which processor's sampling and resize budget apply
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int  # size["shortest_edge"]
    max_pixels: int  # size["longest_edge"]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    resample: int
    do_sample_frames: bool
    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def resize_mode(self) -> str:
        return _RESAMPLE_MODES[self.resample]

    @classmethod
    def from_processor_dict(cls, d: Mapping[str, Any], defaults: Mapping[str, Any], sampler: str) -> QwenVideoConfig:
        """Settings from a video-processor dict resolved like transformers 5.24 (missing keys: class defaults).

        ``d`` is what ``AutoVideoProcessor`` reads: ``processor_config.json["video_processor"]``, else
        ``video_preprocessor_config.json``, else ``preprocessor_config.json`` (see :func:`find_video_processor_dict`).
        Problems raise :class:`ExportError`.
        """

        def get(key: str) -> Any:
            return d[key] if key in d else defaults[key]

        size = d.get("size")
        size = dict(defaults["size"]) if size is None else dict(size)
        if defaults.get("pixels_override_size"):
            if d.get("min_pixels") is not None:
                size["shortest_edge"] = d["min_pixels"]
            if d.get("max_pixels") is not None:
                size["longest_edge"] = d["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ExportError(f"video processor size {size!r} lacks 'shortest_edge'/'longest_edge'")
        try:
            resample = int(get("resample"))
            if resample not in _RESAMPLE_MODES:
                raise ValueError(f"resample={resample} (only bilinear=2 and bicubic=3 are supported for video)")
            fps, num_frames = get("fps"), get("num_frames")
            cfg = cls(
                sampler=sampler,
                patch_size=int(get("patch_size")),
                temporal_patch_size=int(get("temporal_patch_size")),
                merge_size=int(get("merge_size")),
                min_pixels=int(size["shortest_edge"]),
                max_pixels=int(size["longest_edge"]),
                image_mean=three_floats(get("image_mean")),
                image_std=three_floats(get("image_std")),
                rescale_factor=float(get("rescale_factor")),
                do_resize=bool(get("do_resize")),
                do_rescale=bool(get("do_rescale")),
                do_normalize=bool(get("do_normalize")),
                resample=resample,
                do_sample_frames=bool(get("do_sample_frames")),
                fps=None if fps is None else float(fps),
                num_frames=None if num_frames is None else int(num_frames),
                min_frames=int(get("min_frames")),
                max_frames=int(get("max_frames")),
                cap_pixels_per_frame=bool(get("cap_pixels_per_frame")),
                max_video_tokens=int(get("max_video_tokens")),
            )
        except (TypeError, ValueError) as e:
            raise ExportError(f"unsupported video processor config: {e}") from e
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QwenVideoConfig:
        """Inverse of :meth:`to_dict`; a manifest missing a field is refused rather than guessed."""
        cfg = config_from_manifest(cls, d, "video", {"image_mean": three_floats, "image_std": three_floats})
        if cfg.resample not in _RESAMPLE_MODES:
            raise ManifestError(f"bad video config in manifest: resample {cfg.resample}; re-export the model")
        return cfg


@dataclass(frozen=True)
class VideoOptions:
    """Per-video sampling options from the message part (``{"type": "video", ..., "fps": 1}``), as transformers'
    ``apply_chat_template(..., fps=1)`` / ``num_frames=8`` would apply them (they switch frame sampling on)."""

    fps: float | None = None
    num_frames: int | None = None

    @classmethod
    def from_item(cls, options: Mapping[str, Any], name: str = "video") -> VideoOptions:
        fps, num_frames = options.get("fps"), options.get("num_frames")
        if unknown := sorted(set(options) - {"fps", "num_frames"}):
            logger.warning("%s: ignoring options %s (video parts take fps or num_frames)", name, ", ".join(unknown))
        if fps is not None and num_frames is not None:
            raise InputError(f"{name}: give either fps or num_frames, not both (they are mutually exclusive)")
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
                raise InputError(f"{name}: fps must be a positive number, got {fps!r}")
            fps = float(fps)
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0
        ):
            raise InputError(f"{name}: num_frames must be a positive integer, got {num_frames!r}")
        return cls(fps=fps, num_frames=num_frames)

    @property
    def samples(self) -> bool:
        return self.fps is not None or self.num_frames is not None


def torch_arange_indices(total: int, step: float) -> np.ndarray:
    """``torch.arange(0, total, step).int()`` with a python-float step (float32 result, truncated).

    torch sizes the range as ``ceil(total / step)`` in float64 and computes ``step * i`` in float64 before storing
    float32, so this is exact, including the odd case where rounding adds one more element.
    """
    size = math.ceil(float(total) / step)
    values = (step * np.arange(size, dtype=np.float64)).astype(np.float32)
    return values.astype(np.int32).astype(np.int64)


def qwen2_vl_sample_indices(meta: VideoMetadata, cfg: QwenVideoConfig, options: VideoOptions) -> np.ndarray:
    """Frame indices ``Qwen2VLVideoProcessor.sample_frames`` picks (or every frame when sampling is off)."""
    total = meta.total_frames
    if not (cfg.do_sample_frames or options.samples):
        if total > cfg.max_frames:
            logger.warning(
                "using all %d frames of the video, as transformers' Qwen2VLVideoProcessor does without fps or "
                "num_frames; pass {'type': 'video', ..., 'fps': 2} (vlm-run --fps 2) to sample fewer",
                total,
            )
        return np.arange(total, dtype=np.int64)
    tps = cfg.temporal_patch_size
    num_frames = options.num_frames if options.samples else cfg.num_frames
    fps = options.fps if options.samples else cfg.fps
    if num_frames is not None:
        num_frames = round(num_frames / tps) * tps
    elif fps is not None:
        max_frames = math.floor(min(cfg.max_frames, total) / tps) * tps
        wanted = total / meta.fps * fps
        wanted = min(max(wanted, cfg.min_frames), max_frames, total)
        num_frames = math.floor(wanted / tps) * tps
    else:
        return np.arange(total, dtype=np.int64)
    if num_frames > total:
        raise InputError(
            f"cannot sample {num_frames} frames from a video with {total} frames; ask for fewer frames or a lower fps"
        )
    if num_frames <= 0:
        raise InputError(
            f"a video of {total} frames is too short to sample whole temporal patches of {tps} frames; "
            "pass a longer video or set num_frames"
        )
    return torch_arange_indices(total, total / num_frames)


def qwen2_vl_frame_size(num_frames: int, height: int, width: int, cfg: QwenVideoConfig) -> tuple[int, int]:
    """Resized (height, width) as ``Qwen2VLVideoProcessor.resize`` computes it, per-frame cap included."""
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        total_pixels = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
        max_pixels = max(
            min(max_pixels, total_pixels * cfg.temporal_patch_size // num_frames), int(cfg.min_pixels * 1.05)
        )
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, max_pixels)


def normalize_frames(frames: np.ndarray, cfg: QwenVideoConfig) -> np.ndarray:
    """float32 ``[T, C, H, W]`` from uint8 ``[T, H, W, C]`` with the torchvision backend's fused arithmetic.

    ``TorchvisionBackend.rescale_and_normalize`` folds the rescale into float32 mean/std
    (``float32(mean) * float32(1 / rescale_factor)``), then subtracts and divides in float32.
    """
    chw = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        if cfg.do_rescale:
            scale = np.float32(1.0 / cfg.rescale_factor)
            mean, std = mean * scale, std * scale
        out = chw.astype(np.float32)
        out -= mean[None, :, None, None]
        out /= std[None, :, None, None]
        return out
    if cfg.do_rescale:
        return chw.astype(np.float32) * np.float32(cfg.rescale_factor)
    return chw.astype(np.float32)


def video_patches(frames: np.ndarray, size: tuple[int, int] | None, cfg: QwenVideoConfig, name: str = "video"):
    """Resize (when ``size`` is given), normalize and patchify sampled uint8 ``[T, H, W, 3]`` frames.

    Returns ``(patches [gt*gh*gw, 3*tps*p*p] float32, (gt, gh, gw))``; an odd frame count is padded by
    repeating the last frame, as ``Qwen2VLVideoProcessor.patchify`` does.
    """
    if size is not None and size != frames.shape[1:3]:
        frames = resize_frames(frames, size[0], size[1], cfg.resize_mode)
    pixels = normalize_frames(frames, cfg)
    return patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size, name=name)


def find_video_processor_dict(folder: Any) -> dict[str, Any]:
    """The dict ``AutoVideoProcessor.from_pretrained(folder)`` builds from (transformers 5.24's precedence):
    ``processor_config.json["video_processor"]``, then ``video_preprocessor_config.json``, then
    ``preprocessor_config.json``; ``{}`` (class defaults) when there is none."""
    import json
    from pathlib import Path

    folder = Path(folder)

    def read(name: str) -> dict[str, Any] | None:
        path = folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"cannot read {path}: {e}") from None

    processor = read("processor_config.json")
    if processor is not None and isinstance(processor.get("video_processor"), dict):
        return processor["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        found = read(name)
        if found is not None:
            return found
    return {}
