"""LLaVA-OneVision feature packing in numpy: per-crop projector outputs -> the rows that replace ``<image>``.

Reproduces ``LlavaOnevisionModel.pack_image_features`` (transformers 5.24,
models/llava_onevision/modeling_llava_onevision.py, lines 245-308) and the concatenation ``get_image_features``
feeds to the embedding merge. Every step depends on the image's size, which is why it runs on the host:

* an image with one crop (multi-image prompts) gives its crop's tokens plus one ``image_newline`` row;
* an anyres image gives its base crop's tokens, then its tiles laid out as the pinpoint grid
  (``[rows*P, cols*P]`` tokens), cropped back to the image's aspect ratio (``unpad_image``), shrunk with
  ``F.interpolate(mode="bilinear", align_corners=False)`` when it holds more than ~1.1x ``anyres_max_N``
  crops' worth of tokens, with an ``image_newline`` column appended, row-major.

The bilinear downscale copies PyTorch's CPU kernels, fused multiply-adds included, so the result is bit-identical
to transformers on x86-64 (AVX2/AVX512 builds) for float32 features. No torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.llava_onevision.preprocess import (
    DEFAULT_IMAGE_GRID_PINPOINTS,
    select_best_resolution,
)
from vlm_export.runtime.families.processor_values import config_from_manifest

__all__ = [
    "LlavaPackingConfig",
    "anyres_grid_shape",
    "bilinear_resize",
    "num_image_tokens",
    "pack_image_features",
    "packed_grid_size",
]

# LlavaOnevisionConfig.sub_configs_defaults (configuration_llava_onevision.py): a config without vision_config
# gets SigLIP-so400m at 384/14; a vision_config dict without model_type is a SigLIP vision config.
_DEFAULT_VISION = {"image_size": 384, "patch_size": 14}
_VISION_CLASS_DEFAULTS = {
    "siglip_vision_model": {"image_size": 224, "patch_size": 16},
    "clip_vision_model": {"image_size": 224, "patch_size": 32},
}
_STRATEGIES = ("default", "full")
# PyTorch (aten/src/ATen/native/cpu/UpSampleKernel.cpp, _use_vectorized_kernel_cond_2d): NCHW input goes to
# the channels-last vectorized kernel when output height + width <= 128, else to the generic kernel. The two
# sum their four terms in different orders.
_VECTORIZED_MAX_OUTPUT_HW_SUM = 128
# Channels handled per numpy pass of the downscale (bounds the float64 temporaries of the fused multiply-adds).
_CHANNEL_BLOCK = 256
# Floats per Vectorized<float> in the channels-last kernel's vector loop (AVX2 and aarch64 builds).
_VECTOR_WIDTH = 8


@dataclass(frozen=True)
class LlavaPackingConfig:
    """What packing needs from the model's config.json; stored in manifest.json by the exporter."""

    patches_per_side: int  # vision image_size // patch_size (27): a crop is a P x P grid of tokens
    crop_size: int  # vision image_size (384): pinpoint sides // crop_size = tiles per side
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_select_strategy: str = "full"  # "default" drops a CLS token in the vision graph

    @property
    def tokens_per_crop(self) -> int:
        """Rows each crop contributes to the vision graph's output (``P * P``)."""
        return self.patches_per_side**2

    @property
    def max_num_patches(self) -> int:
        """N of ``anyres_max_N``, parsed as transformers does: ``int(s.strip("anyres_max_"))`` (line 281),
        which strips those *characters* from both ends."""
        return int(self.vision_aspect_ratio.strip("anyres_max_"))  # noqa: B005 (transformers' quirk, kept)

    @classmethod
    def from_model_config(cls, config_dict: Mapping[str, Any]) -> LlavaPackingConfig:
        """Settings from ``config.json`` (or ``LlavaOnevisionConfig.to_dict()``), with transformers' defaults
        for missing keys. Raises :class:`ExportError`."""
        vision = config_dict.get("vision_config")
        if vision is None:
            vision = dict(_DEFAULT_VISION)
        elif not isinstance(vision, Mapping):
            raise ExportError(f"config.json vision_config is not an object: {vision!r}")
        model_type = vision.get("model_type") or "siglip_vision_model"
        defaults = _VISION_CLASS_DEFAULTS.get(model_type, {})
        try:
            image_size = int(vision.get("image_size") or defaults["image_size"])
            patch_size = int(vision.get("patch_size") or defaults["patch_size"])
        except KeyError as e:
            raise ExportError(f"config.json vision_config ({model_type}) lacks {e.args[0]}") from e
        pinpoints = config_dict.get("image_grid_pinpoints")
        try:
            cfg = cls(
                patches_per_side=image_size // patch_size if patch_size > 0 else 0,
                crop_size=image_size,
                image_grid_pinpoints=_pinpoints(DEFAULT_IMAGE_GRID_PINPOINTS if pinpoints is None else pinpoints),
                vision_aspect_ratio=str(config_dict.get("vision_aspect_ratio") or "anyres_max_9"),
                vision_feature_select_strategy=str(config_dict.get("vision_feature_select_strategy") or "full"),
            )
        except (TypeError, ValueError) as e:
            raise ExportError(f"unsupported LLaVA-OneVision config: {e}") from e
        cfg._validate(ExportError)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlavaPackingConfig:
        """Inverse of :meth:`to_dict`; a manifest missing a field is refused rather than guessed."""
        converters = {"patches_per_side": int, "crop_size": int, "image_grid_pinpoints": _pinpoints}
        converters.update({name: str for name in ("vision_aspect_ratio", "vision_feature_select_strategy")})
        cfg = config_from_manifest(cls, d, "packing", converters)
        cfg._validate(ManifestError)
        return cfg

    def _validate(self, error: type[Exception]) -> None:
        if self.patches_per_side <= 0 or self.crop_size <= 0:
            raise error(f"vision image_size {self.crop_size} must be a positive multiple of its patch size")
        if not self.image_grid_pinpoints or any(min(p) < self.crop_size for p in self.image_grid_pinpoints):
            raise error(f"image_grid_pinpoints must hold at least one {self.crop_size}-pixel tile per side")
        try:
            if self.max_num_patches <= 0:
                raise ValueError
        except ValueError:
            raise error(
                f"unsupported vision_aspect_ratio {self.vision_aspect_ratio!r}: expected 'anyres_max_N'"
            ) from None
        if self.vision_feature_select_strategy not in _STRATEGIES:
            raise error(
                f"unsupported vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                f"expected one of {', '.join(_STRATEGIES)}"
            )


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}")
    pairs = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"image_grid_pinpoints entry {entry!r} is not a [height, width] pair")
        pairs.append((int(entry[0]), int(entry[1])))
    return tuple(pairs)


