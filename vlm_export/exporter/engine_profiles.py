"""TensorRT optimization profiles from the manifest's limits (torch-free: runs on a Jetson with the runtime only).

Text axes follow from the limits: `batch` up to max_batch, `sequence`/`total_sequence` up to max_seq_len,
`num_visual_tokens` (rows merged into the prompt) from 0. Where TensorRT imports TensorScatter as its KVCacheUpdate
layer (in place), the KV cache's `cache_capacity` is fixed at max_seq_len: the layer needs a static capacity (the
TensorRT copy of the graph pins the axis, `trt_ops.tensorrt_copy`) and the runtime's `allocate` gives buffers of
that size. Where TensorScatter is rewritten (TensorRT < 10.15: an out-of-place scatter that copies the whole cache
each step, and attention spans it), the capacity is a range, and the runtime grows the cache with the request as
on ONNX Runtime. The decoder gets two profiles: prefill (any prompt length) and decode (one token, up to
max_seq_len - 1 before it); the runtime picks the one whose tuned (opt) shapes are nearest.

Vision axes (patch counts, attention segment tables, crops) depend on family preprocessing, so they are measured,
not derived: the family's own host preprocessing runs on blank probe images at the pixel budget in several aspect
ratios, and each axis takes its largest value. An axis that adds up over images (patches) is scaled by the
images-per-call limit; one that does not (a segment length) is not.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from vlm_export.errors import VLMExportError
from vlm_export.manifest import GraphInfo, Limits, Manifest
from vlm_export.runtime.generation import CachedDecoding

# width:height of the probe images; thin images have the most partial windows / tiles.
PROBE_ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (4, 1), (1, 4))
UNBOUNDED_PROBE_PIXELS = 4096 * 4096  # families without a pixel budget (tiling) are probed at this size
TEXT_AXES = ("batch", "sequence", "cache_capacity", "total_sequence", "num_visual_tokens")
OPT_SEQUENCE = 1024  # typical prompt length TensorRT tunes the prefill profile for
DECODE_ROOM = CachedDecoding.INITIAL_ROOM  # new tokens the runtime first makes room for in the cache


class ProfileError(VLMExportError):
    """Limits that cannot make a TensorRT profile."""


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ProfileError(f"invalid profile range min={self.min} opt={self.opt} max={self.max}")


@dataclass
class EngineLimits:
    """What the engines accept; max_images (images per vision call, i.e. per request batch) is engine-only."""

    max_batch: int
    max_seq_len: int
    max_image_pixels: int | None
    max_images: int

    def to_limits(self) -> Limits:
        return Limits(max_batch=self.max_batch, max_seq_len=self.max_seq_len, max_image_pixels=self.max_image_pixels)


@dataclass
class ProfileSpec:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.shapes.items()},
        }


@dataclass
class VisionProbe:
    axes: dict[str, AxisRange]
    max_visual_tokens: int
    opt_visual_tokens: int


def _axis_values(info: GraphInfo, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    values: dict[str, int] = {}
    for tensor in info.inputs:
        if tensor.name not in feeds:
            raise ProfileError(f"the family's vision preprocessing gives no {tensor.name}; re-export the model")
        shape = feeds[tensor.name].shape
        for dim, axis in enumerate(tensor.shape):
            if isinstance(axis, str):
                if values.get(axis, shape[dim]) != shape[dim]:
                    raise ProfileError(f"vision axis {axis} has two sizes ({values[axis]}, {shape[dim]}) in one call")
                values[axis] = int(shape[dim])
    return values


def probe_vision(manifest: Manifest, folder: Path, limits: EngineLimits) -> VisionProbe:
    """Vision-graph axis ranges measured with the family's own preprocessing (see module docstring)."""
    from vlm_export.runtime.families import MediaItem, runtime_family_for

    probed = dataclasses.replace(manifest, limits=limits.to_limits())
    family = runtime_family_for(probed, folder)
    info = manifest.graphs["vision_encoder"]
    budget = limits.max_image_pixels or UNBOUNDED_PROBE_PIXELS

    def encode(sizes: list[tuple[int, int]]):
        items = [MediaItem(kind="image", source=PIL.Image.new("RGB", size, (127, 127, 127))) for size in sizes]
        visual = family.encode_media(items, [1] * len(items))
        return _axis_values(info, visual.feeds), sum(visual.token_counts)

    singles = []
    for w, h in PROBE_ASPECTS:
        width = max(1, int(math.sqrt(budget * w / h)))
        singles.append(encode([(width, max(1, budget // width))]))
    square, square_tokens = singles[0]
    many, _ = encode([(int(math.sqrt(budget)), int(math.sqrt(budget)))] * limits.max_images)
    axes = {}
    for axis in square:
        largest = max(values[axis] for values, _ in singles)
        additive = limits.max_images > 1 and many[axis] != square[axis]
        axes[axis] = AxisRange(1, square[axis], largest * limits.max_images if additive else largest)
    max_tokens = max(tokens for _, tokens in singles) * limits.max_images
    return VisionProbe(axes=axes, max_visual_tokens=max_tokens, opt_visual_tokens=square_tokens)


def _text_axes(
    limits: EngineLimits, visual_max: int, visual_opt: int, phase: str, static_cache: bool = True
) -> dict[str, AxisRange]:
    batch, seq = limits.max_batch, limits.max_seq_len
    visual_max = min(visual_max, batch * seq)
    visual = AxisRange(0, min(visual_opt, visual_max), visual_max)
    opt_seq = min(seq, OPT_SEQUENCE)
    fixed = AxisRange(seq, seq, seq)
    if phase == "prefill":
        # the runtime's prefill cache is exactly the prompt
        return {
            "batch": AxisRange(1, 1, batch),
            "sequence": AxisRange(1, opt_seq, seq),
            "cache_capacity": fixed if static_cache else AxisRange(1, opt_seq, seq),
            "total_sequence": AxisRange(1, opt_seq, seq),
            "num_visual_tokens": visual,
        }
    if phase == "decode":
        opt_past = min(opt_seq, seq - 1)
        # the runtime's decode cache: the prompt plus room that starts at DECODE_ROOM new tokens and doubles
        opt_capacity = min(seq, opt_past + 1 + DECODE_ROOM)
        return {
            "batch": AxisRange(1, 1, batch),
            "sequence": AxisRange(1, 1, 1),
            "cache_capacity": fixed if static_cache else AxisRange(2, opt_capacity, seq),
            "total_sequence": AxisRange(2, opt_past + 1, seq),
            "num_visual_tokens": AxisRange(0, 0, 0),
        }
    # one profile for graphs that serve both phases (the embedding merge)
    return {"batch": AxisRange(1, 1, batch), "sequence": AxisRange(1, opt_seq, seq), "num_visual_tokens": visual}


def profile_for(info: GraphInfo, axes: dict[str, AxisRange], name: str) -> ProfileSpec:
    """Concrete min/opt/max shapes of every input of `info`; a symbolic axis without a range is an error."""
    spec = ProfileSpec(name=name)
    for tensor in info.inputs:
        shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for dim in tensor.shape:
            if isinstance(dim, str):
                if dim not in axes:
                    raise ProfileError(
                        f"input {tensor.name} has axis '{dim}' that no TensorRT profile rule covers; this export's "
                        "graphs are newer than this vlm-export"
                    )
                r = axes[dim]
                values = (r.min, r.opt, r.max)
            else:
                values = (int(dim),) * 3
            for target, value in zip(shapes, values, strict=True):
                target.append(value)
        spec.shapes[tensor.name] = shapes
    return spec


def engine_profiles(
    manifest: Manifest, folder: Path, limits: EngineLimits, static_cache: bool = True
) -> dict[str, list[ProfileSpec]]:
    """Profiles per graph name; `static_cache`: the decoder's cache capacity is fixed at max_seq_len (TensorScatter
    imported as KVCacheUpdate), else a range (TensorScatter rewritten)."""
    if limits.max_seq_len < 2:
        raise ProfileError("--max-seq-len must be at least 2 for TensorRT engines (prompt + one generated token)")
    if limits.max_batch < 1 or limits.max_images < 1:
        raise ProfileError("--max-batch and --max-images must be positive")
    probe = probe_vision(manifest, folder, limits)
    profiles: dict[str, list[ProfileSpec]] = {}
    for name, info in manifest.graphs.items():
        if name == "vision_encoder":
            profiles[name] = [profile_for(info, probe.axes, "images")]
        elif name == "decoder":
            profiles[name] = [
                profile_for(
                    info,
                    _text_axes(limits, probe.max_visual_tokens, probe.opt_visual_tokens, phase, static_cache),
                    phase,
                )
                for phase in ("prefill", "decode")
            ]
        else:
            axes = _text_axes(limits, probe.max_visual_tokens, probe.opt_visual_tokens, "any")
            profiles[name] = [profile_for(info, axes, "any")]
    return profiles
