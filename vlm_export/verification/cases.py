"""The golden inputs: media the exporter draws itself and the conversations that use them.

The media are lossless and decode to the same pixels everywhere: PNG images, and a video of PNG frames in a QuickTime
container (decoded straight to RGB, with no codec rounding or colour conversion that could differ between an x86
export machine and an ARM device). The cases cover an odd-size image, two images of different shapes, a short
video (when the export has video settings), text only, and a left-padded batch of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.verification.golden import Conversation

#: name: (width, height) — odd sizes, one portrait and one wide, so resizing rounds differently on each axis.
IMAGES = {"image_odd.png": (97, 131), "image_wide.png": (300, 118)}
VIDEO = "video.mov"
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 8, (75, 53), 4


@dataclass
class CaseSpec:
    name: str
    description: str
    conversations: list[Conversation]


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients with a few blocks and mild noise: resizing has edges and texture to work on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    picture = np.stack(
        [127.5 + 110 * np.sin(x / (width / 2.3) + y / (height / 1.9) + phase[c] + 2.1 * c) for c in range(3)], axis=-1
    )
    for _ in range(4):
        top, left = int(rng.integers(0, height * 3 // 4)), int(rng.integers(0, width * 3 // 4))
        picture[top : top + height // 5, left : left + width // 6] = rng.integers(0, 256, 3)
    picture += rng.normal(0, 6, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_media(folder: Path, video: bool) -> list[str]:
    """Write the golden images (and the video) into `folder`; returns their file names."""
    names = []
    for seed, (name, (width, height)) in enumerate(IMAGES.items()):
        Image.fromarray(_picture(width, height, seed)).save(folder / name)
        names.append(name)
    if video:
        _write_video(folder / VIDEO)
        names.append(VIDEO)
    return names


def _write_video(path: Path) -> None:
    import av

    width, height = VIDEO_SIZE
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("png", rate=Fraction(VIDEO_FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for index in range(VIDEO_FRAMES):
            frame = np.roll(_picture(width, height, seed=7), shift=(2 * index, 3 * index), axis=(0, 1))
            frame[: height // 4, : width // 4] = (30 * index) % 256  # a block that changes from frame to frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _user(*parts: Any) -> Conversation:
    content = []
    for part in parts:
        if part in IMAGES:
            content.append({"type": "image", "path": part})
        elif part == VIDEO:
            content.append({"type": "video", "path": part})
        else:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def golden_cases(video: bool, max_batch: int | None) -> list[CaseSpec]:
    """The golden cases for an export (`video`: it has video settings; `max_batch`: its batch limit)."""
    cases = [
        CaseSpec("text_only", "text only", [_user("Write a haiku about rivers and mountains.")]),
        CaseSpec("image_odd_size", "one 97x131 image", [_user("image_odd.png", "Describe the image in detail.")]),
        CaseSpec(
            "two_images",
            "a 300x118 and a 97x131 image in one message",
            [_user("image_wide.png", "image_odd.png", "Compare these two pictures.")],
        ),
    ]
    if video:
        cases.append(
            CaseSpec(
                "video",
                f"a {VIDEO_FRAMES}-frame {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} video, the processor's default sampling",
                [_user(VIDEO, "What happens in this video?")],
            )
        )
    if max_batch is None or max_batch >= 2:
        cases.append(
            CaseSpec(
                "batch_padded",
                "a batch of two (an image and text, text only), left-padded",
                [_user("image_wide.png", "What is in this picture? Answer briefly."), _user("Hi!")],
            )
        )
    return cases


def user_case(images: list[str], videos: list[str], prompt: str | None, video_options: dict[str, Any]) -> CaseSpec:
    """A case from the user's --image / --video / --prompt (absolute paths; images first, as vlm-run orders them)."""
    content: list[dict[str, Any]] = [{"type": "image", "path": path} for path in images]
    content += [{"type": "video", "path": path, **video_options} for path in videos]
    content.append({"type": "text", "text": prompt if prompt is not None else "Describe this in detail."})
    return CaseSpec("user", "the --image / --video / --prompt given", [[{"role": "user", "content": content}]])
