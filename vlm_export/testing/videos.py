"""Small synthetic video files for tests, written with PyAV (tests never download media).

The content moves and changes colour from frame to frame, so a wrong frame index or a swapped frame order
shows up in pixel comparisons, and the defaults use an odd frame size and NTSC's 30000/1001 fps, the cases
that break naive resizing and frame-rate arithmetic.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["synthetic_frames", "write_test_video"]

# Pixel format each encoder is given: 4:2:0 where the encoder needs it, full chroma or RGB where it can.
_PIX_FMT = {"mpeg4": "yuv420p", "libx264": "yuv444p", "ffv1": "yuv444p", "png": "rgb24", "mjpeg": "yuvj444p"}
# Per-codec options for near-lossless output (content fidelity only helps eyeballing; parity tests decode the
# same file on both sides).
_OPTIONS = {"mpeg4": {"qscale": "1"}, "libx264": {"crf": "0"}, "mjpeg": {"q:v": "1"}}


def synthetic_frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``[num_frames, height, width, 3]`` uint8 RGB frames: moving colour gradients, a moving block, noise."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.integers(0, 24, size=(height, width, 3), dtype=np.int16)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    block_h, block_w = max(1, height // 4), max(1, width // 5)
    for t in range(num_frames):
        channels = [
            127.5 + 127.5 * np.sin(x / (width / 3.1) + y / (height / 1.7) + 0.37 * t + phase[c] + 2.1 * c)
            for c in range(3)
        ]
        frame = np.stack(channels, axis=-1).astype(np.int16) + noise - 12
        top = (3 * t) % max(1, height - block_h)
        left = (5 * t) % max(1, width - block_w)
        frame[top : top + block_h, left : left + block_w] = ((40 * t) % 256, 255 - (40 * t) % 256, (90 * t) % 256)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_test_video(
    path: str | os.PathLike,
    num_frames: int = 90,
    width: int = 75,
    height: int = 53,
    fps: float | Fraction = Fraction(30000, 1001),
    seed: int = 0,
    codec: str = "mpeg4",
) -> Path:
    """Encode ``synthetic_frames(...)`` to ``path`` (container from the suffix: .mp4, .mkv, .avi, .mov).

    ``mpeg4`` in MP4 records the frame count in the header; ``ffv1`` in ``.mkv`` is lossless but has no frame
    count (exercises the loader's fallback). ``num_frames=0`` with ``.avi`` gives a valid file with a video stream
    and no frames (MP4 and MOV then have no video stream at all, Matroska no valid file).
    """
    path = Path(path)
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    frames = synthetic_frames(num_frames, width, height, seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=_OPTIONS.get(codec, {}))
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        container.start_encoding()  # writes the header even when there are no frames
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
