"""Parity of the numpy LLaVA-OneVision feature packing and token counts with transformers.

References: ``LlavaOnevisionModel.pack_image_features`` / ``get_image_features`` on tiny random models (the real
384/14 SigLIP geometry with narrow layers, and a 56/14 one with scaled pinpoints), ``F.interpolate`` for the
downscale, and ``LlavaOnevisionProcessor``'s ``<image>`` expansion for the token counts.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest

from vlm_export.errors import ExportError, InputError, ManifestError
from vlm_export.runtime.families.llava_onevision.packing import (
    LlavaPackingConfig,
    anyres_grid_shape,
    bilinear_resize,
    num_image_tokens,
    pack_image_features,
    packed_grid_size,
)
from vlm_export.runtime.families.llava_onevision.preprocess import (
    DEFAULT_IMAGE_GRID_PINPOINTS,
    LlavaOnevisionImageConfig,
    preprocess_images,
)

TOL = 1e-6
SIZES = [(384, 384), (480, 641), (999, 333), (1025, 1919), (3000, 2001), (200, 300), (17, 900)]
# <image> tokens LlavaOnevisionProcessor expands to with the llava-hf config (notes/preprocessing-findings.md).
EXPECTED_TOKENS = {
    (384, 384): 1485,
    (480, 641): 2929,
    (999, 333): 2997,
    (1025, 1919): 7278,
    (3000, 2001): 7295,
    (200, 300): 1261,
    (17, 900): 811,
}
SMALL = 56  # the scaled model: 56/14 -> 4x4 tokens per crop, pinpoints 56 ... 336
SMALL_PINPOINTS = [[SMALL * i, SMALL * j] for i in range(1, 7) for j in range(1, 7)]
SMALL_SIZES = [(56, 56), (70, 93), (146, 49), (150, 280), (437, 292), (29, 43), (3, 131), (300, 17)]
HIDDEN = 48  # projector output width of the tiny models: a multiple of 16, like real hidden sizes


def _tiny_config(image_size: int = 384, **kwargs):
    from transformers import LlavaOnevisionConfig

    vision = {
        "model_type": "siglip_vision_model",
        "image_size": image_size,
        "patch_size": 14,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 300,
    }
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=298, video_token_index=299, **kwargs
    )


def _tiny_model(config):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()  # a newline that stands out from the features
    return model


@pytest.fixture(scope="module")
def models():
    """Tiny models: real geometry (anyres_max_9), and 56/14 with anyres_max_9 and anyres_max_2 (whose small
    downscaled grids take PyTorch's other bilinear kernel)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "real": _tiny_model(_tiny_config()),
            "small-max9": _tiny_model(_tiny_config(SMALL, image_grid_pinpoints=SMALL_PINPOINTS)),
            "small-max2": _tiny_model(
                _tiny_config(SMALL, image_grid_pinpoints=SMALL_PINPOINTS, vision_aspect_ratio="anyres_max_2")
            ),
        }


def _reference_pack(model, features, sizes, crops):
    """transformers' pack_image_features + the concatenation get_image_features hands to the merge."""
    import torch

    with torch.no_grad():
        packed, lens = model.model.pack_image_features(
            torch.split(torch.from_numpy(features), crops, dim=0),
            torch.tensor(sizes, dtype=torch.int64),
            image_newline=model.model.image_newline,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )
    return torch.cat(packed).numpy(), lens.tolist()


def _random_case(cfg, sizes, seed, scale=4.0):
    rng = np.random.default_rng(seed)
    crops = [1 + r * c for r, c in (anyres_grid_shape(s, cfg) for s in sizes)]
    features = (rng.standard_normal((sum(crops), cfg.tokens_per_crop, HIDDEN)) * scale).astype(np.float32)
    return features, crops


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("real", [s]) for s in SIZES] + [("real", SIZES), ("small-max9", SMALL_SIZES), ("small-max2", SMALL_SIZES)],
    ids=[f"{h}x{w}" for h, w in SIZES] + ["real-all", "small-max9", "small-max2"],
)
def test_pack_matches_transformers(models, name, sizes):
    model = models[name]
    cfg = LlavaPackingConfig.from_model_config(model.config.to_dict())
    features, crops = _random_case(cfg, sizes, seed=len(sizes) * 1000 + sizes[0][0])
    newline = model.model.image_newline.detach().numpy()
    ours = pack_image_features(features, np.array(sizes, dtype=np.int64), crops, newline, cfg)
    ref, lens = _reference_pack(model, features, sizes, crops)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, diff
    assert lens == [num_image_tokens(s, c, cfg) for s, c in zip(sizes, crops, strict=True)]
    if name == "real":
        assert lens == [EXPECTED_TOKENS[s] for s in sizes]


