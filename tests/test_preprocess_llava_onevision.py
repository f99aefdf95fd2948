"""Parity of the numpy LLaVA-OneVision preprocessing with transformers' ``LlavaOnevisionImageProcessorPil``."""

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
from vlm_export.runtime.families.llava_onevision.preprocess import (
    DEFAULT_IMAGE_GRID_PINPOINTS,
    LlavaOnevisionImageConfig,
    num_crops,
    patch_output_size,
    preprocess_images,
    select_best_resolution,
)
from vlm_export.runtime.image_io import load_image

# preprocessor_config.json of llava-hf/llava-onevision-qwen2-*-ov-hf: SigLIP's settings (the conversion script
# loads the image processor from google/siglip-so400m-patch14-384) and the class's 36 pinpoints.
HUB = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [list(p) for p in DEFAULT_IMAGE_GRID_PINPOINTS],
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "LlavaOnevisionProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
CONFIGS = {"hub": HUB, "class-defaults": {}}  # class defaults: CLIP mean/std
# Sizes that pick different pinpoints (PINPOINTS), tiny and extreme aspect ratios included.
TILE = 384
SIZES = [(384, 384), (480, 641), (999, 333), (1025, 1919), (3000, 2001), (200, 300), (17, 900)]
PINPOINTS = {
    (384, 384): (384, 384),
    (480, 641): (768, 768),
    (999, 333): (1152, 384),
    (1025, 1919): (1152, 1920),
    (3000, 2001): (2304, 1920),
    (200, 300): (384, 384),
    (17, 900): (384, 1152),
}


@pytest.fixture(scope="module")
def hf():
    """transformers' PIL-backend processors for each config (skipped where transformers is absent)."""
    pytest.importorskip("transformers")
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: LlavaOnevisionImageProcessorPil.from_dict(d) for name, d in CONFIGS.items()}


def _random_image(rng, height, width, mode="RGB"):
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return rgba
    return rgb if mode == "RGB" else rgb.convert(mode)


