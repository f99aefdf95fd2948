"""Video decoding for the runtime: PyAV + numpy only, no torch, no transformers.

Metadata and frame selection reproduce transformers 5.24's PyAV loader (``video_utils.read_video_pyav``, used by
``load_video(..., backend="pyav")``): the frame count is the stream's ``frames`` header, the frame rate its
``average_rate``, the duration ``frames / fps``, and frame ``i`` is the ``i``-th frame ``container.decode``
yields. Where the container lacks a header transformers would read as 0 (Matroska/WebM store no frame count),
this module falls back to counting packets, and to other rate fields for the frame rate, instead of failing.

Decoding is sequential (no seeking, which is unreliable across containers) and stops after the last sampled
frame; only sampled frames are converted to RGB.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.errors import InputError
from vlm_export.runtime.video_resize import resize_frames

if TYPE_CHECKING:
    import av

__all__ = ["VideoClip", "VideoMetadata", "VideoSource", "load_video", "probe_video"]

logger = logging.getLogger(__name__)

VideoSource = str | os.PathLike

# transformers' VideoMetadata.sampled_fps falls back to 24 when the rate is unknown; so do we.
_DEFAULT_FPS = 24.0
#: Header values beyond any real video (46 hours at 100 fps; 8192 x 8192), refused before anything is allocated.
MAX_FRAMES = 1 << 24
MAX_FRAME_PIXELS = 1 << 26


@dataclass(frozen=True)
class VideoMetadata:
    """What the samplers need to know about a video, as transformers' PyAV loader reports it."""

    total_frames: int
    fps: float
    duration: float  # seconds, total_frames / fps (transformers' definition, not the container's)
    width: int
    height: int


