"""Image loading for the runtime: numpy + Pillow only, no torch, no transformers.

Every source is turned into the RGB ``PIL.Image`` that transformers' Qwen2-VL PIL image processor
(``Qwen2VLImageProcessorPil``) would resize, so that the numpy preprocessing downstream reproduces its
pixel values exactly. Where transformers treats sources differently, this module copies the difference:

* paths, ``file://`` URIs, ``data:`` URIs, base64 strings and encoded bytes go through the equivalent of
  ``transformers.image_utils.load_image``: EXIF orientation applied, then ``convert("RGB")`` (which drops an
  alpha channel rather than compositing it), then the processor's own ``convert_to_rgb``;
* ``PIL.Image`` objects get only the processor's ``convert_to_rgb`` (alpha composited on white, EXIF
  orientation *not* applied, because transformers does not apply it to images it is handed);
* numpy arrays follow the processor's array path (channel inference, alpha compositing, the to-PIL
  conversion its resize performs).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import stat
import threading
import warnings
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import PIL.Image
import PIL.ImageOps

from vlm_export.errors import InputError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | PIL.Image.Image | np.ndarray | bytes

__all__ = ["ImageSource", "array_to_image", "convert_to_rgb", "describe_source", "load_image"]

# A bare string is taken for base64 only when it cannot plausibly be a path: long and base64 alphabet only.
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")
_MIN_BARE_BASE64_CHARS = 256
_CHANNEL_COUNTS = (1, 3, 4)


def load_image(source: ImageSource) -> PIL.Image.Image:
    """Open ``source`` and return the RGB image transformers' Qwen2-VL PIL processor would resize.

    Accepts a local path (``str`` / ``os.PathLike``), a ``file://`` URI, a ``data:image/...;base64,`` URI,
    a long bare base64 string, the encoded bytes of an image file, a ``PIL.Image`` or a numpy array
    (see :func:`array_to_image`). http(s) URLs are refused: the runtime never touches the network.
    Every failure raises :class:`InputError` with a one-line message.
    """
    if isinstance(source, PIL.Image.Image):
        return convert_to_rgb(source, name=describe_source(source))
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _decode(io.BytesIO(data), describe_source(data))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
        if isinstance(source, bytes):
            source = os.fsdecode(source)
        return _load_path(source, describe_source(source))
    if isinstance(source, str):
        return _load_string(source)
    raise InputError(
        f"unsupported image source of type {type(source).__name__}: pass a file path, a data: URI, "
        "encoded image bytes, a PIL.Image or a numpy array"
    )


def describe_source(source: object) -> str:
    """A short, one-line name for ``source`` to put in error messages (never a whole base64 payload)."""
    if isinstance(source, PIL.Image.Image):
        return f"PIL image (mode {source.mode}, {source.width}x{source.height})"
    if isinstance(source, np.ndarray):
        return f"numpy array (shape {tuple(source.shape)}, dtype {source.dtype})"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes of image data>"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            head = source.split(",", 1)[0]
            return f"{head},... ({len(source)} chars)"
        if len(source) > 200:
            return f"{source[:60]!r}... ({len(source)} chars)"
        return repr(source)
    return f"<{type(source).__name__}>"


def _one_line(error: BaseException) -> str:
    """Collapse an exception's message onto one short line, so CLI errors stay one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _load_string(source: str) -> PIL.Image.Image:
    """Dispatch a string source: URL schemes first, then an existing path, then bare base64."""
    name = describe_source(source)
    lowered = source[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise InputError(
            f"cannot load image {name}: the runtime does not download; fetch the file first and pass its path"
        )
    if lowered.startswith("data:"):
        return _decode(io.BytesIO(_decode_data_uri(source, name)), name)
    if lowered.startswith("file:"):
        parsed = urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"cannot load image {name}: only local file:// URIs are supported")
        return _load_path(url2pathname(unquote(parsed.path)), name)
    if os.path.exists(source):
        return _load_path(source, name)
    if len(source) >= _MIN_BARE_BASE64_CHARS and _BASE64_RE.match(source):
        try:
            data = base64.decodebytes(source.encode())
        except (binascii.Error, ValueError) as e:
            raise InputError(f"cannot decode base64 image {name}: {_one_line(e)}") from e
        return _decode(io.BytesIO(data), name)
    raise InputError(f"image file not found: {name}; check the path (relative paths are resolved from the cwd)")


