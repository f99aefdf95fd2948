"""torch's antialiased uint8 resize in numpy, so video frames resize exactly as transformers' video processors do.

transformers' video processors are torchvision classes: they resize uint8 frames with
``torchvision.transforms.v2.functional.resize(..., antialias=True)``, which on CPU runs torch's native uint8
kernel (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, ``_compute_index_ranges_int16_weights`` and the
separable uint8 loops; the AVX2 variant is Pillow-SIMD's). It computes the same filter as Pillow, but quantizes
the weights to int16 with a per-axis precision (Pillow uses 22 fixed bits), so Pillow's result differs by one
step on ~0.5% of values. This module reproduces torch's integer arithmetic: horizontal pass over all rows, clamp
to uint8, then vertical pass, each ``(sum(w_int16 * pixel) + 2**(p-1)) >> p`` clamped to [0, 255].
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["axis_weights", "resize_frames"]

_CUBIC_A = -0.5  # HelperInterpCubic::aa_filter (Keys' a = -0.5, as Pillow)
_INTERP_SIZE = {"bicubic": 4, "bilinear": 2}


def _filter(x: np.ndarray, mode: str) -> np.ndarray:
    """The antialias filter of `mode`, evaluated with torch's float64 expressions (UpSample.h)."""
    x = np.abs(x)
    if mode == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = _CUBIC_A
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def axis_weights(in_size: int, out_size: int, mode: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """``(start [out], int16-valued weights [out, k] as int64, precision)`` for one axis, as torch computes them.

    Mirrors ``_compute_indices_min_size_weights_aa`` (antialias, align_corners=False, no scale factor) and
    ``_compute_index_ranges_int16_weights``: float64 weights normalised per output pixel (summed left to right),
    a precision chosen so the largest weight still fits int16, weights rounded half away from zero.
    """
    if mode not in _INTERP_SIZE:
        raise ValueError(f"unsupported resize mode {mode!r}; use one of {sorted(_INTERP_SIZE)}")
    scale = in_size / out_size
    half = _INTERP_SIZE[mode] * 0.5
    support = half * scale if scale >= 1.0 else half
    kmax = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    size = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - start
    size = np.clip(size, 0, kmax)
    taps = np.arange(kmax, dtype=np.int64)
    weights = _filter(((taps[None, :] + start[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale, mode)
    weights = np.where(taps[None, :] < size[:, None], weights, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(kmax):  # sequential, as the C loop sums (numpy's pairwise sum would round differently)
        total += weights[:, j]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    wt_max = float(weights[nonzero].max()) if nonzero.any() else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * float(1 << precision)
    quantized = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return start, quantized, precision


def _resample_axis(frames: np.ndarray, axis: int, out_size: int, mode: str) -> np.ndarray:
    """One separable pass over `axis` (1 = rows/height, 2 = columns/width) of uint8 ``[N, H, W, C]`` frames.

    int32 is exact: |weights| sum to about 1.3 * 2**precision <= 2**15 * 1.3, times 255 stays below 2**31.
    """
    in_size = frames.shape[axis]
    start, weights, precision = axis_weights(in_size, out_size, mode)
    moved = np.ascontiguousarray(np.moveaxis(frames, axis, 0))  # gather along the first axis: contiguous slabs
    acc = np.full((out_size, *moved.shape[1:]), 1 << (precision - 1), dtype=np.int32)
    term = np.empty_like(acc)
    tail = (1,) * (moved.ndim - 1)
    for j in range(weights.shape[1]):
        column = weights[:, j]
        if not column.any():
            continue
        index = np.minimum(start + j, in_size - 1)  # taps past the end carry weight 0
        np.multiply(moved[index], column.astype(np.int32).reshape(-1, *tail), out=term, casting="unsafe")
        acc += term
    np.right_shift(acc, precision, out=acc)
    np.clip(acc, 0, 255, out=acc)
    return np.ascontiguousarray(np.moveaxis(acc.astype(np.uint8), 0, axis))


def resize_frames(frames: np.ndarray, height: int, width: int, mode: str = "bicubic") -> np.ndarray:
    """Resize uint8 ``[N, H, W, C]`` frames to ``height x width`` bit-exactly as torch's antialiased CPU kernel.

    Equals ``torchvision.transforms.v2.functional.resize(torch.from_numpy(frames).permute(0, 3, 1, 2),
    [height, width], interpolation=BICUBIC, antialias=True)`` (permuted back). Bilinear is torch's uint8
    kernel too, which torch uses on AVX2/AVX512 and ARM CPUs (elsewhere it resizes bilinear in float32).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"resize_frames expects uint8 [N, H, W, C] frames, got {frames.dtype} {frames.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    out = frames
    if width != frames.shape[2]:
        out = _resample_axis(out, 2, width, mode)
    if height != frames.shape[1]:
        out = _resample_axis(out, 1, height, mode)
    return out