@dataclass
class VideoClip:
    """The sampled frames of one video."""

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB, in stream order
    indices: np.ndarray  # int64 [N], stream frame index of each kept frame
    metadata: VideoMetadata
    decoded_size: tuple[int, int] | None = None  # (H, W) of the frames as decoded, before any `resize`


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _resolve(source: VideoSource) -> tuple[str, str]:
    """(local path, display name) for a path-like or ``file://`` source; refuses URLs and missing files."""
    if not isinstance(source, str | os.PathLike):
        raise InputError(f"unsupported video source of type {type(source).__name__}: pass the path of a video file")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    name = repr(path) if len(path) <= 200 else repr(path[:60] + "...")
    lowered = path[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise InputError(f"cannot load video {name}: the runtime does not download; fetch the file and pass its path")
    if lowered.startswith("file://"):
        from urllib.parse import unquote, urlparse
        from urllib.request import url2pathname

        path = url2pathname(unquote(urlparse(path).path))
    if not os.path.exists(path):
        raise InputError(f"video file not found: {name}; check the path (relative paths are resolved from the cwd)")
    if os.path.isdir(path):
        raise InputError(f"video path {name} is a directory; pass a video file")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
        raise InputError(f"video path {name} is not a regular file (a pipe or device?); save the video to a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"video file {name} is not readable; check its permissions")
    return path, name


def _av() -> Any:
    """PyAV, imported on first use: pipelines that never see a video do not need it loaded."""
    try:
        import av
        import av.error
    except ImportError as e:  # pragma: no cover - av is a runtime dependency
        raise InputError("video input needs PyAV: pip install av") from e
    return av


def _open(path: str, name: str) -> av.container.InputContainer:
    av = _av()
    try:
        return av.open(path)
    except av.error.FFmpegError as e:
        raise InputError(
            f"cannot read video {name}: {_one_line(e)} (not a video file FFmpeg recognises, or it is corrupt); "
            "re-encode it, e.g. to H.264 MP4"
        ) from e


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InputError(f"video {name} has no video stream (audio or data only); pass a file with video")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputError(f"video {name}: its codec is not supported by this FFmpeg build; re-encode it to H.264")
    return stream


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream, name: str) -> int:
    """Frame count by demuxing (no decoding): one non-empty packet per frame for video streams."""
    av = _av()
    try:
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.error.FFmpegError as e:
        raise InputError(f"cannot read video {name}: {_one_line(e)} (the file is corrupt or truncated)") from e


def _frame_rate(container: av.container.InputContainer, stream: av.video.stream.VideoStream, frames: int) -> float:
    """``average_rate`` as transformers reads it; guessed/base rate or frames per second of duration otherwise."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) < 1e6:  # a corrupt header can hold a negative or absurd rate
            return float(rate)
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * Fraction(stream.time_base))
    elif container.duration:
        seconds = container.duration / _av().time_base
    if seconds and seconds > 0 and frames and 0 < frames / seconds < 1e6:
        return frames / seconds
    logger.warning("video has no frame rate in its headers; assuming %.0f fps", _DEFAULT_FPS)
    return _DEFAULT_FPS


def _metadata(container: av.container.InputContainer, stream: av.video.stream.VideoStream, name: str) -> VideoMetadata:
    frames = int(stream.frames or 0)
    if frames <= 0:  # e.g. Matroska/WebM: no frame count in the header (transformers would report 0)
        frames = _count_packets(container, stream, name)
    if frames <= 0:
        raise InputError(f"video {name} contains no frames; pass a video with at least one frame")
    if frames > MAX_FRAMES:  # a header can claim anything: every sampler builds an index array of this length
        raise InputError(f"video {name} claims {frames:,} frames (more than {MAX_FRAMES:,}); cut it or re-encode it")
    fps = _frame_rate(container, stream, frames)
    width, height = int(stream.width or 0), int(stream.height or 0)
    if width <= 0 or height <= 0:
        raise InputError(f"video {name} has no frame size ({width}x{height}) in its headers; re-encode it")
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(
            f"video {name} has {width}x{height} frames, more than {MAX_FRAME_PIXELS:,} pixels each; downscale it"
        )
    return VideoMetadata(total_frames=frames, fps=fps, duration=frames / fps, width=width, height=height)


def probe_video(source: VideoSource) -> VideoMetadata:
    """Frame count, frame rate, duration and size of a video file, without decoding frames."""
    path, name = _resolve(source)
    with _open(path, name) as container:
        return _metadata(container, _video_stream(container, name), name)


def _check_indices(indices: np.ndarray, metadata: VideoMetadata) -> np.ndarray:
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"frame sampling gave {array.shape} {array.dtype} indices; expected a non-empty 1-D int array")
    if array.min() < 0 or array.max() >= metadata.total_frames:
        raise InputError(
            f"frame sampling asked for frames {int(array.min())}..{int(array.max())} of a video with "
            f"{metadata.total_frames} frames; ask for fewer frames or a lower fps"
        )
    # transformers keeps frame i when `i in indices`: stream order, each frame once.
    return np.unique(array.astype(np.int64))


#: ``resize(sampled_count, height, width)`` -> ``(height, width, mode)`` each kept frame is resized to as it is
#: decoded (``runtime.video_resize`` modes), or None to keep it as decoded.
FrameResize = Callable[[int, int, int], "tuple[int, int, str] | None"]


def load_video(
    source: VideoSource, sample: Callable[[VideoMetadata], np.ndarray], resize: FrameResize | None = None
) -> VideoClip:
    """Decode the frames ``sample(metadata)`` selects, as transformers' PyAV loader does.

    Decodes from the start without seeking and stops after the last selected frame. Frames come back in stream
    order, each once, even if ``sample`` lists one twice. If the header over-counts frames and the stream ends
    before a selected index, the frames that exist are returned (as transformers does) and a warning is logged.
    ``sample`` sees only the headers, so it can refuse a video before anything is decoded. With ``resize``, each
    kept frame is resized as soon as it is decoded (the resize works frame by frame, so the result is the same as
    resizing the stack), which bounds memory by the model's input size instead of the video's resolution.
    Every failure is an :class:`InputError` with a one-line message.
    """
    path, name = _resolve(source)
    metadata = probe_video(path)
    wanted = _check_indices(sample(metadata), metadata)
    keep = set(wanted.tolist())
    last = int(wanted[-1])
    frames: list[np.ndarray] = []
    kept: list[int] = []
    decoded: tuple[int, int] | None = None
    av = _av()
    with _open(path, name) as container:
        _video_stream(container, name)
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in keep:
                    pixels = frame.to_ndarray(format="rgb24")
                    decoded = decoded or pixels.shape[:2]
                    target = resize(len(wanted), *pixels.shape[:2]) if resize is not None else None
                    if target is not None and target[:2] != pixels.shape[:2]:
                        pixels = resize_frames(pixels[None], target[0], target[1], target[2])[0]
                    frames.append(pixels)
                    kept.append(i)
        except av.error.FFmpegError as e:
            raise InputError(
                f"cannot decode video {name}: {_one_line(e)} (corrupt data or an unsupported codec); re-encode it"
            ) from e
    if not frames:
        raise InputError(f"video {name} contains no decodable frames; check the file or re-encode it")
    if len(kept) < len(wanted):
        logger.warning(
            "video %s ended after %d frames although its header says %d; using the %d sampled frames that exist",
            name,
            i + 1,
            metadata.total_frames,
            len(kept),
        )
    if len({f.shape for f in frames}) > 1:
        raise InputError(f"video {name} changes its frame size mid-stream; re-encode it at one resolution")
    return VideoClip(
        frames=np.stack(frames), indices=np.asarray(kept, dtype=np.int64), metadata=metadata, decoded_size=decoded
    )
