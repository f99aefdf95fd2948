"""Parity of the numpy Qwen2-VL preprocessing with transformers' ``Qwen2VLImageProcessorPil``."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.qwen2_vl.preprocess import (
    Qwen2VLImageConfig,
    grid_for_size,
    num_image_tokens,
    patchify,
    preprocess_images,
    smart_resize,
)
from vlm_export.runtime.image_io import load_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Processor kwargs, given to transformers' class and to from_processor_dict alike.
CONFIGS = {
    "qwen2.5-vl": {
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 256,
    },
    "qwen3-vl": {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256},
    },
}
SIZES = [(37, 53), (53, 37), (17, 900), (224, 224), (480, 641), (1025, 1919), (3000, 2001), (9, 13)]
TOL = 1e-6


@pytest.fixture(scope="module")
def hf():
    """transformers' PIL-backend processors for each config (skipped where transformers is absent)."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return {name: Qwen2VLImageProcessorPil(**kw) for name, kw in CONFIGS.items()}


def _reference(processor, images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images=images, **kwargs)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _assert_same(processor, cfg, ref_images, ours_images, **kwargs):
    ref_pixels, ref_grid = _reference(processor, ref_images, **kwargs)
    max_pixels = kwargs.get("size", {}).get("longest_edge")
    ours = preprocess_images(ours_images, cfg, max_pixels=max_pixels)
    assert ours.pixel_values.dtype == np.float32 and ours.grid_thw.dtype == np.int64
    np.testing.assert_array_equal(ours.grid_thw, ref_grid)
    assert ours.pixel_values.shape == ref_pixels.shape
    diff = float(np.abs(ours.pixel_values - ref_pixels).max())
    assert diff <= TOL, diff
    return ours


def _random_image(rng, height, width, mode="RGB"):
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        return rgba
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_sizes_match_transformers(hf, config, height, width):
    rng = np.random.default_rng(height * 10007 + width)
    image = _random_image(rng, height, width)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS[config])
    ours = _assert_same(hf[config], cfg, image, [load_image(image)])
    t, gh, gw = grid_for_size(height, width, cfg)
    assert ours.grid_thw.tolist() == [[t, gh, gw]]


@pytest.mark.parametrize(("height", "width"), [(480, 641), (1025, 1919)])
def test_hub_default_pixel_range(height, width):
    """Qwen2.5-VL's shipped range: these sizes change only slightly (476x644, 1036x1932), where the
    torchvision backend's antialiased bicubic differs most from Pillow's."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hub = {**CONFIGS["qwen2.5-vl"], "min_pixels": 3136, "max_pixels": 12845056}
    image = _random_image(np.random.default_rng(12), height, width)
    cfg = Qwen2VLImageConfig.from_processor_dict(hub)
    _assert_same(Qwen2VLImageProcessorPil(**hub), cfg, image, [load_image(image)])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_several_images_concatenated_in_order(hf, config):
    rng = np.random.default_rng(1)
    images = [_random_image(rng, h, w) for h, w in [(37, 53), (300, 200), (9, 13), (480, 641)]]
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS[config])
    ours = _assert_same(hf[config], cfg, images, [load_image(i) for i in images])
    assert ours.grid_thw.shape == (4, 3)


@pytest.mark.parametrize("max_pixels", [28 * 28 * 4, 28 * 28 * 64, 512 * 512])
def test_max_pixels_override(hf, max_pixels):
    rng = np.random.default_rng(2)
    images = [_random_image(rng, 1025, 1919), _random_image(rng, 37, 53)]
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    size = {"shortest_edge": cfg.min_pixels, "longest_edge": max_pixels}
    ours = _assert_same(hf["qwen2.5-vl"], cfg, images, images, size=size)
    _, gh, gw = ours.grid_thw[0]  # the big image is shrunk under the cap (small ones may not be: min_pixels)
    assert gh * gw * 14 * 14 <= max_pixels


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P", "L", "1", "I;16", "I", "F", "CMYK", "YCbCr", "LAB"])
def test_pil_modes_match_transformers(hf, mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65536, (41, 67), dtype=np.uint16))
        assert image.mode == "I;16"
    elif mode in ("LA", "PA"):
        image = _random_image(rng, 41, 67, "RGBA").convert(mode)
    else:
        image = _random_image(rng, 41, 67, mode)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    _assert_same(hf["qwen2.5-vl"], cfg, image, [load_image(image)])


def test_palette_with_transparent_index(hf):
    # P + info["transparency"]: convert_to_rgb composites on white (the "A"-less alpha path).
    rng = np.random.default_rng(4)
    image = _random_image(rng, 40, 60).convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    _assert_same(hf["qwen2.5-vl"], cfg, image, [load_image(image)])


@pytest.mark.parametrize(
    ("suffix", "mode", "save_kwargs"),
    [
        ("jpg", "RGB", {}),
        ("png", "RGBA", {}),
        ("png", "P", {"transparency": 0}),
        ("png", "LA", {}),
        ("tiff", "CMYK", {}),
        ("png", "I;16", {}),
    ],
)
def test_files_match_transformers(hf, tmp_path, suffix, mode, save_kwargs):
    """Paths go through transformers' load_image (EXIF, convert("RGB")) before the processor."""
    rng = np.random.default_rng(5)
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65536, (45, 70), dtype=np.uint16))
    else:
        image = _random_image(rng, 45, 70, "RGBA" if mode in ("RGBA", "LA") else mode).convert(mode)
    path = tmp_path / f"image.{suffix}"
    image.save(path, **save_kwargs)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    _assert_same(hf["qwen2.5-vl"], cfg, str(path), [load_image(path)])


