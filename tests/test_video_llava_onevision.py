"""LLaVA-OneVision video input vs transformers 5.24: frame sampling, frame preprocessing (torchvision's antialiased
uint8 resize), pooled video features through the exported vision graph, `<video>` expansion, and greedy tokens for
a video alone, an image with a video in one conversation, and a padded batch mixing both.

Videos are written by the tests (odd frame sizes, NTSC 30000/1001 fps). transformers decodes them with its PyAV
loader (`video_utils.load_video(..., backend="pyav")`) and the video processor's own `sample_frames`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision", reason="transformers' video processors are torchvision classes")

from transformers.models.llava_onevision.video_processing_llava_onevision import (  # noqa: E402
    LlavaOnevisionVideoProcessor,
)
from transformers.video_utils import load_video as hf_load_video  # noqa: E402

from vlm_export.errors import InputError  # noqa: E402
from vlm_export.runtime.families.llava_onevision.video import (  # noqa: E402
    LlavaOnevisionVideoConfig,
    num_video_tokens,
    pool_video_features,
    preprocess_frames,
    sample_frame_indices,
)
from vlm_export.runtime.video_io import load_video  # noqa: E402
from vlm_export.testing.videos import write_test_video  # noqa: E402

MAX_NEW_TOKENS = 12
LOGITS_ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch, as in test_e2e_parity
# (width, height, frames, fps): odd sizes that shrink one side and grow the other, NTSC and integer rates
VIDEOS = {
    "ntsc_small": (75, 53, 90, Fraction(30000, 1001)),
    "wide": (641, 203, 31, Fraction(25)),
    "tall": (97, 517, 47, Fraction(24000, 1001)),
}
SAMPLING = [{"num_frames": 8}, {"num_frames": 1}, {"fps": 1.0}, {"fps": 2.5}, {}]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        name: write_test_video(folder / f"{name}.mp4", num_frames=n, width=w, height=h, fps=fps, seed=i)
        for i, (name, (w, h, n, fps)) in enumerate(VIDEOS.items())
    }


def _processor_and_config(mean_std_half: bool):
    kwargs = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if mean_std_half else {}
    processor = LlavaOnevisionVideoProcessor(**kwargs)
    return processor, LlavaOnevisionVideoConfig.from_processor_dict(processor.to_dict())


@pytest.mark.parametrize("options", SAMPLING, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "all")
@pytest.mark.parametrize("name", list(VIDEOS))
def test_sampling_and_pixels_match_transformers(videos, name, options):
    processor, cfg = _processor_and_config(mean_std_half=name != "wide")
    path = videos[name]
    if name == "ntsc_small" and not options:
        options = {"num_frames": 30}  # every frame of 90 upscaled is slow; "all" runs on the shorter videos
    frames, metadata = hf_load_video(
        str(path), backend="pyav", sample_indices_fn=partial(processor.sample_frames, **options)
    )
    clip = load_video(path, lambda meta: sample_frame_indices(meta.total_frames, meta.fps, cfg, **options))
    assert clip.metadata.total_frames == metadata.total_num_frames
    assert clip.metadata.fps == pytest.approx(metadata.fps, rel=1e-12)
    np.testing.assert_array_equal(clip.indices, np.asarray(metadata.frames_indices))
    np.testing.assert_array_equal(clip.frames, frames)
    theirs = processor(videos=[frames], return_tensors="np")["pixel_values_videos"][0]
    ours = preprocess_frames(clip.frames, cfg)
    assert ours.shape == theirs.shape == (len(clip.indices), 3, 384, 384)
    assert np.abs(ours - theirs).max() == 0.0  # torchvision's uint8 resize + fused normalize, bit for bit


def test_sampling_errors_and_defaults():
    cfg = LlavaOnevisionVideoConfig.from_processor_dict({})
    assert cfg.size == (384, 384) and cfg.resample == 3 and not cfg.do_sample_frames
    np.testing.assert_array_equal(sample_frame_indices(5, 30.0, cfg), np.arange(5))  # no sampling: every frame
    np.testing.assert_array_equal(sample_frame_indices(10, 30.0, cfg, num_frames=4), [0, 2, 5, 7])
    assert sample_frame_indices(10, 29.97, cfg, fps=0.5).tolist() == [0]  # at least one frame
    with pytest.raises(InputError, match="at most 10"):
        sample_frame_indices(10, 30.0, cfg, num_frames=11)
    with pytest.raises(InputError, match="not both"):
        sample_frame_indices(10, 30.0, cfg, num_frames=2, fps=1.0)
    with pytest.raises(InputError, match="positive"):
        sample_frame_indices(10, 30.0, cfg, num_frames=0)
    sampled = LlavaOnevisionVideoConfig.from_processor_dict({"do_sample_frames": True, "num_frames": 3})
    assert sample_frame_indices(9, 30.0, sampled).tolist() == [0, 3, 6]
    assert LlavaOnevisionVideoConfig.from_dict(sampled.to_dict()) == sampled


def test_pooling_matches_apply_pooling():
    """Host pooling vs transformers' apply_pooling + newline on random features (hidden sizes with and without
    a vector tail)."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionModel

    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=384, patch_size=14)))
    generator = torch.Generator().manual_seed(0)
    for dim in (64, 13):
        features = torch.randn(3, 729, dim, generator=generator) * 4
        pooled = LlavaOnevisionModel.apply_pooling(owner, features)
        newline = torch.randn(dim, generator=generator)
        theirs = torch.cat([pooled.reshape(-1, dim), newline[None]]).numpy()
        ours = pool_video_features(features.numpy(), 27, newline.numpy())
        assert ours.shape == (num_video_tokens(3, 27), dim) == (3 * 196 + 1, dim)
        assert np.abs(ours - theirs).max() == 0.0


