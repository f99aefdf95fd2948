"""LLaVA-OneVision image preprocessing ("anyres" crops) in numpy + Pillow.

Reproduces transformers 5.24's ``LlavaOnevisionImageProcessorPil``
(transformers/models/llava_onevision/image_processing_pil_llava_onevision.py) operation for operation, so the
pixel values agree bit for bit:

* an image that is alone in its sample is cut into anyres crops: the whole image squashed to ``size``
  (the "base" crop, first), then ``select_best_resolution`` picks a pinpoint, the image is resized into it
  keeping its aspect ratio (Pillow, sides rounded up), centre-padded with black (uint8 0) and cut into
  ``tile_size`` tiles, row-major;
* an image that shares its sample with others (``batch_num_images[i] > 1``, which is what
  ``apply_chat_template`` produces for a conversation with several images) is padded to a square with the
  mean colour (``int(255 * mean)`` per channel) and resized to ``size``: one crop;
* every crop: ``rescale`` in float64 stored as float32, then ``normalize`` in float32.

No torch, no transformers.
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
    "DEFAULT_IMAGE_GRID_PINPOINTS",
    "LlavaImageInputs",
    "LlavaOnevisionImageConfig",
    "normalize",
    "num_crops",
    "patch_output_size",
    "preprocess_images",
    "select_best_resolution",
]

#: Class default of LlavaOnevisionImageProcessorPil and LlavaOnevisionConfig: 384 ... 2304 in steps of 384.
DEFAULT_IMAGE_GRID_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)
)
# Class defaults of LlavaOnevisionImageProcessorPil (image_processing_pil_llava_onevision.py, lines 54-66).
_DEFAULTS: dict[str, Any] = {
    "size": {"height": 384, "width": 384},
    "crop_size": None,
    "image_grid_pinpoints": DEFAULT_IMAGE_GRID_PINPOINTS,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "rescale_factor": 1 / 255,
    "resample": int(PIL.Image.Resampling.BICUBIC),
    "do_resize": True,
    "do_center_crop": None,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_pad": True,
}


@dataclass(frozen=True)
class LlavaOnevisionImageConfig:
    """The image-processor settings the runtime needs; stored in manifest.json by the exporter."""

    size: tuple[int, int]  # (height, width) of every crop fed to the vision tower
    tile_size: int  # side of the anyres tiles: crop_size["height"], else size (transformers' "patch_size")
    image_grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) canvases the tiles are cut from
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int  # a PIL.Image.Resampling value, as in the hub config (3 = BICUBIC)
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    do_convert_rgb: bool
    do_pad: bool = True  # pads the crop axis when transformers batches images; no effect on flat crops

    @property
    def background(self) -> tuple[int, ...]:
        """Fill of the multi-image square padding: ``int(x * 255)`` of the processor's ``image_mean``
        (image_processing_pil_llava_onevision.py, line 224), truncated, so 0.5 gives 127."""
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def from_processor_dict(cls, d: Mapping[str, Any]) -> LlavaOnevisionImageConfig:
        """Settings from an image-processor dict, resolved the way transformers 5.24 resolves them.

        ``d`` is ``preprocessor_config.json`` (hub layout), ``processor_config.json["image_processor"]``
        (transformers v5 layout) or the whole ``processor_config.json``. Missing keys take the class defaults
        of ``LlavaOnevisionImageProcessorPil``; an explicit null does not (``ImageProcessingMixin.__init__``
        sets it as an instance attribute): a null flag is off and a null setting in use makes transformers
        fail, so it is refused. ``size`` may be ``{"height", "width"}``, ``{"shortest_edge"}`` or an int
        (shortest edge: every crop is square); ``crop_size`` sets the tile side. Raises :class:`ExportError`.
        """
        if isinstance(d.get("image_processor"), Mapping):
            d = d["image_processor"]
        flags = {k: bool(d.get(k, _DEFAULTS[k])) for k in ("do_resize", "do_rescale", "do_normalize")}
        flags["do_convert_rgb"] = bool(d.get("do_convert_rgb", _DEFAULTS["do_convert_rgb"]))
        flags["do_pad"] = bool(d.get("do_pad", _DEFAULTS["do_pad"]))
        if d.get("do_center_crop", _DEFAULTS["do_center_crop"]):
            raise ExportError(
                "LLaVA-OneVision image processor config sets do_center_crop; vlm-export does not support it "
                "(the llava-hf checkpoints leave it unset)"
            )
        used_by = {"image_mean": "do_normalize", "image_std": "do_normalize", "rescale_factor": "do_rescale"}
        used_by["resample"] = "do_resize"
        # What an unused null stands for; the base crop is resized even with do_resize off, and PilBackend.resize
        # falls back to BILINEAR for a null resample.
        unused = {**_DEFAULTS, "resample": int(PIL.Image.Resampling.BILINEAR)}

        def get(key: str) -> Any:
            value = d.get(key, _DEFAULTS[key])
            if value is None:
                if key in used_by and not flags[used_by[key]]:
                    return unused[key]
                raise ExportError(f"image processor config sets {key} to null; transformers cannot run with it")
            return value

        size = _size_hw(get("size"))
        crop = d.get("crop_size", _DEFAULTS["crop_size"])
        # _preprocess (lines 198-209): tiles are crop_size.height, else size.height, else shortest_edge.
        tile_size = _crop_height(crop) if crop is not None else None
        try:
            cfg = cls(
                size=size,
                tile_size=int(tile_size or size[0]),
                image_grid_pinpoints=_pinpoints(get("image_grid_pinpoints")),
                image_mean=three_floats(get("image_mean")),
                image_std=three_floats(get("image_std")),
                rescale_factor=float(get("rescale_factor")),
                resample=int(get("resample")),
                **flags,
            )
        except (TypeError, ValueError) as e:
            raise ExportError(f"unsupported LLaVA-OneVision image processor config: {e}") from e
        cfg._validate(ExportError)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["size"] = list(self.size)
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlavaOnevisionImageConfig:
        """Inverse of :meth:`to_dict`; a manifest missing a field is refused rather than guessed."""
        cfg = config_from_manifest(
            cls,
            d,
            "image",
            {
                "size": _height_width,
                "image_grid_pinpoints": _pinpoints,
                "image_mean": three_floats,
                "image_std": three_floats,
                "tile_size": int,
                "resample": int,
                "rescale_factor": float,
            },
        )
        cfg._validate(ManifestError)
        return cfg

    def _validate(self, error: type[Exception]) -> None:
        if min(self.size) <= 0 or self.tile_size <= 0:
            raise error(f"image config size {self.size} / tile size {self.tile_size} must be positive")
        if not self.image_grid_pinpoints:
            raise error("image config has no image_grid_pinpoints")
        for height, width in self.image_grid_pinpoints:
            # divide_to_patches would cut partial tiles the model cannot place on its grid (it floors).
            if height <= 0 or width <= 0 or height % self.tile_size or width % self.tile_size:
                raise error(
                    f"image_grid_pinpoints entry {[height, width]} is not a positive multiple of the "
                    f"{self.tile_size}-pixel tile size"
                )
        if not self.do_resize and self.size != (self.tile_size, self.tile_size):
            raise error(f"do_resize is off but tiles of {self.tile_size} pixels differ from size {self.size}")
        if self.do_normalize and 0.0 in self.image_std:
            raise error(f"image config image_std has a zero: {self.image_std}")


def _size_hw(size: Any) -> tuple[int, int]:
    """(height, width) of the crops from a processor ``size`` (``get_size_dict`` with default_to_square=False).

    ``shortest_edge`` gives a square: the base crop is resized to ``(se, se)`` explicitly (lines 198-201) and
    tiles and squares are square already, so their aspect-preserving resize is to ``(se, se)`` too.
    """
    if isinstance(size, int | float) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, Mapping):
        if size.get("height") and size.get("width"):
            return int(size["height"]), int(size["width"])
        if size.get("shortest_edge"):
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ExportError(
        f"unsupported image processor 'size' {size!r}: LLaVA-OneVision needs {{'height': h, 'width': w}} "
        "or {'shortest_edge': s}"
    )


def _crop_height(crop: Any) -> int | None:
    """``crop_size.height`` (``get_size_dict(crop_size)`` squares an int); None when it has no height."""
    if isinstance(crop, int | float) and not isinstance(crop, bool):
        return int(crop)
    if isinstance(crop, list | tuple) and len(crop) == 2:
        return int(crop[0])
    if isinstance(crop, Mapping):
        return int(crop["height"]) if crop.get("height") else None
    raise ExportError(f"unsupported image processor 'crop_size' {crop!r}")


def _height_width(value: Any) -> tuple[int, int]:
    """A crop size from the manifest: exactly (height, width)."""
    height, width = (int(v) for v in value)
    return height, width


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    """``image_grid_pinpoints`` as (height, width) int pairs; transformers wants a list of pairs."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}")
    pairs = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"image_grid_pinpoints entry {entry!r} is not a [height, width] pair")
        pairs.append((int(entry[0]), int(entry[1])))
    return tuple(pairs)


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's pixels, then wastes the least.

    Same loop and float arithmetic as transformers' ``select_best_resolution`` (image_processing_utils.py,
    lines 642-677): ties keep the earlier pinpoint.
    """
    original_height, original_width = image_size
    best_fit: tuple[int, int] | None = None
    max_effective = 0
    min_wasted = float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (int(height), int(width))
    if best_fit is None:
        raise InputError(f"no image_grid_pinpoints fit an image of {image_size[1]}x{image_size[0]} pixels")
    return best_fit


def patch_output_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the image is resized to inside ``target``: aspect kept, the free side rounded up
    (transformers' ``get_patch_output_size``, image_processing_utils.py, lines 680-697)."""
    original_height, original_width = image_size
    target_height, target_width = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def num_crops(height: int, width: int, cfg: LlavaOnevisionImageConfig, *, patching: bool = True) -> int:
    """Crops one image of this size becomes, without touching pixels: the base crop plus the tiles of its
    best pinpoint when patched, 1 when it shares its sample with other images."""
    if not patching:
        return 1
    best_height, best_width = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    return 1 + (best_height // cfg.tile_size) * (best_width // cfg.tile_size)


@dataclass
class LlavaImageInputs:
    """What the vision graph takes for a list of images, plus what packing needs afterwards."""

    pixel_values: np.ndarray  # float32 [total_crops, 3, H, W]: each image's crops in order, base crop first
    crops_per_image: list[int]
    image_sizes: np.ndarray  # int64 [n_images, 2]: (height, width) of each image, as transformers returns


def preprocess_images(
    images: Sequence[PIL.Image.Image],
    cfg: LlavaOnevisionImageConfig,
    *,
    batch_num_images: Sequence[int] | None = None,
) -> LlavaImageInputs:
    """Crops of ``images``, equal to ``LlavaOnevisionImageProcessorPil``'s ``pixel_values`` without the
    zero crops it pads each image with to batch them (``crops_per_image`` says how many are real).

    ``batch_num_images`` is transformers' trigger for the multi-image path: how many of ``images`` each
    sample holds, in order. ``None`` is a flat list (``processor(images=[a, b])``: every image its own sample,
    all patched). A chat with several images in one conversation is ``[len(images)]``, which is what
    ``apply_chat_template`` passes (one nested list per conversation): then each image is padded to a square
    and gives one crop. Pass images from :func:`vlm_export.runtime.image_io.load_image`.
    """
    images = list(images)
    for image in images:
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"preprocess_images takes PIL images, got {type(image).__name__}; convert with load_image()"
            )
    if batch_num_images is None:
        counts = [1] * len(images)
    else:
        counts = [int(n) for n in batch_num_images]
        if any(n < 0 for n in counts) or sum(counts) != len(images):
            raise ValueError(f"batch_num_images {counts} does not add up to the {len(images)} images given")
    # image_processing_pil_llava_onevision.py, line 194: only images alone in their sample are patched.
    patching = [n == 1 for n in counts for _ in range(n)]
    crops: list[np.ndarray] = []
    crops_per_image: list[int] = []
    sizes: list[tuple[int, int]] = []
    for image, patch in zip(images, patching, strict=True):
        name = describe_source(image)
        if image.width <= 0 or image.height <= 0:
            raise InputError(f"image {name} is empty; pass an image with pixels")
        rgb = _to_rgb(image, cfg, name)
        hwc = _anyres_crops(rgb, cfg) if patch else _square_crop(rgb, cfg)
        if hwc.shape[1:3] != cfg.size:
            raise InputError(
                f"image {name} gives a {hwc.shape[2]}x{hwc.shape[1]} crop but the vision tower takes "
                f"{cfg.size[1]}x{cfg.size[0]} (do_resize is off); enable do_resize"
            )
        crops.append(normalize(hwc.transpose(0, 3, 1, 2), cfg))
        crops_per_image.append(hwc.shape[0])
        sizes.append((rgb.height, rgb.width))
    if not crops:
        return LlavaImageInputs(
            pixel_values=np.zeros((0, 3, *cfg.size), np.float32),
            crops_per_image=[],
            image_sizes=np.zeros((0, 2), np.int64),
        )
    return LlavaImageInputs(
        pixel_values=np.concatenate(crops, axis=0),
        crops_per_image=crops_per_image,
        image_sizes=np.array(sizes, dtype=np.int64),
    )