def _reference(processor, images, **kwargs):
    """transformers' pixel values with its batch padding removed, crop counts and image sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images, return_tensors="np", **kwargs)
    sizes = np.asarray(out["image_sizes"])
    batch = [int(n) for n in out["batch_num_images"]]
    patching = [n == 1 for n in batch for _ in range(n)]
    # transformers' own crop counts: what get_image_features keeps of the padded batch
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    counts = [
        image_size_to_num_patches(s, processor.image_grid_pinpoints, TILE) if p else 1
        for s, p in zip(sizes, patching, strict=True)
    ]
    pixels = np.concatenate([p[:n] for p, n in zip(out["pixel_values"], counts, strict=True)])
    return pixels, counts, sizes


def _assert_same(processor, cfg, ref_images, ours_images, *, batch_num_images=None):
    ref_pixels, ref_counts, ref_sizes = _reference(processor, ref_images)
    ours = preprocess_images(ours_images, cfg, batch_num_images=batch_num_images)
    assert ours.pixel_values.dtype == np.float32 and ours.image_sizes.dtype == np.int64
    assert ours.crops_per_image == ref_counts
    np.testing.assert_array_equal(ours.image_sizes, ref_sizes)
    assert ours.pixel_values.shape == ref_pixels.shape
    diff = float(np.abs(ours.pixel_values - ref_pixels).max())
    assert diff <= 1e-6, diff
    return ours


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_single_image_matches_transformers(hf, config, height, width):
    rng = np.random.default_rng(height * 10007 + width)
    image = _random_image(rng, height, width)
    cfg = LlavaOnevisionImageConfig.from_processor_dict(CONFIGS[config])
    ours = _assert_same(hf[config], cfg, image, [load_image(image)])
    rows, cols = (side // 384 for side in PINPOINTS[(height, width)])
    assert ours.crops_per_image == [1 + rows * cols] == [num_crops(height, width, cfg)]
    assert ours.pixel_values.shape[1:] == (3, 384, 384)


def test_best_pinpoints():
    for size, expected in PINPOINTS.items():
        assert select_best_resolution(size, DEFAULT_IMAGE_GRID_PINPOINTS) == expected, size


def test_flat_list_patches_every_image(hf):
    """``processor(images=[a, b, c])``: each image is its own sample, so each is cut into anyres crops."""
    rng = np.random.default_rng(1)
    images = [_random_image(rng, h, w) for h, w in [(480, 641), (17, 900), (384, 384), (999, 333)]]
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    ours = _assert_same(hf["hub"], cfg, images, images)
    assert ours.crops_per_image == [5, 4, 2, 4]


def test_several_images_in_one_sample_pad_to_square(hf):
    """A nested list (what apply_chat_template passes, one list per conversation): samples with several
    images pad each to a square of the mean colour (127 for mean 0.5) and give one crop each."""
    rng = np.random.default_rng(2)
    sizes = [(480, 641), (999, 333), (300, 300), (200, 300), (17, 900), (60, 40)]
    images = [_random_image(rng, h, w) for h, w in sizes]
    nested = [images[:3], [images[3]], images[4:]]
    for name in CONFIGS:
        cfg = LlavaOnevisionImageConfig.from_processor_dict(CONFIGS[name])
        ours = _assert_same(hf[name], cfg, nested, images, batch_num_images=[3, 1, 2])
        assert ours.crops_per_image == [1, 1, 1, 2, 1, 1]
    # an empty sample is dropped by transformers too
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    _assert_same(hf["hub"], cfg, [images[:2], [], [images[2]]], images[:3], batch_num_images=[2, 0, 1])


def test_square_padding_colour():
    """The pad colour comes from image_mean, truncated: int(0.5 * 255) = 127; CLIP's mean gives 122/116/104."""
    assert LlavaOnevisionImageConfig.from_processor_dict(HUB).background == (127, 127, 127)
    assert LlavaOnevisionImageConfig.from_processor_dict({}).background == (122, 116, 104)
    cfg = LlavaOnevisionImageConfig.from_processor_dict({**HUB, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    image = PIL.Image.new("RGB", (20, 10), (255, 255, 255))
    out = preprocess_images([image, image], cfg, batch_num_images=[2])
    column = np.round(out.pixel_values[0, 0, :, 192] * 255)
    assert column[0] == 0 and column[192] == 255  # top band padded, centre is the image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "I;16", "CMYK"])
def test_pil_modes_match_transformers(hf, mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65536, (41, 67), dtype=np.uint16))
    elif mode == "LA":
        image = _random_image(rng, 41, 67, "RGBA").convert(mode)
    else:
        image = _random_image(rng, 41, 67, mode)
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    _assert_same(hf["hub"], cfg, image, [load_image(image)])
    _assert_same(hf["hub"], cfg, [[image, image]], [load_image(image)] * 2, batch_num_images=[2])


@pytest.mark.parametrize(("suffix", "mode"), [("png", "RGBA"), ("png", "L"), ("jpg", "RGB")])
def test_files_match_transformers(hf, tmp_path, suffix, mode):
    rng = np.random.default_rng(4)
    image = _random_image(rng, 45, 70, mode)
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    _assert_same(hf["hub"], cfg, str(path), [load_image(path)])


def test_numpy_arrays_match_transformers(hf):
    rng = np.random.default_rng(5)
    hwc = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (45, 70, 1), dtype=np.uint8)
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    for array in (hwc, np.ascontiguousarray(hwc.transpose(2, 0, 1)), gray):
        _assert_same(hf["hub"], cfg, array, [load_image(array)])


def test_other_sizes_and_tiles(hf):
    """shortest_edge sizes and a crop_size tile both follow transformers (tiles 384, crops square)."""
    pytest.importorskip("transformers")
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    rng = np.random.default_rng(6)
    images = [_random_image(rng, 480, 641), _random_image(rng, 31, 90)]
    for d in (
        {**HUB, "size": {"shortest_edge": 384}},
        {**HUB, "size": {"height": 384, "width": 384}, "crop_size": {"height": 384, "width": 384}},
        {**HUB, "size": 384, "crop_size": 384, "do_center_crop": None, "resample": 2},
    ):
        cfg = LlavaOnevisionImageConfig.from_processor_dict(d)
        assert (cfg.size, cfg.tile_size) == ((384, 384), 384)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = LlavaOnevisionImageProcessorPil.from_dict(d)
        _assert_same(processor, cfg, images, images)
        _assert_same(processor, cfg, [images], images, batch_num_images=[2])


