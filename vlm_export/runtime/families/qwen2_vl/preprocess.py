"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL image preprocessing in numpy + Pillow.

Reproduces transformers 5.24's ``Qwen2VLImageProcessorPil``
(transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py) operation for operation, so pixel values
agree bit for bit: ``smart_resize`` to a multiple of ``patch_size * merge_size``, a Pillow resize of the
uint8 RGB image (BICUBIC by default), ``rescale`` computed in float64 and stored as float32, ``normalize``
in float32, then the patch layout the vision tower expects. No torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.processor_values import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    config_from_manifest,
    three_floats,
)
from vlm_export.runtime.image_io import convert_to_rgb, describe_source

__all__ = [
    "Qwen2VLImageConfig",
    "VisualInputs",
    "grid_for_size",
    "normalize",
    "num_image_tokens",
    "patchify",
    "preprocess_images",
    "smart_resize",
]

# Class defaults of Qwen2VLImageProcessorPil (image_processing_pil_qwen2_vl.py, lines 89-100).
_DEFAULTS: dict[str, Any] = {
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": int(PIL.Image.Resampling.BICUBIC),
}
_DEFAULT_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Qwen2VLImageConfig:
    """The image-processor settings the runtime needs; stored in manifest.json by the exporter."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    do_convert_rgb: bool
    resample: int = int(PIL.Image.Resampling.BICUBIC)  # a PIL.Image.Resampling value, as in the hub config

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor_dict(cls, d: Mapping[str, Any]) -> Qwen2VLImageConfig:
        """Settings from an image-processor dict, resolved the way transformers 5.24 resolves them.

        ``d`` is ``preprocessor_config.json`` (hub layout), ``processor_config.json["image_processor"]``
        (transformers v5 layout) or the whole ``processor_config.json``. As in
        ``Qwen2VLImageProcessorPil.__init__`` (lines 104-114): ``size`` (default
        ``{"shortest_edge": 3136, "longest_edge": 1003520}``) gives min/max pixels and top-level
        ``min_pixels`` / ``max_pixels`` override it unless null. Other missing keys take the class defaults;
        explicit nulls do not (see below). Problems raise :class:`ExportError`.
        """
        if isinstance(d.get("image_processor"), Mapping):
            d = d["image_processor"]
        # A missing key takes the class default, but an explicit null does not:
        # ImageProcessingMixin.__init__ sets it as an instance attribute first (image_processing_base.py,
        # lines 77-79), so a null flag is off and a null setting in use makes transformers fail: refuse it.
        flags = {k: bool(d.get(k, _DEFAULTS[k])) for k in ("do_resize", "do_rescale", "do_normalize")}
        used_by = {"image_mean": "do_normalize", "image_std": "do_normalize", "rescale_factor": "do_rescale"}
        used_by["resample"] = "do_resize"

        def get(key: str) -> Any:
            value = d.get(key, _DEFAULTS[key])
            if value is None:
                if key in used_by and not flags[used_by[key]]:
                    return _DEFAULTS[key]
                raise ExportError(f"image processor config sets {key} to null; transformers cannot run with it")
            return value

        size = d.get("size")
        size = dict(_DEFAULT_SIZE) if size is None else size
        if isinstance(size, Mapping):
            size = dict(size)
        else:
            raise ExportError(
                f"unsupported image processor 'size' {size!r}: Qwen2-VL needs "
                '{"shortest_edge": min_pixels, "longest_edge": max_pixels}'
            )
        if d.get("min_pixels") is not None:
            size["shortest_edge"] = d["min_pixels"]
        if d.get("max_pixels") is not None:
            size["longest_edge"] = d["max_pixels"]
        # Legacy {"min_pixels", "max_pixels"} size dicts are valid SizeDicts in transformers but make its
        # resize fail; reading them costs nothing.
        min_pixels = size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = size.get("longest_edge") or size.get("max_pixels")
        if not min_pixels or not max_pixels:
            raise ExportError(
                f"image processor size {size!r} lacks 'shortest_edge'/'longest_edge' (or "
                "min_pixels/max_pixels); transformers' Qwen2-VL processor cannot resize with it"
            )
        try:
            cfg = cls(
                patch_size=int(get("patch_size")),
                temporal_patch_size=int(get("temporal_patch_size")),
                merge_size=int(get("merge_size")),
                min_pixels=int(min_pixels),
                max_pixels=int(max_pixels),
                image_mean=three_floats(get("image_mean")),
                image_std=three_floats(get("image_std")),
                rescale_factor=float(get("rescale_factor")),
                do_convert_rgb=bool(d.get("do_convert_rgb", _DEFAULTS["do_convert_rgb"])),
                **flags,
                resample=int(get("resample")),
            )
        except (TypeError, ValueError) as e:
            raise ExportError(f"unsupported Qwen2-VL image processor config: {e}") from e
        cfg._validate(ExportError)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Qwen2VLImageConfig:
        """Inverse of :meth:`to_dict`; a manifest missing a field is refused rather than guessed."""
        convert = {"image_mean": three_floats, "image_std": three_floats, "rescale_factor": float}
        convert.update(
            dict.fromkeys(
                ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "resample"), int
            )
        )
        cfg = config_from_manifest(cls, d, "image", convert)
        cfg._validate(ManifestError)
        return cfg

    def _validate(self, error: type[Exception]) -> None:
        for n in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, n) <= 0:
                raise error(f"image config {n} must be positive, got {getattr(self, n)}")
        if self.do_normalize and 0.0 in self.image_std:
            raise error(f"image config image_std has a zero: {self.image_std}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the processor resizes to: multiples of ``factor`` with a pixel count kept in
    [min_pixels, max_pixels] and the aspect ratio kept as far as possible.

    Same arithmetic as transformers' ``smart_resize`` (image_processing_pil_qwen2_vl.py, lines 58-84),
    including its refusal of aspect ratios above 200, raised here as :class:`InputError`.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image of {width}x{height} pixels is empty; pass an image with pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > _MAX_ASPECT_RATIO:
        raise InputError(
            f"image of {width}x{height} pixels has aspect ratio {ratio:.1f}, above the limit of "
            f"{_MAX_ASPECT_RATIO} that Qwen2-VL's processor accepts; crop or pad it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_for_size(
    height: int, width: int, cfg: Qwen2VLImageConfig, *, max_pixels: int | None = None
) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of one image of this size, without touching pixels (token budgeting)."""
    if cfg.do_resize:
        height, width = smart_resize(
            height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels if max_pixels is None else max_pixels
        )
    return 1, height // cfg.patch_size, width // cfg.patch_size