def _decode_data_uri(uri: str, name: str) -> bytes:
    """Payload of a ``data:[<mime>];base64,<payload>`` URI (transformers accepts base64 only, so do we)."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InputError(f"cannot load image {name}: only base64 data URIs (data:image/...;base64,...) work")
    try:
        # decodebytes, like transformers: skips characters outside the alphabet (line breaks, spaces).
        return base64.decodebytes(payload.encode())
    except (binascii.Error, ValueError) as e:
        raise InputError(f"cannot decode data URI {name}: {_one_line(e)}; re-encode the image as base64") from e


def _load_path(path: str, name: str) -> PIL.Image.Image:
    """Open a local file, with clear errors for the usual filesystem problems."""
    if not os.path.exists(path):
        raise InputError(f"image file not found: {name}; check the path (relative paths are resolved from the cwd)")
    if os.path.isdir(path):
        raise InputError(f"image path {name} is a directory; pass an image file")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block until something writes to it
        raise InputError(f"image path {name} is not a regular file (a pipe or device?); save the image to a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"image file {name} is not readable; check its permissions")
    return _decode(path, name)


def _decode(fp: str | io.BytesIO, name: str) -> PIL.Image.Image:
    """Decode an encoded image like ``transformers.image_utils.load_image``, then ``convert_to_rgb``.

    transformers applies ``PIL.ImageOps.exif_transpose`` and ``convert("RGB")`` (image_utils.py,
    ``load_image``); the processor then runs its ``convert_to_rgb`` on that RGB image, which still matters
    when ``convert`` left a ``transparency`` entry in ``info`` (palette images with a transparent index).
    """
    try:
        with _open_quietly(fp, name) as opened:
            image = PIL.ImageOps.exif_transpose(opened)  # loads the pixels; returns a new image
            image = image.convert("RGB")
    except PIL.Image.DecompressionBombError as e:
        raise InputError(f"image {name} is too large to decode safely ({_one_line(e)}); downscale it first") from e
    except PIL.UnidentifiedImageError as e:
        raise InputError(
            f"cannot read image {name}: not an image file Pillow recognises; pass a PNG, JPEG, WebP, BMP, "
            "GIF or TIFF file"
        ) from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on broken files
        raise InputError(
            f"cannot read image {name}: {_one_line(e)} (the file is corrupt or truncated); re-save or re-download it"
        ) from e
    return convert_to_rgb(image, name=name)


_WARNINGS_LOCK = threading.Lock()  # catch_warnings swaps process-wide state: one opener at a time


def _open_quietly(fp: str | io.BytesIO, name: str) -> PIL.Image.Image:
    """``PIL.Image.open`` (headers only), with Pillow's warnings (a DecompressionBombWarning for images between its
    warning and error thresholds, damaged-header notes) turned into one logged line each instead of raw two-line
    warnings; other warnings raised meanwhile are shown as they would have been."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PIL.Image.DecompressionBombWarning)
        opened = PIL.Image.open(fp)
    for warning in caught:
        if issubclass(warning.category, PIL.Image.DecompressionBombWarning):
            pixels = opened.width * opened.height
            logger.warning(
                "image %s has %s pixels, above Pillow's decompression-bomb warning threshold (%s): decoding it "
                "takes about %.1f GB; downscale it first if that is not intended",
                name,
                f"{pixels:,}",
                f"{PIL.Image.MAX_IMAGE_PIXELS:,}",
                pixels * 4 / 1e9,
            )
        elif f"{os.sep}PIL{os.sep}" in warning.filename:  # Pillow on a damaged file, e.g. a TIFF tag past the end
            logger.warning("image %s: %s", name, " ".join(str(warning.message).split()))
        else:  # another thread's warning caught meanwhile
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return opened


def convert_to_rgb(image: PIL.Image.Image, *, name: str | None = None) -> PIL.Image.Image:
    """RGB copy of ``image`` exactly as transformers' ``convert_to_rgb`` makes it (image_transforms.py).

    Images with an alpha band (any band named "A", which includes LAB's a* band) or a ``transparency``
    entry in ``info`` are converted to RGBA and alpha-composited onto opaque white; everything else
    (L, P, CMYK, I;16, YCbCr, ...) goes through Pillow's plain ``convert("RGB")``.
    """
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # e.g. "conversion from La to RGB not supported"
        label = name or describe_source(image)
        raise InputError(f"cannot convert image {label} to RGB: {_one_line(e)}; convert it to RGB or RGBA first") from e