def test_without_resize_and_null_resample(hf):
    """do_resize off still resizes the base crop, with PilBackend's BILINEAR fallback for a null resample."""
    pytest.importorskip("transformers")
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    d = {**HUB, "do_resize": False, "resample": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = LlavaOnevisionImageProcessorPil.from_dict(d)
    image = _random_image(np.random.default_rng(8), 480, 641)
    _assert_same(processor, LlavaOnevisionImageConfig.from_processor_dict(d), image, [image])


def test_select_best_resolution_and_patch_size_match_transformers():
    pytest.importorskip("transformers")
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(7)
    pinpoints = [list(p) for p in DEFAULT_IMAGE_GRID_PINPOINTS]
    for h, w in rng.integers(1, 4000, (1500, 2)).tolist():
        best = select_best_resolution((h, w), DEFAULT_IMAGE_GRID_PINPOINTS)
        assert best == tuple(hf_select((h, w), pinpoints)), (h, w)
        dummy = np.empty((1, h, w), np.uint8)
        assert patch_output_size((h, w), best) == get_patch_output_size(dummy, best, ChannelDimension.FIRST)


def test_empty_list_and_errors():
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    out = preprocess_images([], cfg)
    assert out.pixel_values.shape == (0, 3, 384, 384) and out.image_sizes.shape == (0, 2)
    assert out.crops_per_image == []
    with pytest.raises(TypeError, match="load_image"):
        preprocess_images([np.zeros((28, 28, 3), np.uint8)], cfg)  # type: ignore[list-item]
    image = PIL.Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="batch_num_images"):
        preprocess_images([image, image], cfg, batch_num_images=[1])
    with pytest.raises(InputError, match="empty"):
        preprocess_images([PIL.Image.new("RGB", (0, 10))], cfg)
    no_rgb = LlavaOnevisionImageConfig.from_processor_dict({**HUB, "do_convert_rgb": False})
    with pytest.raises(InputError, match="do_convert_rgb"):
        preprocess_images([PIL.Image.new("L", (10, 10))], no_rgb)
    no_resize = LlavaOnevisionImageConfig.from_processor_dict({**HUB, "do_resize": False, "resample": None})
    assert no_resize.resample == int(PIL.Image.Resampling.BILINEAR)  # PilBackend.resize's fallback
    assert preprocess_images([PIL.Image.new("RGB", (500, 300))], no_resize).crops_per_image == [3]
    with pytest.raises(InputError, match="do_resize"):
        preprocess_images([image, image], no_resize, batch_num_images=[2])


@pytest.mark.parametrize(
    "d",
    [
        HUB,
        {},
        {"image_processor": HUB, "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 729},
        {**HUB, "image_mean": 0.25, "image_std": None, "do_normalize": False, "do_pad": None},
        {**HUB, "crop_size": None, "do_center_crop": None, "rescale_factor": None, "do_rescale": False},
        {**HUB, "image_grid_pinpoints": [[384, 768], [768, 384]], "resample": 2},
    ],
)
def test_from_processor_dict_matches_transformers(d):
    pytest.importorskip("transformers")
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    cfg = LlavaOnevisionImageConfig.from_processor_dict(d)
    inner = d.get("image_processor", d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LlavaOnevisionImageProcessorPil.from_dict(inner)
    assert cfg.size == (ref.size.height, ref.size.width)
    assert [list(p) for p in cfg.image_grid_pinpoints] == [list(p) for p in ref.image_grid_pinpoints]
    assert cfg.resample == int(ref.resample)
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
        assert getattr(cfg, key) == bool(getattr(ref, key)), key
    if cfg.do_rescale:
        assert cfg.rescale_factor == ref.rescale_factor
    if cfg.do_normalize:
        assert cfg.image_mean == tuple(ref.image_mean) and cfg.image_std == tuple(ref.image_std)


def test_config_dict_round_trip():
    cfg = LlavaOnevisionImageConfig.from_processor_dict(HUB)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert LlavaOnevisionImageConfig.from_dict(data) == cfg
    with pytest.raises(ManifestError, match="image_grid_pinpoints"):
        LlavaOnevisionImageConfig.from_dict({k: v for k, v in data.items() if k != "image_grid_pinpoints"})
    with pytest.raises(ManifestError):
        LlavaOnevisionImageConfig.from_dict({**data, "size": [384]})


def test_from_processor_dict_errors():
    with pytest.raises(ExportError, match="do_center_crop"):
        LlavaOnevisionImageConfig.from_processor_dict({**HUB, "do_center_crop": True})
    with pytest.raises(ExportError, match="multiple"):
        LlavaOnevisionImageConfig.from_processor_dict({**HUB, "image_grid_pinpoints": [[384, 500]]})
    with pytest.raises(ExportError, match="image_mean to null"):
        LlavaOnevisionImageConfig.from_processor_dict({**HUB, "image_mean": None})
    with pytest.raises(ExportError, match="size"):
        LlavaOnevisionImageConfig.from_processor_dict({**HUB, "size": {"longest_edge": 384}})
    with pytest.raises(ExportError):
        LlavaOnevisionImageConfig.from_processor_dict({**HUB, "image_std": [0.5, 0.5]})


def test_runtime_modules_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import vlm_export.runtime.families.llava_onevision\n"
        "import vlm_export.runtime.families.llava_onevision.preprocess\n"
        "import vlm_export.runtime.families.llava_onevision.packing\n"
        "heavy = ('torch', 'transformers', 'torchvision')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