@dataclass
class VisualInputs:
    """What the vision encoder takes for a list of images, in the processor's layout."""

    pixel_values: np.ndarray  # float32 [total_patches, C * temporal_patch_size * patch_size**2]
    grid_thw: np.ndarray  # int64 [n_images, 3]


def preprocess_images(
    images: Sequence[PIL.Image.Image], cfg: Qwen2VLImageConfig, *, max_pixels: int | None = None
) -> VisualInputs:
    """Patches and grids for ``images``, concatenated in order, equal to ``Qwen2VLImageProcessorPil``'s.

    ``max_pixels`` replaces ``cfg.max_pixels`` for this call (e.g. the pixel cap of a TensorRT profile): the
    images are resized as the processor would resize them with that ``max_pixels``. Like the processor's,
    the result can still exceed it (min_pixels wins over max_pixels, and a very thin image keeps at least
    one factor per side), so a hard cap must be checked on ``grid_thw`` (or :func:`grid_for_size`).
    Pass images from :func:`vlm_export.runtime.image_io.load_image` (arrays, paths and bytes go there).
    """
    if max_pixels is not None and max_pixels <= 0:
        raise InputError(f"max_pixels must be positive, got {max_pixels}")
    limit = cfg.max_pixels if max_pixels is None else max_pixels
    patch_dim = 3 * cfg.temporal_patch_size * cfg.patch_size**2
    all_patches: list[np.ndarray] = []
    grids: list[tuple[int, int, int]] = []
    for image in images:
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"preprocess_images takes PIL images, got {type(image).__name__}; convert with load_image()"
            )
        chw = _to_chw_uint8(image, cfg, limit)
        frame = normalize(chw, cfg)
        patches, grid = patchify(
            frame[None], cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size, name=describe_source(image)
        )
        all_patches.append(patches)
        grids.append(grid)
    if not all_patches:
        return VisualInputs(np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64))
    return VisualInputs(np.concatenate(all_patches, axis=0), np.array(grids, dtype=np.int64))


