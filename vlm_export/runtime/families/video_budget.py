"""Refuse a video whose tokens cannot fit before decoding any of it.

The frame count and size are in the container's headers and the sampling rule is known, so a family can count a
video's placeholder tokens from `VideoMetadata` alone. Without this, a long clip sampled at "every frame" (the
default of transformers' LLaVA-OneVision and Qwen2.5-VL video processors) was decoded in full, using gigabytes and
tens of seconds, only for the prompt-length check to refuse it afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vlm_export.errors import InputError
from vlm_export.manifest import Manifest
from vlm_export.runtime.video_io import VideoMetadata

__all__ = ["check_video_tokens", "token_limit"]


def token_limit(manifest: Manifest) -> int | None:
    """Longest prompt + generation the export takes: its max_seq_len, else the decoder's position range."""
    if manifest.limits.max_seq_len is not None:
        return manifest.limits.max_seq_len
    positions = manifest.text.get("max_position_embeddings")
    return positions if isinstance(positions, int) and positions > 0 else None


def _fits(tokens_for: Callable[[int], int], total: int, limit: int, step: int) -> int:
    """Largest frame count (a multiple of `step`, at most `total`) whose tokens stay under `limit`; 0 if none."""
    low, high = 0, total // step  # in units of `step` frames; tokens grow with the frame count
    while low < high:
        middle = (low + high + 1) // 2
        if tokens_for(middle * step) < limit:
            low = middle
        else:
            high = middle - 1
    return low * step


def check_video_tokens(
    name: str,
    metadata: VideoMetadata,
    sampled: int,
    tokens_for: Callable[[int], int],
    limit: int | None,
    *,
    sampling: str,
    step: int = 1,
) -> None:
    """Raise `InputError` if `sampled` frames of this video need `limit` tokens or more on their own.

    `tokens_for(n)` counts the video's placeholder tokens when n frames are sampled (a lower bound of its share of
    the prompt); `sampling` says how the frames were picked, for the message; `step` is the frame-count granularity
    the sampler keeps (e.g. whole temporal patches). The message names the options that fix it, with values that fit.
    """
    if limit is None:
        return
    tokens = tokens_for(sampled)
    if tokens < limit:
        return
    fit = _fits(tokens_for, min(metadata.total_frames, sampled), limit, step)
    if fit == 0:
        hint = "even the fewest frames do not fit: use a shorter, lower-resolution video"
    else:
        fps = math.floor(fit / metadata.duration * 10) / 10 if metadata.duration > 0 else 0.0
        fps_hint = f" or fps={fps:g}" if fps > 0 else ""
        cli_fps = f" / --fps {fps:g}" if fps > 0 else ""
        hint = (
            f"sample fewer frames with num_frames={fit}{fps_hint} in the video part (vlm-run --num-frames {fit}"
            f"{cli_fps})"
        )
    raise InputError(
        f"{name} would need about {tokens:,} tokens ({sampled:,} frames, {sampling}), more than this export's limit "
        f"of {limit:,} tokens (prompt + generated); {hint}, or re-export with a larger --max-seq-len"
    )
