"""LLaVA-OneVision video input on the host: frame sampling, frame preprocessing and video-feature pooling.

Reproduces transformers 5.24 without torch:

* sampling: ``BaseVideoProcessor.sample_frames`` / ``video_utils.default_sample_indices_fn`` — ``num_frames``
  frames at ``arange(n) * total // n``, or ``fps`` frames per second of video (``n = max(1, int(total / src_fps
  * fps))``); without either (and ``do_sample_frames`` off, the class default) every frame is used;
* frames: ``LlavaOnevisionVideoProcessor`` (a torchvision ``BaseVideoProcessor``): each frame squashed to
  ``size`` by ``tvF.resize(..., antialias=True)`` on uint8 tensors, which on a CPU runs PyTorch's integer
  kernel; ``runtime.video_resize`` reproduces it bit for bit (Pillow differs by a step on ~0.5% of values and
  by up to 5 steps when one side shrinks while the other grows); then the fused rescale + normalize in float32;
* pooling: ``LlavaOnevisionModel.apply_pooling`` (bilinear, ``align_corners=False``, P x P -> ceil(P/2) squared per
  frame) and ``get_video_features``' single ``image_newline`` row after the last frame of each video.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.llava_onevision.packing import bilinear_resize
from vlm_export.runtime.families.processor_values import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    config_from_manifest,
    three_floats,
)
from vlm_export.runtime.video_resize import resize_frames

__all__ = [
    "LlavaOnevisionVideoConfig",
    "num_video_tokens",
    "pool_video_features",
    "preprocess_frames",
    "sample_frame_indices",
]

_BILINEAR, _BICUBIC = 2, 3  # PIL.Image.Resampling values, as the processor configs store them
_MODES = {_BILINEAR: "bilinear", _BICUBIC: "bicubic"}  # torchvision's interpolation for each
# Class defaults of LlavaOnevisionVideoProcessor and BaseVideoProcessor (video_processing_llava_onevision.py).
_DEFAULTS: dict[str, Any] = {
    "size": {"height": 384, "width": 384},
    "resample": _BICUBIC,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_center_crop": None,
    "do_sample_frames": False,
    "num_frames": None,
    "fps": None,
}


@dataclass(frozen=True)
class LlavaOnevisionVideoConfig:
    """The video-processor settings the runtime needs; stored in manifest.json (``preprocessing.video``)."""

    size: tuple[int, int]  # (height, width) every frame is squashed to
    resample: int  # PIL.Image.Resampling value: 2 (bilinear) or 3 (bicubic), run as torchvision's antialiased resize
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    do_sample_frames: bool = False  # sample with num_frames / fps even when a request names neither
    num_frames: int | None = None  # default frame count when sampling
    fps: float | None = None  # default frames per second when sampling (num_frames wins when both are set)

    @property
    def resize_mode(self) -> str:
        """`runtime.video_resize` mode of `resample`."""
        return _MODES[self.resample]

    @classmethod
    def from_processor_dict(cls, d: Mapping[str, Any]) -> LlavaOnevisionVideoConfig:
        """Settings from a video-processor dict (``processor_config.json["video_processor"]``,
        ``video_preprocessor_config.json`` or, as transformers falls back to it, ``preprocessor_config.json``),
        missing keys taking ``LlavaOnevisionVideoProcessor``'s class defaults. Raises :class:`ExportError`."""
        if isinstance(d.get("video_processor"), Mapping):
            d = d["video_processor"]

        def get(key: str) -> Any:
            return d.get(key, _DEFAULTS[key])

        if get("do_center_crop"):
            raise ExportError("the video processor config sets do_center_crop; vlm-export does not support it")
        size = get("size")
        if isinstance(size, Mapping) and size.get("height") and size.get("width"):
            hw = (int(size["height"]), int(size["width"]))
        elif isinstance(size, list | tuple) and len(size) == 2:
            hw = (int(size[0]), int(size[1]))
        else:
            raise ExportError(
                f"unsupported video processor 'size' {size!r}: LLaVA-OneVision frames need {{'height', 'width'}}"
            )
        num_frames, fps = get("num_frames"), get("fps")
        try:
            cfg = cls(
                size=hw,
                resample=int(get("resample") if get("resample") is not None else _BILINEAR),
                image_mean=three_floats(get("image_mean")),
                image_std=three_floats(get("image_std")),
                rescale_factor=float(get("rescale_factor")),
                do_resize=bool(get("do_resize")),
                do_rescale=bool(get("do_rescale")),
                do_normalize=bool(get("do_normalize")),
                do_sample_frames=bool(get("do_sample_frames")),
                num_frames=None if num_frames is None else int(num_frames),
                fps=None if fps is None else float(fps),
            )
        except (TypeError, ValueError) as e:
            raise ExportError(f"unsupported LLaVA-OneVision video processor config: {e}") from e
        cfg._validate(ExportError)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key in ("size", "image_mean", "image_std"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlavaOnevisionVideoConfig:
        """Inverse of :meth:`to_dict`; a manifest missing a required field is refused rather than guessed."""
        cfg = config_from_manifest(
            cls,
            d,
            "video",
            {
                "size": lambda v: tuple(int(x) for x in v),
                "image_mean": three_floats,
                "image_std": three_floats,
                "resample": int,
                "rescale_factor": float,
            },
        )
        cfg._validate(ManifestError)
        return cfg

    def _validate(self, error: type[Exception]) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise error(f"video frame size {self.size} must be two positive numbers")
        if self.resample not in (_BILINEAR, _BICUBIC):
            raise error(f"video processor resample {self.resample} is not supported (2 = bilinear and 3 = bicubic are)")
        if self.do_normalize and 0.0 in self.image_std:
            raise error(f"video config image_std has a zero: {self.image_std}")
        if self.num_frames is not None and self.num_frames <= 0:
            raise error(f"video processor num_frames must be positive, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise error(f"video processor fps must be positive, got {self.fps}")


# ------------------------------------------------------------------------------------------------ sampling


def sample_frame_indices(
    total_frames: int,
    source_fps: float,
    cfg: LlavaOnevisionVideoConfig,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
) -> np.ndarray:
    """int64 indices of the frames to keep, as transformers picks them.

    A request's ``num_frames`` / ``fps`` (mutually exclusive, as in ``sample_frames``) turn sampling on, as
    ``apply_chat_template`` does; otherwise the config's ``do_sample_frames`` decides, with its defaults. No
    sampling keeps every frame. Raises :class:`InputError` for impossible requests.
    """
    if num_frames is not None and fps is not None:
        raise InputError("a video takes num_frames or fps, not both; drop one of them")
    for name, value in (("num_frames", num_frames), ("fps", fps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise InputError(f"video {name} must be a positive number, got {value!r}")
    if num_frames is not None and int(num_frames) != num_frames:
        raise InputError(f"video num_frames must be a whole number, got {num_frames!r}")
    sampling = num_frames is not None or fps is not None or cfg.do_sample_frames
    if not sampling:
        return np.arange(total_frames, dtype=np.int64)
    if num_frames is None and fps is None:
        num_frames, fps = cfg.num_frames, cfg.fps
    if num_frames is None and fps is not None:
        # default_sample_indices_fn: at least one frame for very short videos
        num_frames = max(1, int(total_frames / source_fps * fps))
    if num_frames is None:
        return np.arange(total_frames, dtype=np.int64)
    num_frames = int(num_frames)
    if num_frames > total_frames:
        raise InputError(
            f"asked for {num_frames} frames of a video that has {total_frames}; ask for at most {total_frames} "
            "frames or a lower fps"
        )
    return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


# ------------------------------------------------------------------------------------------------ frames


def _normalize_table(cfg: LlavaOnevisionVideoConfig) -> np.ndarray:
    """float32 [C, 256]: what ``rescale_and_normalize`` maps each uint8 level to, per channel.

    Rescale and normalize both on: fused into ``(x - m) / s`` with float32 ``m = mean * (1 / r)`` and
    ``s = std * (1 / r)`` (``_fuse_mean_std_and_rescale_factor``), subtracted and divided in float32
    (``tvF.normalize``); rescale alone is ``x * r`` in float32.
    """
    levels = np.arange(256, dtype=np.float32)[None, :]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    if cfg.do_normalize:
        if cfg.do_rescale:
            inverse = np.float32(1.0 / cfg.rescale_factor)
            mean, std = (mean * inverse).astype(np.float32), (std * inverse).astype(np.float32)
        return ((levels - mean) / std).astype(np.float32)
    if cfg.do_rescale:
        return np.broadcast_to(levels * np.float32(cfg.rescale_factor), (3, 256)).astype(np.float32)
    return np.broadcast_to(levels, (3, 256)).astype(np.float32)


def preprocess_frames(frames: np.ndarray, cfg: LlavaOnevisionVideoConfig) -> np.ndarray:
    """float32 ``[N, 3, H, W]``: ``LlavaOnevisionVideoProcessor``'s ``pixel_values_videos`` of one video, from its
    sampled uint8 RGB frames ``[N, h, w, 3]``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if cfg.do_resize:
        frames = resize_frames(frames, *cfg.size, mode=cfg.resize_mode)
    if frames.shape[1:3] != cfg.size:
        raise InputError(
            f"video frames are {frames.shape[2]}x{frames.shape[1]} but the vision tower takes "
            f"{cfg.size[1]}x{cfg.size[0]} and do_resize is off; resize the video"
        )
    table = _normalize_table(cfg)
    out = np.empty((frames.shape[0], 3, *frames.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = table[channel][frames[..., channel]]
    return out


# ------------------------------------------------------------------------------------------------ pooling


def pooled_side(patches_per_side: int) -> int:
    """Tokens per side of a pooled frame: ``ceil(P / 2)`` (``apply_pooling``)."""
    return math.ceil(patches_per_side / 2)


def num_video_tokens(num_frames: int, patches_per_side: int) -> int:
    """``<video>`` tokens of a video: ``frames * ceil(P/2)**2 + 1`` (``replace_video_token``)."""
    return num_frames * pooled_side(patches_per_side) ** 2 + 1


def pool_video_features(features: np.ndarray, patches_per_side: int, image_newline: np.ndarray) -> np.ndarray:
    """``[frames * ceil(P/2)**2 + 1, D]``: one video's per-frame projector outputs ``[frames, P*P, D]`` pooled
    as ``get_video_features`` does (bilinear P x P -> ceil(P/2) squared per frame, frames in order, row-major),
    then one ``image_newline`` row. Computes in float32 and keeps ``features.dtype``."""
    features = np.asarray(features)
    frames, tokens, dim = features.shape
    p = patches_per_side
    if tokens != p * p:
        raise ValueError(f"each frame has {tokens} feature rows but a {p}x{p} grid was expected")
    side = pooled_side(p)
    grid = features.reshape(frames, p, p, dim)
    pooled = [bilinear_resize(frame, (side, side)).reshape(side * side, dim) for frame in grid]
    newline = np.asarray(image_newline).reshape(1, dim)
    return np.concatenate([*pooled, newline.astype(np.float32)], axis=0).astype(features.dtype, copy=False)