def test_exif_rotated_jpeg_from_disk(hf, tmp_path):
    rng = np.random.default_rng(6)
    image = _random_image(rng, 60, 100)  # stored landscape, orientation 6 -> shown portrait
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (60, 100)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    ours = _assert_same(hf["qwen2.5-vl"], cfg, str(path), [loaded])
    _, gh, gw = ours.grid_thw[0]
    assert gh > gw


def _arrays():
    rng = np.random.default_rng(7)
    hwc = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (45, 70, 4), dtype=np.uint8)
    return {
        "hwc_uint8": hwc,
        "chw_uint8": np.ascontiguousarray(hwc.transpose(2, 0, 1)),
        "hwc_gray": hwc[:, :, :1],
        "chw_gray": np.ascontiguousarray(hwc[:, :, :1].transpose(2, 0, 1)),
        "hwc_rgba": rgba,
        "chw_rgba": np.ascontiguousarray(rgba.transpose(2, 0, 1)),
        "hwc_float_whole": hwc.astype(np.float32),
        "hwc_int64": hwc.astype(np.int64),
        "ambiguous_3x60x4": rng.integers(0, 256, (3, 60, 4), dtype=np.uint8),
        "rgba_float": rgba.astype(np.float64) / 255,
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_numpy_arrays_match_transformers(hf, name):
    array = _arrays()[name]
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    # transformers double-rescales float arrays in [0, 1]; compare those with its do_rescale=False.
    kwargs = {"do_rescale": False} if name == "rgba_float" else {}
    _assert_same(hf["qwen2.5-vl"], cfg, array, [load_image(array)], **kwargs)


def test_float_unit_range_array_matches_transformers_without_rescale(hf):
    rng = np.random.default_rng(8)
    array = rng.random((50, 33, 3), dtype=np.float32)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    _assert_same(hf["qwen2.5-vl"], cfg, array, [load_image(array)], do_rescale=False)


def test_grayscale_2d_array_equals_hwc1(hf):
    array = np.random.default_rng(9).integers(0, 256, (45, 70), dtype=np.uint8)
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    _assert_same(hf["qwen2.5-vl"], cfg, array[:, :, None], [load_image(array)])


def test_smart_resize_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(10)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (2000, 2)) if max(h, w) / min(h, w) <= 200]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 64 * 64, 16777216), (28, 3136, 28 * 28 * 4)]:
        for h, w in sizes:
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w)


@pytest.mark.parametrize(("height", "width"), [(1, 201), (5000, 20), (0, 10)])
def test_smart_resize_refuses_extreme_aspect(height, width):
    with pytest.raises(InputError) as info:
        smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
    assert "\n" not in str(info.value) and f"{width}x{height}" in str(info.value)


def test_preprocess_refuses_extreme_aspect_image():
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_images([PIL.Image.new("RGB", (402, 2))], cfg)


def test_without_resize_needs_multiples_of_factor():
    cfg = Qwen2VLImageConfig.from_processor_dict({**CONFIGS["qwen2.5-vl"], "do_resize": False})
    out = preprocess_images([PIL.Image.new("RGB", (56, 84))], cfg)
    assert out.grid_thw.tolist() == [[1, 6, 4]]
    with pytest.raises(InputError, match="multiple of 28"):
        preprocess_images([PIL.Image.new("RGB", (57, 84))], cfg)


