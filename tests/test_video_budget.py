"""A video whose tokens cannot fit is refused from its headers, before any frame is decoded (issue 20, item 4), and
the frames that are decoded are resized one by one as they arrive (memory follows the model's input, not the video).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

pytest.importorskip("av")

from vlm_export.errors import InputError
from vlm_export.manifest import Manifest
from vlm_export.runtime import video_io
from vlm_export.runtime.families import MediaItem, runtime_family_for
from vlm_export.runtime.video_resize import resize_frames
from vlm_export.testing.videos import write_test_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("budget") / "clip.mp4", num_frames=60, width=96, height=64)


def _family(folder, max_seq_len: int):
    manifest = copy.deepcopy(Manifest.load(folder))
    manifest.limits.max_seq_len = max_seq_len
    return runtime_family_for(manifest, folder)


def _count_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open = video_io._open

    def counting_open(path, name):
        opened.append(path)
        return real_open(path, name)

    monkeypatch.setattr(video_io, "_open", counting_open)
    return opened


@pytest.mark.parametrize(
    ("export", "default_sampling"),
    [
        ("exported_llava_onevision", "every frame"),
        ("exported_qwen2_5_vl", "every frame"),
        ("exported_qwen3_vl", "the model's default sampling"),
    ],
)
def test_too_many_tokens_refused_before_decoding(export, default_sampling, clip, monkeypatch, request):
    folder = request.getfixturevalue(export)
    tokens = _family(folder, max_seq_len=1 << 20).encode_media([MediaItem("video", str(clip))], [1]).token_counts[0]
    limit = tokens // 2 + 1
    family = _family(folder, max_seq_len=limit)
    opened = _count_opens(monkeypatch)
    with pytest.raises(InputError, match=default_sampling) as error:
        family.encode_media([MediaItem("video", str(clip))], [1])
    message = str(error.value)
    assert len(opened) == 1, "the video was opened for decoding"  # the probe alone
    assert f"about {tokens:,} tokens" in message and f"limit of {limit:,} tokens" in message
    assert "--num-frames" in message and "\n" not in message
    suggested = int(re.search(r"num_frames=(\d+)", message).group(1))
    visual = family.encode_media([MediaItem("video", str(clip), {"num_frames": suggested})], [1])
    assert 0 < visual.token_counts[0] < limit  # the suggestion fits


def test_asked_frames_are_checked_too(exported_llava_onevision, clip, monkeypatch):
    family = _family(exported_llava_onevision, max_seq_len=400)
    opened = _count_opens(monkeypatch)
    with pytest.raises(InputError, match="as asked"):
        family.encode_media([MediaItem("video", str(clip), {"num_frames": 30})], [1])
    assert len(opened) == 1


def test_resizing_while_decoding_gives_the_same_frames(clip):
    picks = np.array([0, 7, 8, 31, 59])
    whole = video_io.load_video(clip, lambda meta: picks)
    streamed = video_io.load_video(clip, lambda meta: picks, lambda count, h, w: (40, 56, "bicubic"))
    assert streamed.decoded_size == whole.frames.shape[1:3] == (64, 96)
    np.testing.assert_array_equal(streamed.frames, resize_frames(whole.frames, 40, 56, "bicubic"))
    np.testing.assert_array_equal(streamed.indices, whole.indices)