def test_one_crop_images_get_one_newline(models):
    """Multi-image prompts give one crop per image: its tokens, then the newline (P*P + 1 rows)."""
    model = models["real"]
    cfg = LlavaPackingConfig.from_model_config(model.config.to_dict())
    rng = np.random.default_rng(1)
    features = rng.standard_normal((2, 729, HIDDEN)).astype(np.float32)
    newline = model.model.image_newline.detach().numpy()
    sizes = np.array([[480, 641], [17, 900]])
    ours = pack_image_features(features, sizes, [1, 1], newline, cfg)
    ref, lens = _reference_pack(model, features, sizes.tolist(), [1, 1])
    np.testing.assert_array_equal(ours, ref)
    assert lens == [730, 730] == [num_image_tokens((480, 641), 1, cfg), num_image_tokens((17, 900), 1, cfg)]
    np.testing.assert_array_equal(ours[729], newline)


@pytest.mark.parametrize("batch_num_images", [None, [3], [2, 1]])
def test_get_image_features_end_to_end(models, batch_num_images):
    """Our crops through transformers' tower + projector, packed by us, equal get_image_features' output
    (which splits the crops itself, from image_sizes and batch_num_images)."""
    import torch

    model = models["real"]
    rng = np.random.default_rng(2)
    sizes = [(480, 641), (999, 333), (17, 900)]
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    image_cfg = LlavaOnevisionImageConfig.from_processor_dict({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    inputs = preprocess_images(images, image_cfg, batch_num_images=batch_num_images)
    cfg = LlavaPackingConfig.from_model_config(model.config.to_dict())
    pixels = torch.from_numpy(inputs.pixel_values)
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=pixels,
            image_sizes=torch.from_numpy(inputs.image_sizes),
            batch_num_images=None if batch_num_images is None else torch.tensor(batch_num_images),
        )
        ref = torch.cat(list(out.pooler_output)).numpy()
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        crop_features = model.model.multi_modal_projector(hidden).numpy()
    ours = pack_image_features(
        crop_features, inputs.image_sizes, inputs.crops_per_image, model.model.image_newline.detach().numpy(), cfg
    )
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, diff
    counts = [
        num_image_tokens(tuple(s), c, cfg) for s, c in zip(inputs.image_sizes, inputs.crops_per_image, strict=True)
    ]
    assert sum(counts) == len(ours)


@pytest.fixture(scope="module")
def processor(qwen2_tokenizer_dir):
    """transformers' LlavaOnevisionProcessor (PIL image processor, llava-hf settings, no video processor) over
    the Qwen2 tokenizer with ``<image>`` / ``<video>`` added as llava-hf's converter adds them."""
    pytest.importorskip("transformers")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    tokens = [AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")]
    tokenizer.add_tokens(tokens, special_tokens=True)
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # transformers 5.24 refuses to build the processor without torchvision (its video processor class is a
    # placeholder then); images never touch the video processor, so the check is skipped for this construction.
    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def _count_image_tokens(processor, **kwargs) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(padding=True, return_tensors="np", **kwargs)
    return [int((row == processor.image_token_id).sum()) for row in out["input_ids"]]


def test_num_image_tokens_match_processor(processor):
    cfg = LlavaPackingConfig.from_model_config({})
    image_cfg = LlavaOnevisionImageConfig.from_processor_dict({})
    for size in SIZES:
        image = PIL.Image.new("RGB", (size[1], size[0]))
        expected = _count_image_tokens(processor, images=image, text="Look: <image> and say")
        crops = preprocess_images([image], image_cfg).crops_per_image[0]
        assert [num_image_tokens(size, crops, cfg)] == expected == [EXPECTED_TOKENS[size]], size
    # one conversation with three images (apply_chat_template's nesting): one crop, 730 tokens each
    images = [PIL.Image.new("RGB", (w, h)) for h, w in SIZES[:3]]
    assert _count_image_tokens(processor, images=[images], text="<image><image>\n<image>") == [3 * 730]
    crops = preprocess_images(images, image_cfg, batch_num_images=[3]).crops_per_image
    assert [num_image_tokens(s, c, cfg) for s, c in zip(SIZES[:3], crops, strict=True)] == [730] * 3


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_4", "anyres_max_1"])
def test_num_image_tokens_formula_over_many_sizes(processor, aspect):
    """The processor's own arithmetic (_get_number_of_features) on random sizes, several anyres_max_N."""
    cfg = LlavaPackingConfig.from_model_config({"vision_aspect_ratio": aspect})
    rng = np.random.default_rng(3)
    original = processor.vision_aspect_ratio
    processor.vision_aspect_ratio = aspect
    try:
        for h, w in rng.integers(1, 5000, (400, 2)).tolist():
            rows, cols = anyres_grid_shape((h, w), cfg)
            expected = processor._get_number_of_features(h, w, 384, 384)
            assert num_image_tokens((h, w), rows * cols + 1, cfg) == expected, (h, w)
    finally:
        processor.vision_aspect_ratio = original


@pytest.mark.parametrize(
    ("shape", "size", "channels"),
    [
        ((162, 81), (110, 55), 64),  # generic kernel (output height + width > 128)
        ((81, 162), (57, 114), 896),
        ((100, 100), (64, 65), 48),
        ((100, 100), (64, 64), 48),  # channels-last kernel (<= 128)
        ((54, 80), (37, 55), 33),  # ... with a scalar tail
        ((20, 30), (10, 15), 7),
        ((200, 30), (120, 8), 16),
    ],
)
def test_bilinear_resize_matches_interpolate(shape, size, channels):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((*shape, channels)) * 4).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    ref = F.interpolate(nchw, list(size), mode="bilinear")[0].permute(1, 2, 0).numpy()
    diff = float(np.abs(bilinear_resize(x, size) - ref).max())
    assert diff <= TOL, diff


def test_packed_grid_size_examples():
    cfg = LlavaPackingConfig.from_model_config({})
    assert packed_grid_size((384, 384), cfg) == ((27, 27), False)
    assert packed_grid_size((17, 900), cfg) == ((1, 81), False)
    (height, width), shrunk = packed_grid_size((3000, 2001), cfg)
    assert shrunk and height * (width + 1) == 7295 - 729


def test_config_from_model_config():
    pytest.importorskip("transformers")
    from transformers import LlavaOnevisionConfig

    hub = LlavaOnevisionConfig().to_dict()  # llava-hf geometry: SigLIP 384/14, 36 pinpoints, anyres_max_9
    cfg = LlavaPackingConfig.from_model_config(hub)
    assert (cfg.patches_per_side, cfg.crop_size, cfg.tokens_per_crop, cfg.max_num_patches) == (27, 384, 729, 9)
    assert cfg.image_grid_pinpoints == DEFAULT_IMAGE_GRID_PINPOINTS
    assert cfg.vision_feature_select_strategy == "full"
    assert LlavaPackingConfig.from_model_config({}) == cfg  # missing vision_config: the same defaults
    assert LlavaPackingConfig.from_model_config(json.loads(json.dumps(hub))) == cfg
    # a vision_config without keys takes its class defaults, like transformers
    for vision in ({}, {"model_type": "clip_vision_model"}):
        ref = LlavaOnevisionConfig(vision_config=vision).vision_config
        got = LlavaPackingConfig.from_model_config({"vision_config": vision})
        assert (got.crop_size, got.patches_per_side) == (ref.image_size, ref.image_size // ref.patch_size)
    custom = {"vision_aspect_ratio": "anyres_max_16", "vision_feature_select_strategy": "default"}
    got = LlavaPackingConfig.from_model_config(custom)
    assert got.max_num_patches == 16 and got.vision_feature_select_strategy == "default"


def test_config_round_trip_and_errors():
    cfg = LlavaPackingConfig.from_model_config({})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert LlavaPackingConfig.from_dict(data) == cfg
    with pytest.raises(ManifestError, match="crop_size"):
        LlavaPackingConfig.from_dict({k: v for k, v in data.items() if k != "crop_size"})
    with pytest.raises(ExportError, match="vision_aspect_ratio"):
        LlavaPackingConfig.from_model_config({"vision_aspect_ratio": "anyres"})
    with pytest.raises(ExportError, match="strategy"):
        LlavaPackingConfig.from_model_config({"vision_feature_select_strategy": "cls"})
    with pytest.raises(ExportError, match="patch_size"):
        LlavaPackingConfig.from_model_config({"vision_config": {"model_type": "other", "image_size": 384}})


def test_pack_errors():
    cfg = LlavaPackingConfig.from_model_config({})
    features = np.zeros((5, 729, 8), np.float32)
    newline = np.zeros(8, np.float32)
    sizes = np.array([[480, 641]])
    assert pack_image_features(features, sizes, [5], newline, cfg).shape == (2929, 8)
    with pytest.raises(ValueError, match="crops"):
        pack_image_features(features, sizes, [4], newline, cfg)
    with pytest.raises(ValueError, match="tiles"):
        pack_image_features(features[:4], sizes, [4], newline, cfg)
    with pytest.raises(ValueError, match="feature rows"):
        pack_image_features(np.zeros((5, 728, 8), np.float32), sizes, [5], newline, cfg)
    with pytest.raises(ValueError, match="crops"):
        num_image_tokens((480, 641), 4, cfg)
    with pytest.raises(InputError, match="empty"):
        num_image_tokens((0, 641), 5, cfg)
    empty = pack_image_features(np.zeros((0, 729, 8), np.float32), np.zeros((0, 2)), [], newline, cfg)
    assert empty.shape == (0, 8)