def test_empty_list_and_type_errors():
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen2.5-vl"])
    out = preprocess_images([], cfg)
    assert out.pixel_values.shape == (0, 1176) and out.grid_thw.shape == (0, 3)
    with pytest.raises(TypeError, match="load_image"):
        preprocess_images([np.zeros((28, 28, 3), np.uint8)], cfg)  # type: ignore[list-item]


def test_patchify_video_frames_layout():
    """T frames -> grid_t = ceil(T / temporal), odd T padded with the last frame, rows in merge order."""
    p, m, tp = 2, 2, 2
    rng = np.random.default_rng(11)
    frames = rng.random((3, 3, 8, 12)).astype(np.float32)
    flat, (gt, gh, gw) = patchify(frames, p, m, tp)
    assert (gt, gh, gw) == (2, 4, 6) and flat.shape == (2 * 4 * 6, 3 * tp * p * p)
    padded = np.concatenate([frames, frames[-1:]])
    row = 0
    for t in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        block = padded[t * tp : (t + 1) * tp, :, y : y + p, x : x + p]  # [tt, C, p, p]
                        np.testing.assert_array_equal(flat[row], block.transpose(1, 0, 2, 3).reshape(-1))
                        row += 1


def test_num_image_tokens():
    grid = np.array([[1, 4, 6], [1, 38, 26], [2, 2, 2]], dtype=np.int64)
    assert num_image_tokens(grid, 2) == [6, 247, 2]
    assert num_image_tokens(np.zeros((0, 3), np.int64), 2) == []


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        # hub preprocessor_config.json (Qwen2.5-VL): flat min_pixels / max_pixels
        (
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            },
            (3136, 12845056, 14),
        ),
        # transformers v5 processor_config.json["image_processor"]: "size"
        (
            {
                "size": {"shortest_edge": 65536, "longest_edge": 16777216},
                "patch_size": 16,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "resample": 3,
                "do_convert_rgb": True,
                "image_processor_type": "Qwen2VLImageProcessor",
            },
            (65536, 16777216, 16),
        ),
        # both: flat keys win over "size" (Qwen2VLImageProcessorPil.__init__)
        (
            {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 100, "max_pixels": 200},
            (100, 200, 14),
        ),
        # missing keys take class defaults; a null min_pixels is ignored, a null flag is off
        ({"min_pixels": None, "do_resize": None, "image_processor_type": "X"}, (3136, 1003520, 14)),
        ({}, (3136, 1003520, 14)),
    ],
)
def test_from_processor_dict_matches_transformers(d, expected):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = Qwen2VLImageConfig.from_processor_dict(d)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Qwen2VLImageProcessorPil.from_dict(d)
    assert (ref.size.shortest_edge, ref.size.longest_edge) == (cfg.min_pixels, cfg.max_pixels)
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample"):
        assert getattr(cfg, key) == getattr(ref, key), key
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        assert getattr(cfg, key) == bool(getattr(ref, key)), key
    np.testing.assert_allclose(cfg.image_mean, ref.image_mean, rtol=0, atol=0)
    np.testing.assert_allclose(cfg.image_std, ref.image_std, rtol=0, atol=0)
    # the whole v5 processor_config.json works too
    assert Qwen2VLImageConfig.from_processor_dict({"image_processor": d, "processor_class": "X"}) == cfg


def test_config_dict_round_trip():
    cfg = Qwen2VLImageConfig.from_processor_dict(CONFIGS["qwen3-vl"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert Qwen2VLImageConfig.from_dict(data) == cfg
    with pytest.raises(ManifestError, match="max_pixels"):
        Qwen2VLImageConfig.from_dict({k: v for k, v in data.items() if k != "max_pixels"})


def test_from_processor_dict_errors():
    with pytest.raises(ExportError, match="longest_edge"):
        Qwen2VLImageConfig.from_processor_dict({"size": {"shortest_edge": 3136}})
    with pytest.raises(ExportError):
        Qwen2VLImageConfig.from_processor_dict({"image_mean": [0.5, 0.5]})
    with pytest.raises(ExportError, match="patch_size to null"):
        Qwen2VLImageConfig.from_processor_dict({"patch_size": None})
    cfg = Qwen2VLImageConfig.from_processor_dict({"do_normalize": False, "image_mean": None})
    assert not cfg.do_normalize


def test_runtime_modules_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import vlm_export.runtime.image_io, vlm_export.runtime.families.qwen2_vl.preprocess\n"
        "heavy = ('torch', 'transformers', 'torchvision')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