def _to_chw_uint8(image: PIL.Image.Image, cfg: Qwen2VLImageConfig, max_pixels: int) -> np.ndarray:
    """RGB conversion and resize, as ``PilBackend.process_image`` + ``Qwen2VLImageProcessorPil.resize``.

    transformers turns the image into a CHW uint8 array, then its PIL resize turns it straight back into an
    identical PIL image; resizing the PIL image directly is the same computation.
    """
    name = describe_source(image)
    if cfg.do_convert_rgb:
        image = convert_to_rgb(image, name=name)
    elif image.mode != "RGB":
        # transformers would pass np.array(image) on, which only works out for 3-channel 8-bit images.
        raise InputError(f"image {name} is not RGB and do_convert_rgb is off; convert it to RGB first")
    if cfg.do_resize:
        height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, max_pixels)
        image = image.resize((width, height), resample=cfg.resample)
    return np.asarray(image).transpose(2, 0, 1)


def normalize(frame: np.ndarray, cfg: Qwen2VLImageConfig) -> np.ndarray:
    """float32 CHW pixels after rescale and normalize, with transformers' exact arithmetic.

    ``rescale`` (image_transforms.py) multiplies in float64 and casts to float32; ``normalize`` then
    subtracts and divides in float32 with float32 mean/std. Fusing into one ``(x - 255*mean) / (255*std)``
    would differ in the last bits, so the two steps are kept.
    """
    out = frame
    if cfg.do_rescale:
        out = (out.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        channels = out.shape[-3]
        if channels != len(cfg.image_mean):
            raise InputError(f"image has {channels} channels but the model expects {len(cfg.image_mean)}")
        mean = np.asarray(cfg.image_mean, dtype=out.dtype)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=out.dtype)[:, None, None]
        out = (out - mean) / std
    return np.asarray(out, dtype=np.float32)


def patchify(
    frames: np.ndarray,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    *,
    name: str = "image",
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flat patches ``[grid_t*grid_h*grid_w, C*temporal*patch*patch]`` and ``(grid_t, grid_h, grid_w)``.

    ``frames`` is ``[T, C, H, W]`` (an image is T=1). T is padded up to a multiple of
    ``temporal_patch_size`` by repeating the last frame, which is how transformers repeats an image's single
    frame (PIL image processor) and pads an odd frame count (Qwen2VLVideoProcessor.patchify). Rows come in
    merge-window order: for each temporal group, each (merge_size x merge_size) block of patches row-major,
    so the merger can take consecutive rows.
    """
    if frames.ndim != 4:
        raise ValueError(f"patchify expects [T, C, H, W] frames, got shape {frames.shape}")
    num_frames, channels, height, width = frames.shape
    factor = patch_size * merge_size
    if height % factor or width % factor or height == 0 or width == 0:
        raise InputError(
            f"{name} is {width}x{height} pixels, not a multiple of {factor}; enable do_resize or resize "
            f"it to multiples of {factor}"
        )
    frames = np.asarray(frames, dtype=np.float32)
    if pad := -num_frames % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # -> (gt, gh/m, gw/m, m, m, C, t, p, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(flat), (grid_t, grid_h, grid_w)


def num_image_tokens(grid_thw: np.ndarray, merge_size: int) -> list[int]:
    """Placeholder tokens per image: the merger turns merge_size x merge_size patches into one token."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in grid]