def _image_size(image_size: Any) -> tuple[int, int]:
    height, width = (int(v) for v in np.asarray(image_size).reshape(2))
    if height <= 0 or width <= 0:
        raise InputError(f"image size {height}x{width} (height x width) is empty")
    return height, width


def anyres_grid_shape(image_size: tuple[int, int], cfg: LlavaPackingConfig) -> tuple[int, int]:
    """(rows, cols) of tiles of an anyres image: its best pinpoint // the crop size
    (``get_anyres_image_grid_shape``, line 118)."""
    best_height, best_width = select_best_resolution(_image_size(image_size), cfg.image_grid_pinpoints)
    return best_height // cfg.crop_size, best_width // cfg.crop_size


def _unpad_bounds(image_size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the token grid that ``unpad_image`` (line 186) keeps: the padding the
    preprocessing added around the resized image, in tokens, with its ``round(..., 7)``."""
    original_height, original_width = image_size
    current_height, current_width = grid_hw
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def packed_grid_size(image_size: tuple[int, int], cfg: LlavaPackingConfig) -> tuple[tuple[int, int], bool]:
    """((height, width) of an anyres image's token grid after unpadding and downscaling, whether it was
    downscaled). ``ratio > 1.1`` and the ``int(h // ratio)`` sizes are lines 281-288."""
    image_size = _image_size(image_size)
    rows, cols = anyres_grid_shape(image_size, cfg)
    p = cfg.patches_per_side
    top, bottom, left, right = _unpad_bounds(image_size, (rows * p, cols * p))
    height, width = bottom - top, right - left
    ratio = math.sqrt(height * width / (cfg.max_num_patches * p**2))
    if ratio > 1.1:
        return (int(height // ratio), int(width // ratio)), True
    return (height, width), False


def num_image_tokens(image_size: tuple[int, int], crops: int, cfg: LlavaPackingConfig) -> int:
    """Rows :func:`pack_image_features` gives for this image = the ``<image>`` tokens the processor expands to.

    One crop: ``P*P + 1`` (the newline); anyres: ``P*P`` base tokens plus ``h * (w + 1)`` for the packed grid
    and its newline column. Equals ``LlavaOnevisionProcessor``'s count (``_get_number_of_features``), whose
    ``num_image_tokens - 1`` for the "default" strategy is a CLS token the vision graph drops.
    """
    base = cfg.tokens_per_crop
    if crops == 1:
        return base + 1
    rows, cols = anyres_grid_shape(image_size, cfg)
    if crops != rows * cols + 1:
        raise ValueError(
            f"an image of {image_size[1]}x{image_size[0]} pixels has {rows * cols + 1} crops here, got {crops}"
        )
    (height, width), _ = packed_grid_size(image_size, cfg)
    return base + height * (width + 1)


def pack_image_features(
    features: np.ndarray,
    image_sizes: np.ndarray,
    crops_per_image: Sequence[int],
    image_newline: np.ndarray,
    cfg: LlavaPackingConfig,
) -> np.ndarray:
    """``[sum of num_image_tokens, D]``: each image's packed rows, in order, as transformers concatenates them.

    ``features`` is the vision graph's ``[total_crops, P*P, D]`` (crops of all images, base crop first per
    image), ``image_sizes`` the ``[n, 2]`` (height, width) and ``crops_per_image`` the counts from
    :func:`~vlm_export.runtime.families.llava_onevision.preprocess.preprocess_images`. The downscale computes
    in float32 (PyTorch's opmath for half types too) and the result keeps ``features.dtype``.
    """
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be [crops, tokens, dim], got shape {features.shape}")
    total, tokens, dim = features.shape
    counts = [int(n) for n in crops_per_image]
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    if len(sizes) != len(counts) or sum(counts) != total or any(n < 1 for n in counts):
        raise ValueError(
            f"{total} crops of features do not match crops_per_image {counts} for {len(sizes)} image sizes"
        )
    if tokens != cfg.tokens_per_crop:
        # transformers: "The number of patches is not consistent with the image size." (line 271)
        raise ValueError(f"each crop has {tokens} feature rows but the config expects {cfg.tokens_per_crop}")
    newline = np.asarray(image_newline).astype(features.dtype, copy=False).reshape(1, dim)
    pieces: list[np.ndarray] = []
    offset = 0
    for size, count in zip(sizes, counts, strict=True):
        crops = features[offset : offset + count]
        offset += count
        pieces.append(crops[0])
        if count == 1:
            pieces.append(newline)
        else:
            pieces.append(_pack_tiles(crops[1:], _image_size(size), newline, cfg))
    if not pieces:
        return np.zeros((0, dim), dtype=features.dtype)
    return np.concatenate(pieces, axis=0)


def _pack_tiles(
    tiles: np.ndarray, image_size: tuple[int, int], newline: np.ndarray, cfg: LlavaPackingConfig
) -> np.ndarray:
    """The tiles' rows: grid layout, unpad, optional downscale, newline column, flattened row-major.

    Works channels-last (``[H, W, D]``); transformers' ``[D, H, W]`` flattened and transposed is the same order.
    """
    rows, cols = anyres_grid_shape(image_size, cfg)
    if tiles.shape[0] != rows * cols:
        raise ValueError(
            f"an image of {image_size[1]}x{image_size[0]} pixels has {rows}x{cols} tiles, got {tiles.shape[0]}"
        )
    p, dim = cfg.patches_per_side, tiles.shape[-1]
    grid = tiles.reshape(rows, cols, p, p, dim).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, dim)
    top, bottom, left, right = _unpad_bounds(image_size, (rows * p, cols * p))
    grid = grid[top:bottom, left:right]
    (height, width), downscale = packed_grid_size(image_size, cfg)
    if downscale:
        grid = bilinear_resize(grid, (height, width)).astype(tiles.dtype, copy=False)
    column = np.broadcast_to(newline[None], (grid.shape[0], 1, dim))
    return np.concatenate([grid, column], axis=1).reshape(-1, dim)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, like the fused multiply-add compilers emit for PyTorch's kernels.

    The float64 product of two float32 values is exact; the float64 sum can round before the final rounding
    to float32 only in astronomically rare midpoint cases.
    """
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(index0, index1, lambda0, lambda1) of PyTorch's ``compute_source_index_and_lambda`` (align_corners=False).

    ``scale = float(in) / out``; ``src = scale * (dst + 0.5) - 0.5`` as one fused multiply-add (a float64
    evaluation is exact here, then rounded once), clamped at 0; ``index0 = min(floor(src), in - 1)``,
    ``lambda1 = clamp(src - index0, 0, 1)``, ``lambda0 = 1 - lambda1``, all float32.
    """
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst, dst, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    half = (dst.astype(np.float32) + np.float32(0.5)).astype(np.float64)
    src = (np.float64(scale) * half - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    index0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lambda1 = np.clip(src - index0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    index1 = index0 + (index0 < in_size - 1)
    return index0, index1, (np.float32(1) - lambda1).astype(np.float32), lambda1


def bilinear_resize(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 ``[h, w, D]`` -> ``[size[0], size[1], D]``, as ``F.interpolate(x.permute(2, 0, 1)[None], size,
    mode="bilinear", align_corners=False)`` computes it on a CPU for a channels-first input.

    PyTorch picks its kernel by output size: above 128 (height + width) the generic kernel computes
    ``fma(t0, wh0, t1 * wh1)`` of row terms ``t = fma(x0, ww0, x1 * ww1)``; up to 128 the channels-last kernel
    weights the four neighbours with ``w00 = wh0 * ww0``... and sums them as
    ``fma(x00, w00, fma(x01, w01, fma(x11, w11, x10 * w10)))`` in its vector loop, left to right in its scalar
    tail (the last ``D % 8`` channels with 8-float vectors; real hidden sizes have no tail).
    """
    out_height, out_width = size
    x = np.asarray(grid, dtype=np.float32)
    h0, h1, a0, a1 = _linear_indices(x.shape[0], out_height)
    w0, w1, b0, b1 = _linear_indices(x.shape[1], out_width)
    out = np.empty((out_height, out_width, x.shape[2]), dtype=np.float32)
    vectorized = out_height + out_width <= _VECTORIZED_MAX_OUTPUT_HW_SUM
    a0, a1 = a0[:, None, None], a1[:, None, None]
    b0, b1 = b0[None, :, None], b1[None, :, None]
    for start in range(0, x.shape[2], _CHANNEL_BLOCK):
        block = x[..., start : start + _CHANNEL_BLOCK]
        if vectorized:
            top, bottom = block[h0], block[h1]
            w00, w01, w10, w11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
            x00, x01, x10, x11 = top[:, w0], top[:, w1], bottom[:, w0], bottom[:, w1]
            vector = _fma32(x00, w00, _fma32(x01, w01, _fma32(x11, w11, x10 * w10)))
            tail = max(0, (x.shape[2] % _VECTOR_WIDTH) - (x.shape[2] - start - block.shape[2]))
            if tail:
                left_to_right = _fma32(x11, w11, _fma32(x10, w10, _fma32(x00, w00, x01 * w01)))
                vector[..., -tail:] = left_to_right[..., -tail:]
            out[..., start : start + _CHANNEL_BLOCK] = vector
        else:
            rows = _fma32(block[:, w0], b0, block[:, w1] * b1)  # every input row, interpolated along width
            out[..., start : start + _CHANNEL_BLOCK] = _fma32(rows[h0], a0, rows[h1] * a1)
    return out
