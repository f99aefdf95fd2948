"""Video decoding (runtime/video_io.py) against transformers' PyAV loader, the torch-exact uint8 resize
(runtime/video_resize.py) against torchvision, and the one-line errors for bad video files.

Videos are written by the tests (vlm_export.testing.videos): odd frame sizes, NTSC 30000/1001 fps."""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.video_io import VideoMetadata, load_video, probe_video
from vlm_export.runtime.video_resize import resize_frames
from vlm_export.testing.videos import synthetic_frames, write_test_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        "ntsc_mp4": write_test_video(folder / "ntsc.mp4", 90, 75, 53, Fraction(30000, 1001)),
        "pal_mp4": write_test_video(folder / "pal.mp4", 61, 64, 47, 25, seed=1),
        "film_avi": write_test_video(folder / "film.avi", 40, 33, 45, Fraction(24000, 1001), seed=2),
        "ffv1_mkv": write_test_video(folder / "lossless.mkv", 30, 51, 29, Fraction(30000, 1001), seed=3, codec="ffv1"),
    }


HEADER_VIDEOS = ["ntsc_mp4", "pal_mp4", "film_avi"]  # containers that store a frame count


@pytest.mark.parametrize("name", HEADER_VIDEOS)
def test_metadata_matches_transformers_pyav(videos, name):
    video_utils = pytest.importorskip("transformers.video_utils")
    _, theirs = video_utils.load_video(str(videos[name]), backend="pyav", num_frames=2)
    ours = probe_video(videos[name])
    assert ours == VideoMetadata(
        total_frames=theirs.total_num_frames,
        fps=theirs.fps,
        duration=theirs.duration,
        width=theirs.width,
        height=theirs.height,
    )


@pytest.mark.parametrize("name", HEADER_VIDEOS)
def test_sampled_frames_match_transformers_pyav(videos, name):
    video_utils = pytest.importorskip("transformers.video_utils")
    total = probe_video(videos[name]).total_frames
    for picks in ([0], [total - 1], [0, 3, 4, total // 2, total - 1], list(range(0, total, 7))):
        picks = np.asarray(picks)
        frames, _ = video_utils.load_video(
            str(videos[name]), backend="pyav", sample_indices_fn=lambda metadata, picks=picks, **_: picks
        )
        clip = load_video(videos[name], lambda metadata, picks=picks: picks)
        np.testing.assert_array_equal(clip.indices, picks)
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == frames.shape
        np.testing.assert_array_equal(clip.frames, frames)


def test_frames_come_back_in_stream_order_once(videos):
    clip = load_video(videos["ntsc_mp4"], lambda meta: np.array([9, 2, 9, 5]))
    np.testing.assert_array_equal(clip.indices, [2, 5, 9])
    every = load_video(videos["ntsc_mp4"], lambda meta: np.arange(meta.total_frames))
    np.testing.assert_array_equal(clip.frames, every.frames[[2, 5, 9]])


def test_content_moves_between_frames(videos):
    """The synthetic content changes every frame, so a wrong frame index would show in pixel comparisons."""
    clip = load_video(videos["ntsc_mp4"], lambda meta: np.arange(meta.total_frames))
    steps = np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert steps.min() > 5
    source = synthetic_frames(90, 75, 53).astype(np.int16)
    # Lossy (mpeg4, 4:2:0), but each decoded frame is closest to the source frame of its own index.
    for index in (0, 1, 44, 89):
        errors = np.abs(clip.frames[index].astype(np.int16)[None] - source).mean(axis=(1, 2, 3))
        assert int(errors.argmin()) == index


def test_container_without_frame_count_falls_back_to_counting(videos):
    """Matroska stores no frame count (transformers' loader reads 0 there); the count comes from the packets."""
    import av

    with av.open(str(videos["ffv1_mkv"])) as container:
        assert container.streams.video[0].frames == 0
    meta = probe_video(videos["ffv1_mkv"])
    assert meta.total_frames == 30 and meta.fps == pytest.approx(30000 / 1001) and (meta.width, meta.height) == (51, 29)
    assert meta.duration == pytest.approx(30 / (30000 / 1001))
    clip = load_video(videos["ffv1_mkv"], lambda m: np.arange(m.total_frames))
    assert clip.frames.shape == (30, 29, 51, 3)


def test_truncated_file_returns_the_frames_that_exist(videos, tmp_path, caplog):
    data = write_test_video(tmp_path / "whole.avi", 90, 75, 53).read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])  # AVI keeps its header in front: still readable
    meta = probe_video(truncated)
    assert meta.total_frames == 90  # the header still says 90
    with caplog.at_level(logging.WARNING):
        clip = load_video(truncated, lambda m: np.array([0, 3, 89]))
    np.testing.assert_array_equal(clip.indices, [0, 3])
    assert "ended after" in caplog.text