# ------------------------------------------------------------------------------ end to end (exported tiny model)


@pytest.fixture(scope="module")
def pipe(exported_llava_onevision):
    from vlm_export.runtime import VLMPipeline

    return VLMPipeline.from_pretrained(exported_llava_onevision, backend="ort-cpu")


@pytest.fixture(scope="module")
def hf(tiny_llava_onevision_dir):
    from transformers import AutoVideoProcessor, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    from vlm_export.testing.reference import vl_processor

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir).eval()
    video_processor = AutoVideoProcessor.from_pretrained(tiny_llava_onevision_dir)
    assert isinstance(video_processor, LlavaOnevisionVideoProcessor)
    return model, vl_processor(tiny_llava_onevision_dir, LlavaOnevisionProcessor, video_processor=video_processor)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (w, h) in {"portrait": (101, 149), "wide": (230, 90)}.items():
        base = rng.integers(0, 256, (h // 7 + 1, w // 7 + 1, 3), dtype=np.uint8)
        paths[name] = folder / f"{name}.png"
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(paths[name])
    return paths


def _conversation(*parts):
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif isinstance(part, tuple):  # (video path, options)
            content.append({"type": "video", "path": str(part[0]), **part[1]})
        else:
            content.append({"type": "image", "path": str(part)})
    return [{"role": "user", "content": content}]


def _hf_inputs(hf, conversations):
    """transformers' processor on the same conversations: PIL-backend images per conversation, videos decoded by
    its PyAV loader and sampled by the video processor's own `sample_frames`."""
    _, processor = hf
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [[Image.open(p["path"]) for m in c for p in m["content"] if p["type"] == "image"] for c in conversations]
    videos = []
    for conversation in conversations:
        for part in (p for m in conversation for p in m["content"] if p["type"] == "video"):
            options = {k: v for k, v in part.items() if k in ("num_frames", "fps")}
            sampler = partial(processor.video_processor.sample_frames, **options)
            frames, _ = hf_load_video(part["path"], backend="pyav", sample_indices_fn=sampler)
            videos.append(frames)
    return processor(
        text=texts,
        images=images if any(images) else None,
        videos=videos or None,
        padding=True,
        return_tensors="pt",
    )


def test_manifest_records_video_settings(exported_llava_onevision):
    manifest = json.loads((exported_llava_onevision / "manifest.json").read_text())
    video = LlavaOnevisionVideoConfig.from_dict(manifest["preprocessing"]["video"])
    # the tiny hub-layout checkpoint ships no video config: transformers falls back to preprocessor_config.json
    assert video.image_mean == (0.5, 0.5, 0.5) and video.size == (384, 384) and video.resample == 3


def test_video_features_match_transformers(pipe, hf, videos):
    """Pixel feeds, placeholder count and the pooled features (vision graph + host pooling) vs
    get_video_features on the same video."""
    model, _ = hf
    conversation = _conversation((videos["wide"], {"num_frames": 6}), "What happens?")
    inputs = _hf_inputs(hf, [conversation])
    prompts, visual = pipe.prepare([conversation])
    assert prompts[0] == inputs["input_ids"][0].tolist()
    assert visual.token_counts == [6 * 196 + 1]
    theirs_pixels = inputs["pixel_values_videos"][0].numpy()
    assert np.abs(visual.feeds["pixel_values"] - theirs_pixels).max() == 0.0
    ours = pipe.generator._visual_embeds(np.asarray(prompts, dtype=np.int64), visual)
    with torch.no_grad():
        theirs = model.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1).numpy()
    assert ours.shape == theirs.shape == (6 * 196 + 1, model.config.text_config.hidden_size)
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-4 * max(1.0, np.abs(theirs).max()), f"video features differ by {diff}"


CASES = {
    "one_video": lambda v, img: [_conversation((v["ntsc_small"], {"num_frames": 8}), "Describe the video.")],
    # content order video, image: the template renders the image first; features follow the placeholders
    "video_and_image": lambda v, img: [
        _conversation((v["tall"], {"fps": 0.5}), img["portrait"], "What is in the picture and the clip?")
    ],
    # two images in a conversation take transformers' multi-image path (one crop each) next to the video
    "two_images_and_video": lambda v, img: [
        _conversation(img["wide"], (v["ntsc_small"], {"num_frames": 3}), img["portrait"], "Compare all three.")
    ],
    "batch_text_image_video": lambda v, img: [
        _conversation("Hi!"),
        _conversation(img["portrait"], "What is this?"),
        _conversation((v["wide"], {"num_frames": 4}), "Summarize the clip in detail please."),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logits_match_transformers(case, pipe, hf, videos, images):
    model, _ = hf
    conversations = CASES[case](videos, images)
    inputs = _hf_inputs(hf, conversations)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    hf_prompts = [
        ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ]
    hf_generated = out.sequences[:, prompt_len:].numpy()
    hf_logits = np.stack([step.float().numpy() for step in out.logits], axis=1)

    prompts, visual = pipe.prepare(conversations)
    assert prompts == hf_prompts, "prompt token ids (template + <image>/<video> expansion) differ from transformers"
    settings = pipe.settings(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    events = list(pipe.generator.steps(prompts, visual, settings))
    output, steps = events[-1], events[:-1]
    eos = set(settings.eos_token_ids)
    for row, generated in enumerate(hf_generated):
        expected = generated.tolist()
        for i, token in enumerate(expected):
            if token in eos:
                expected = expected[: i + 1]
                break
        assert output.token_ids[row] == expected, f"row {row} tokens differ"
    assert len(output.token_ids[0]) > 1
    ours = np.stack([event.logits for event in steps], axis=1)
    diff = np.abs(ours - hf_logits[:, : ours.shape[1]]).max()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff}"


def test_video_errors(pipe, videos, monkeypatch):
    long_ask = _conversation((videos["wide"], {"num_frames": 500}), "x")
    with pytest.raises(InputError, match="at most 31"):
        pipe.prepare([long_ask])
    with pytest.raises(InputError, match="unsupported video option"):
        pipe.prepare([_conversation((videos["wide"], {"max_pixels": 10}), "x")])
    monkeypatch.setattr(pipe.family, "video_config", None)  # an export from before video support
    with pytest.raises(InputError, match="re-export"):
        pipe.prepare([_conversation((videos["wide"], {"num_frames": 2}), "x")])


@pytest.mark.slow
def test_vlm_run_video_json_matches_transformers(exported_llava_onevision, pipe, hf, videos, images):
    command = [sys.executable, "-m", "vlm_export.runtime.cli", str(exported_llava_onevision)]
    command += ["--image", str(images["wide"]), "--video", str(videos["tall"]), "--num-frames", "2"]
    command += [
        "--prompt",
        "Is the picture in the video?",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--greedy",
        "--json",
    ]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    conversation = _conversation(images["wide"], (videos["tall"], {"num_frames": 2}), "Is the picture in the video?")
    inputs = _hf_inputs(hf, [conversation])
    with torch.no_grad():
        generated = hf[0].generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)[0]
    expected = generated[inputs["input_ids"].shape[1] :].tolist()
    eos = set(pipe.settings().eos_token_ids)
    cut = next((i + 1 for i, token in enumerate(expected) if token in eos), len(expected))
    assert result["token_ids"] == expected[:cut]
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]