def _to_rgb(image: PIL.Image.Image, cfg: LlavaOnevisionImageConfig, name: str) -> PIL.Image.Image:
    """RGB conversion as ``PilBackend.process_image`` does it (alpha composited on white)."""
    if cfg.do_convert_rgb:
        return convert_to_rgb(image, name=name)
    if image.mode != "RGB":
        # transformers would pass np.array(image) on, which only works out for 3-channel 8-bit images.
        raise InputError(f"image {name} is not RGB and do_convert_rgb is off; convert it to RGB first")
    return image


def _resize(image: PIL.Image.Image | np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """HWC uint8 pixels resized by Pillow, as transformers' PIL ``resize`` (same size: an exact copy)."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    height, width = size
    return np.asarray(image.resize((width, height), resample=resample))


def _anyres_crops(image: PIL.Image.Image, cfg: LlavaOnevisionImageConfig) -> np.ndarray:
    """[1 + tiles, H, W, 3] uint8: the base crop, then the tiles of the padded best-pinpoint canvas.

    ``get_image_patches`` (lines 121-151): the resize into the pinpoint keeps the aspect ratio, the padding
    puts the odd pixel after (``divmod``), tiles are row-major; then ``_preprocess`` resizes every crop to
    ``size`` (a no-op for tiles of that size; the base crop is already at ``size``).
    """
    height, width = image.height, image.width
    best = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    new_height, new_width = patch_output_size((height, width), best)
    canvas = np.zeros((*best, 3), dtype=np.uint8)
    top, left = (best[0] - new_height) // 2, (best[1] - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = _resize(image, (new_height, new_width), cfg.resample)
    t = cfg.tile_size
    tiles = canvas.reshape(best[0] // t, t, best[1] // t, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
    if cfg.do_resize and (t, t) != cfg.size:
        tiles = np.stack([_resize(tile, cfg.size, cfg.resample) for tile in tiles])
    base = _resize(image, cfg.size, cfg.resample)
    return np.concatenate([base[None], tiles], axis=0)


def _square_crop(image: PIL.Image.Image, cfg: LlavaOnevisionImageConfig) -> np.ndarray:
    """[1, H, W, 3] uint8: the image centred on a square of the mean colour, resized to ``size``
    (``pad_to_square``, lines 261-304: the image starts at ``(side - short) // 2``)."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if height != width:
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[...] = np.array(cfg.background, dtype=np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        square[top : top + height, left : left + width] = pixels
        pixels = square
    if cfg.do_resize:
        pixels = _resize(pixels, cfg.size, cfg.resample)
    return pixels[None]


def normalize(crops: np.ndarray, cfg: LlavaOnevisionImageConfig) -> np.ndarray:
    """float32 ``[n, C, H, W]`` after rescale and normalize, with transformers' exact arithmetic.

    ``rescale`` (image_transforms.py) multiplies in float64 and casts to float32; ``normalize`` then
    subtracts and divides in float32 with float32 mean/std. Fusing into one ``(x - 255*mean) / (255*std)``
    would differ in the last bits, so the two steps are kept. uint8 crops go through a 256-entry table per
    channel computed with that arithmetic (same values, a fraction of the time).
    """
    if crops.dtype == np.uint8 and crops.ndim == 4:
        levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, crops.shape[1]))
        table = _rescale_normalize(levels.T[None, :, :, None], cfg)[0, :, :, 0]  # [C, 256]
        out = np.empty(crops.shape, dtype=np.float32)
        for channel in range(crops.shape[1]):
            out[:, channel] = table[channel][crops[:, channel]]
        return out
    return _rescale_normalize(crops, cfg)


def _rescale_normalize(crops: np.ndarray, cfg: LlavaOnevisionImageConfig) -> np.ndarray:
    out = crops
    if cfg.do_rescale:
        out = (out.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        out = out.astype(np.float32, copy=False)
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)
