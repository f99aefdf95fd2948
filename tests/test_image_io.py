"""load_image: sources, conversions and one-line errors (no transformers needed)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.image_io import array_to_image, load_image


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def rgb():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))


@pytest.fixture
def png_path(tmp_path, rgb):
    path = tmp_path / "image.png"
    rgb.save(path)
    return path


def _same(a: PIL.Image.Image, b: PIL.Image.Image) -> bool:
    return a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def test_every_source_kind_gives_the_same_image(png_path, rgb):
    data = png_path.read_bytes()
    encoded = base64.b64encode(data).decode()
    sources = [
        png_path,
        str(png_path),
        png_path.as_uri(),
        data,
        bytearray(data),
        f"data:image/png;base64,{encoded}",
        encoded,  # bare base64, as transformers accepts
        rgb,
        np.asarray(rgb),
    ]
    for source in sources:
        assert _same(load_image(source), rgb), type(source)


def test_exif_orientation_applied_to_files_not_to_pil_images(tmp_path, rgb):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    rgb.save(path, exif=exif)
    assert load_image(path).size == (30, 50)  # rotated upright, like transformers.image_utils.load_image
    with PIL.Image.open(path) as opened:
        assert load_image(opened).size == (50, 30)  # the processor does not rotate images it is given


def test_rgba_composited_on_white_for_pil_alpha_dropped_for_files(tmp_path):
    array = np.zeros((4, 4, 4), np.uint8)
    array[..., 0] = 200  # red under a fully transparent alpha
    image = PIL.Image.fromarray(array)
    assert np.asarray(load_image(image))[0, 0].tolist() == [255, 255, 255]
    path = tmp_path / "transparent.png"
    image.save(path)
    # transformers' load_image calls convert("RGB") on files, which keeps the colour under the alpha.
    assert np.asarray(load_image(path))[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "1", "RGBA", "YCbCr"])
def test_modes_become_rgb(mode):
    base = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8))
    if mode == "I;16":
        image = PIL.Image.fromarray(np.full((8, 9), 1000, np.uint16))
    else:
        image = base.convert("RGBA").convert(mode) if mode in ("LA", "PA") else base.convert(mode)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (9, 8)


def test_array_layouts_and_dtypes():
    hwc = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(array_to_image(hwc)), hwc)
    assert np.array_equal(np.asarray(array_to_image(hwc.transpose(2, 0, 1))), hwc)
    assert np.array_equal(np.asarray(array_to_image(hwc.astype(np.float64))), hwc)
    assert np.array_equal(np.asarray(array_to_image(hwc.astype(np.uint16))), hwc)
    # float [0, 1] is scaled by 255 and truncated, as transformers' to_pil_image does
    assert np.asarray(array_to_image(np.full((2, 2, 3), 0.5, np.float32)))[0, 0, 0] == 127
    gray = np.arange(42, dtype=np.uint8).reshape(6, 7)
    assert np.array_equal(np.asarray(array_to_image(gray)), np.repeat(gray[:, :, None], 3, axis=-1))


def _assert_one_line_input_error(source, *needles):
    with pytest.raises(InputError) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    _assert_one_line_input_error(missing, "not found", "nope.jpg")
    _assert_one_line_input_error(str(missing), "not found", "nope.jpg")
    _assert_one_line_input_error(missing.as_uri(), "not found")


def test_directory(tmp_path):
    _assert_one_line_input_error(tmp_path, "directory")


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    _assert_one_line_input_error(path, "broken.png")


def test_truncated_jpeg(tmp_path, rgb):
    buffer = io.BytesIO()
    rgb.resize((400, 300)).save(buffer, format="JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_one_line_input_error(path, "truncated.jpg", "truncated")


def test_corrupt_bytes_and_uris():
    _assert_one_line_input_error(b"garbage" * 20, "bytes")
    _assert_one_line_input_error("data:image/png;base64,AAAA" + "A" * 100, "data:image/png;base64")
    _assert_one_line_input_error("data:image/png,rawdata", "base64")
    _assert_one_line_input_error("https://example.com/cat.jpg", "download", "https://example.com/cat.jpg")
    _assert_one_line_input_error("file://otherhost/x.png", "local")


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.zeros((2, 5, 6, 3), np.uint8), "HxWxC"),
        (np.zeros((5, 6, 2), np.uint8), "channel"),
        (np.zeros((0, 6, 3), np.uint8), "HxWxC"),
        (np.zeros((5, 6, 3), bool), "uint8"),
        (np.zeros((5, 6, 3), object), "uint8"),
        (np.full((5, 6, 3), 1.5, np.float32), "[0, 1]"),
        (np.full((5, 6, 3), 300, np.uint16), "[0, 255]"),
        (np.full((5, 6, 3), -1, np.int16), "[0, 255]"),
        (np.full((5, 6, 3), np.nan, np.float32), "NaN"),
        (np.full((5, 6, 4), 2.0, np.float32), "RGBA"),
    ],
)
def test_bad_arrays(array, needle):
    _assert_one_line_input_error(array, needle, "numpy array")


def test_unsupported_type():
    _assert_one_line_input_error(12345, "int")


def test_pil_conversion_error_is_input_error():
    image = PIL.Image.new("La", (4, 4))  # Pillow cannot convert La to RGBA
    _assert_one_line_input_error(image, "La")


def test_path_objects_work(png_path, rgb):
    assert _same(load_image(Path(str(png_path))), rgb)