def infer_channel_axis(shape: tuple[int, ...]) -> int | None:
    """Channel axis of a 3-D image shape the way transformers infers it, or None when it cannot tell.

    Mirrors ``infer_channel_dimension_format(image, num_channels=(1, 3, 4))`` (image_utils.py): a first
    axis of 1, 3 or 4 wins, even when the last axis would also fit (transformers warns and assumes
    channels-first), so a 3x3x3 or 4x100x3 array is read as channels-first.
    """
    if shape[0] in _CHANNEL_COUNTS:
        return 0
    if shape[-1] in _CHANNEL_COUNTS:
        return 2
    return None


def array_to_image(array: np.ndarray) -> PIL.Image.Image:
    """RGB image from a numpy array, reproducing the processor's array path up to its PIL resize.

    Layouts: ``HxWxC`` or ``CxHxW`` with C in {1, 3, 4} (channel axis inferred as transformers does, with
    channels-first winning ties), plus ``HxW`` grayscale (transformers itself refuses 2-D arrays; this is
    the same as passing ``HxWx1``). 4 channels are alpha-composited on white with transformers' numpy
    arithmetic (``round(a*rgb + (1-a)*255)`` for integers; floats must lie in [0, 1]).

    Values: uint8 is used as is; other integer dtypes, and float arrays holding whole numbers, must lie in
    [0, 255]; other float arrays must lie in [0, 1] and are scaled by 255 and truncated to uint8, as
    transformers' ``to_pil_image`` does before resizing. Quirk not copied: with its default
    ``do_rescale=True`` transformers then divides a [0, 1] float array by 255 a second time (its resize
    scales back to [0, 1], then ``rescale`` applies 1/255 again), feeding the model a nearly black image;
    here a [0, 1] float array gives what transformers gives with ``do_rescale=False``, the setting its
    docs prescribe for already-scaled images.
    """
    name = describe_source(array)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise InputError(f"unsupported image array {name}: use uint8 (0-255) or float (0-1) pixel values")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or 0 in array.shape:
        raise InputError(
            f"unsupported image array {name}: expected one image shaped HxWxC or CxHxW (C = 1, 3 or 4) "
            "or HxW; pass a batch as a list of arrays"
        )
    axis = infer_channel_axis(array.shape)
    if axis is None:
        raise InputError(
            f"unsupported image array {name}: cannot find a channel axis of size 1, 3 or 4 at either end; "
            "pass HxWx3 (RGB) or 3xHxW"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"unsupported image array {name}: it contains NaN or infinite values")
    hwc = np.moveaxis(array, axis, -1)
    rgb = _array_to_rgb(hwc, name)
    return PIL.Image.fromarray(np.ascontiguousarray(_to_uint8(rgb, name)))


def _array_to_rgb(hwc: np.ndarray, name: str) -> np.ndarray:
    """Channels-last array to 3 channels, as transformers' ``convert_to_rgb`` does for numpy input."""
    channels = hwc.shape[-1]
    if channels == 1:
        return np.repeat(hwc, 3, axis=-1)
    if channels == 4:
        is_float = np.issubdtype(hwc.dtype, np.floating)
        if is_float and (hwc.min() < 0.0 or hwc.max() > 1.0):
            raise InputError(
                f"unsupported image array {name}: float RGBA values must lie in [0, 1], got "
                f"[{hwc.min()}, {hwc.max()}]; scale it or pass uint8"
            )
        white = 1.0 if is_float else 255
        alpha = hwc[..., 3:4] / white
        composite = alpha * hwc[..., :3] + (1 - alpha) * white
        return composite.astype(hwc.dtype) if is_float else np.round(composite).astype(hwc.dtype)
    return hwc


def _to_uint8(rgb: np.ndarray, name: str) -> np.ndarray:
    """uint8 pixels as transformers' ``to_pil_image`` makes them (``_rescale_for_pil_conversion``)."""
    if rgb.dtype == np.uint8:
        return rgb
    if np.allclose(rgb, rgb.astype(int)):
        if rgb.min() < 0 or rgb.max() > 255:
            raise InputError(
                f"unsupported image array {name}: whole-number pixel values must lie in [0, 255], got "
                f"[{rgb.min()}, {rgb.max()}]; convert it to uint8 first (e.g. 16-bit images: >> 8)"
            )
        return rgb.astype(np.uint8)
    if rgb.min() >= 0 and rgb.max() <= 1:
        # transformers' rescale(image, 255): multiply in float64, cast to float32, then truncate to uint8.
        return (rgb.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise InputError(
        f"unsupported image array {name}: float pixel values must lie in [0, 1] (or be whole numbers in "
        f"[0, 255]), got [{rgb.min()}, {rgb.max()}]"
    )