def _one_line_error(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_missing_file_and_directory(tmp_path):
    assert "not found" in _one_line_error(lambda: probe_video(tmp_path / "nope.mp4"))
    assert "directory" in _one_line_error(lambda: probe_video(tmp_path))
    assert "does not download" in _one_line_error(lambda: probe_video("https://example.com/a.mp4"))
    assert "unsupported video source" in _one_line_error(lambda: probe_video(b"bytes"))  # type: ignore[arg-type]


def test_corrupt_file(tmp_path, videos):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01garbage" * 500)
    assert "cannot read video" in _one_line_error(lambda: load_video(garbage, lambda m: np.arange(1)))
    cut = tmp_path / "cut.mp4"  # MP4 keeps its index at the end: a cut file is unreadable
    cut.write_bytes(videos["ntsc_mp4"].read_bytes()[:3000])
    assert "cannot read video" in _one_line_error(lambda: probe_video(cut))


def test_zero_frame_file(tmp_path):
    empty = write_test_video(tmp_path / "empty.avi", num_frames=0)
    assert "no frames" in _one_line_error(lambda: probe_video(empty))
    assert "no frames" in _one_line_error(lambda: load_video(empty, lambda m: np.arange(1)))


def test_audio_only_file(tmp_path):
    import av

    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert "no video stream" in _one_line_error(lambda: probe_video(path))


def test_bad_sample_indices(videos):
    path = videos["pal_mp4"]
    assert "frames 0..61" in _one_line_error(lambda: load_video(path, lambda m: np.array([0, m.total_frames])))
    assert "indices" in _one_line_error(lambda: load_video(path, lambda m: np.array([], dtype=np.int64)))
    assert "indices" in _one_line_error(lambda: load_video(path, lambda m: np.array([0.5])))


# ---------------------------------------------------------------------------------------------- resize
RESIZE_CASES = [
    ((53, 75), (56, 84)),  # both sides grow
    ((53, 75), (28, 56)),  # both shrink
    ((480, 641), (476, 644)),  # one shrinks slightly, the other grows: where Pillow differs most
    ((47, 64), (64, 64)),
    ((33, 45), (64, 64)),
    ((300, 401), (84, 112)),  # strong downscale: wide filters
    ((17, 900), (28, 896)),
    ((64, 64), (64, 32)),  # one axis unchanged
]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_is_bit_exact_with_torchvision(mode):
    torch = pytest.importorskip("torch")
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    interpolation = {"bicubic": tvf.InterpolationMode.BICUBIC, "bilinear": tvf.InterpolationMode.BILINEAR}[mode]
    rng = np.random.default_rng(0)
    for (h, w), (nh, nw) in RESIZE_CASES:
        frames = synthetic_frames(2, w, h, seed=h)
        frames[1] = rng.integers(0, 256, frames[1].shape, dtype=np.uint8)  # noise: every weight matters
        theirs = tvf.resize(
            torch.from_numpy(frames).permute(0, 3, 1, 2), [nh, nw], interpolation=interpolation, antialias=True
        )
        ours = resize_frames(frames, nh, nw, mode)
        np.testing.assert_array_equal(ours, theirs.permute(0, 2, 3, 1).numpy(), err_msg=f"{(h, w)} -> {(nh, nw)}")


def test_pillow_is_not_torch():
    """Why resize_frames exists: Pillow's bicubic (22-bit weights) differs from torch's int16 weights."""
    import PIL.Image

    frame = synthetic_frames(1, 641, 480)[0]
    pil = np.asarray(PIL.Image.fromarray(frame).resize((644, 476), PIL.Image.Resampling.BICUBIC))
    ours = resize_frames(frame[None], 476, 644)[0]
    assert 0 < np.abs(pil.astype(np.int16) - ours).max() <= 5
