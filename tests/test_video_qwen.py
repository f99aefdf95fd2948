"""Video input for Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE against transformers 5.24: video-processor settings,
frame sampling, resize budget, pixel values, grids, second_per_grid_ts, Qwen3-VL timestamps, rope index, video
embeddings, greedy tokens and logits of `generate()`, the `vlm-run --video` CLI, and one-line errors.

transformers is run on the frames its own PyAV loader decodes (`video_utils.load_video(..., backend="pyav")`;
its default torchcodec backend is not installed), with `do_sample_frames=True` and the per-video `fps` /
`num_frames` the runtime reads from the message part, as `apply_chat_template(..., fps=...)` would pass them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.families.qwen2_vl.video import (
    QWEN2_VL_VIDEO_DEFAULTS,
    QwenVideoConfig,
    VideoOptions,
    find_video_processor_dict,
    qwen2_vl_frame_size,
    qwen2_vl_sample_indices,
    video_patches,
)
from vlm_export.runtime.families.qwen3_vl.video import (
    QWEN3_VL_VIDEO_DEFAULTS,
    qwen3_vl_frame_size,
    qwen3_vl_sample_indices,
    qwen3_vl_timestamps,
)
from vlm_export.runtime.video_io import VideoMetadata, load_video
from vlm_export.testing.videos import write_test_video

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision", reason="transformers' video processors are torchvision classes")
from transformers.video_utils import VideoMetadata as HFMetadata  # noqa: E402
from transformers.video_utils import load_video as hf_load_video  # noqa: E402

MAX_NEW_TOKENS = 12
LOGITS_ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch (as tests/test_e2e_parity.py)

FAMILIES = {
    # family: (transformers model class, transformers processor class)
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
}
SAMPLERS = {
    "qwen2_vl": (QWEN2_VL_VIDEO_DEFAULTS, qwen2_vl_sample_indices, qwen2_vl_frame_size, "Qwen2VLVideoProcessor"),
    "qwen3_vl": (QWEN3_VL_VIDEO_DEFAULTS, qwen3_vl_sample_indices, qwen3_vl_frame_size, "Qwen3VLVideoProcessor"),
}


def _video_processor_class(name: str):
    if name == "Qwen2VLVideoProcessor":
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor


def _config_of(processor, sampler: str) -> QwenVideoConfig:
    """Our config with every field read off a transformers video processor instance."""
    return QwenVideoConfig(
        sampler=sampler,
        patch_size=processor.patch_size,
        temporal_patch_size=processor.temporal_patch_size,
        merge_size=processor.merge_size,
        min_pixels=processor.size.shortest_edge,
        max_pixels=processor.size.longest_edge,
        image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std),
        rescale_factor=processor.rescale_factor,
        do_resize=processor.do_resize,
        do_rescale=processor.do_rescale,
        do_normalize=processor.do_normalize,
        resample=int(processor.resample),
        do_sample_frames=bool(processor.do_sample_frames),
        fps=None if processor.fps is None else float(processor.fps),
        num_frames=processor.num_frames,
        min_frames=processor.min_frames,
        max_frames=processor.max_frames,
        cap_pixels_per_frame=bool(processor.cap_pixels_per_frame),
        max_video_tokens=processor.max_video_tokens,
    )


def _hf_kwargs(sampler: str, options: dict) -> dict:
    """transformers' kwargs for the runtime's per-video options. Qwen3VLVideoProcessor's default fps=2 clashes with
    num_frames ("mutually exclusive"), so num_frames goes with fps=None, which is what the runtime does."""
    kwargs = dict(options)
    if sampler == "qwen3_vl" and "num_frames" in kwargs:
        kwargs["fps"] = None
    return kwargs


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_videos")
    return {
        "ntsc": write_test_video(folder / "ntsc.mp4", 90, 75, 53, Fraction(30000, 1001)),
        "pal": write_test_video(folder / "pal.mp4", 61, 64, 47, 25, seed=1),
        "film": write_test_video(folder / "film.mp4", 150, 161, 97, Fraction(24000, 1001), seed=2),
    }


# ------------------------------------------------------------------------------ settings in the manifest
@pytest.mark.parametrize(
    "model_fixture, sampler",
    [
        ("tiny_qwen2_5_vl_dir", "qwen2_vl"),  # hub layout: no video config, falls back to preprocessor_config
        ("tiny_qwen2_5_vl_v5_dir", "qwen2_vl"),  # v5 layout: processor_config.json["video_processor"]
        ("tiny_qwen3_vl_dir", "qwen3_vl"),  # hub layout with video_preprocessor_config.json
        ("tiny_qwen3_vl_moe_dir", "qwen3_vl"),
    ],
)
def test_video_config_matches_auto_video_processor(model_fixture, sampler, request):
    folder = request.getfixturevalue(model_fixture)
    expected = _config_of(transformers.AutoVideoProcessor.from_pretrained(folder), sampler)
    defaults = SAMPLERS[sampler][0]
    ours = QwenVideoConfig.from_processor_dict(find_video_processor_dict(folder), defaults, sampler)
    assert ours == expected
    assert QwenVideoConfig.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_class_defaults_match_transformers(sampler):
    defaults, _, _, class_name = SAMPLERS[sampler]
    expected = _config_of(_video_processor_class(class_name)(), sampler)
    assert QwenVideoConfig.from_processor_dict({}, defaults, sampler) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_writes_video_settings(family, request):
    exported = request.getfixturevalue(f"exported_{family}")
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    sampler = "qwen2_vl" if family == "qwen2_5_vl" else "qwen3_vl"
    manifest = json.loads((exported / "manifest.json").read_text())
    ours = QwenVideoConfig.from_dict(manifest["preprocessing"]["video"])
    assert ours == _config_of(transformers.AutoVideoProcessor.from_pretrained(folder), sampler)


# ------------------------------------------------------------------------------------- sampling, sizes
def _sampling_cases():
    rng = np.random.default_rng(0)
    cases = []
    for total in [1, 2, 3, 4, 5, 7, 8, 30, 61, 90, 100, 149, 150, 301, 1000, 2000]:
        for src_fps in [25.0, 30000 / 1001, 24000 / 1001, 60.0, 12.5]:
            for fps in [0.25, 0.5, 1.0, 2.0, 3.7]:
                cases.append((total, src_fps, {"fps": fps}))
            for num_frames in sorted({1, 2, 3, 5, 8, 16, int(rng.integers(1, 40))}):
                cases.append((total, src_fps, {"num_frames": num_frames}))
            cases.append((total, src_fps, {}))
    return cases


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sample_indices_match_transformers(sampler):
    defaults, sample, _, class_name = SAMPLERS[sampler]
    processor = _video_processor_class(class_name)()
    cfg = QwenVideoConfig.from_processor_dict({}, defaults, sampler)
    checked = refused = 0
    for total, src_fps, options in _sampling_cases():
        meta = VideoMetadata(total_frames=total, fps=src_fps, duration=total / src_fps, width=64, height=48)
        hf_meta = HFMetadata(total_num_frames=total, fps=src_fps, duration=total / src_fps, width=64, height=48)
        kwargs = _hf_kwargs(sampler, options)
        if not options:  # the processor's own defaults (Qwen2-VL: sampling off unless fps/num_frames are given)
            expected = processor.sample_frames(hf_meta) if processor.do_sample_frames else np.arange(total)
        else:
            try:
                expected = processor.sample_frames(hf_meta, **kwargs)
            except (ValueError, ZeroDivisionError):
                expected = None
        if expected is not None and sampler == "qwen3_vl" and len(expected) > total:
            expected = None  # duplicated indices; the runtime refuses num_frames > total_frames
        case = f"total={total} fps={src_fps} {options}"
        if expected is None:
            with pytest.raises(InputError):
                sample(meta, cfg, VideoOptions(**options))
            refused += 1
            continue
        ours = sample(meta, cfg, VideoOptions(**options))
        np.testing.assert_array_equal(ours, np.asarray(expected), err_msg=case)
        assert ours.dtype == np.int64
        checked += 1
    assert checked > 400 and refused > 10


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cap", [False, True])
def test_frame_size_matches_transformers_resize(sampler, cap):
    _, _, frame_size, class_name = SAMPLERS[sampler]
    processor = _video_processor_class(class_name)(size={"shortest_edge": 4096, "longest_edge": 200704})
    processor.max_video_tokens = 64  # small, so that the per-frame cap binds on these sizes
    cfg = dataclasses.replace(_config_of(processor, sampler), cap_pixels_per_frame=cap)
    for frames, height, width in [(2, 53, 75), (4, 480, 641), (6, 97, 161), (8, 720, 1280), (3, 17, 900), (16, 24, 40)]:
        video = torch.zeros((1, frames, 3, height, width), dtype=torch.uint8)
        resized = processor.resize(
            video, size=processor.size, resample=3, factor=cfg.factor, temporal_factor=2, cap_pixels_per_frame=cap
        )
        assert frame_size(frames, height, width, cfg) == tuple(resized.shape[-2:]), (frames, height, width)


# ----------------------------------------------------------------------------- pixels vs the processor
def _hf_metadata(meta) -> HFMetadata:
    """A fresh copy of the loader's metadata, without its frame indices (the processor samples again)."""
    return HFMetadata(
        total_num_frames=meta.total_num_frames,
        fps=meta.fps,
        width=meta.width,
        height=meta.height,
        duration=meta.duration,
    )


def _hf_video_inputs(processor, path, sampler, options):
    frames, meta = hf_load_video(str(path), backend="pyav")
    hf_meta = _hf_metadata(meta)
    out = processor(
        videos=[frames],
        video_metadata=[hf_meta],
        do_sample_frames=True,
        return_metadata=True,
        return_tensors="pt",
        **_hf_kwargs(sampler, options),
    )
    return out


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cap", [False, True])
def test_pixels_grid_and_timing_match_the_video_processor(sampler, cap, videos):
    _, sample, frame_size, class_name = SAMPLERS[sampler]
    patch = 14 if sampler == "qwen2_vl" else 16
    # A tiny budget like the test models': frames shrink and grow, and the cap changes sizes.
    processor = _video_processor_class(class_name)(
        size={"shortest_edge": 4 * (2 * patch) ** 2, "longest_edge": 256 * (2 * patch) ** 2},
        cap_pixels_per_frame=cap,
        max_video_tokens=40,
    )
    cfg = _config_of(processor, sampler)
    worst = 0.0
    for name, path in videos.items():
        for options in ({"fps": 1.0}, {"fps": 2.0}, {"num_frames": 8}, {"num_frames": 5}):
            out = _hf_video_inputs(processor, path, sampler, options)
            video_options = VideoOptions(**options)
            clip = load_video(path, lambda meta, o=video_options: sample(meta, cfg, o))
            case = f"{name} {options}"
            hf_meta = out["video_metadata"][0]
            np.testing.assert_array_equal(clip.indices, np.asarray(hf_meta.frames_indices), err_msg=case)
            size = frame_size(len(clip.frames), *clip.frames.shape[1:3], cfg)
            pixels, grid = video_patches(clip.frames, size, cfg)
            assert list(grid) == out["video_grid_thw"][0].tolist(), case
            theirs = out["pixel_values_videos"].numpy()
            assert pixels.shape == theirs.shape and pixels.dtype == np.float32, case
            worst = max(worst, float(np.abs(pixels - theirs).max()))
            if sampler == "qwen2_vl":  # Qwen2_5_VLProcessor: temporal_patch_size / sampled_fps
                meta = clip.metadata
                ours_seconds = cfg.temporal_patch_size / (len(clip.indices) / meta.total_frames * meta.fps)
                assert ours_seconds == cfg.temporal_patch_size / hf_meta.sampled_fps, case
            else:
                from transformers import Qwen3VLProcessor

                theirs_ts = Qwen3VLProcessor._calculate_timestamps(None, hf_meta.frames_indices, hf_meta.fps, 2)
                assert qwen3_vl_timestamps(clip.indices, clip.metadata.fps, 2) == theirs_ts, case
    # torch's uint8 resize is reproduced bit for bit and the fused normalize op for op: no tolerance needed.
    assert worst == 0.0


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(family, request):
    from vlm_export.runtime import VLMPipeline

    return VLMPipeline.from_pretrained(request.getfixturevalue(f"exported_{family}"), backend="ort-cpu")


@pytest.fixture(scope="module")
def hf(family, request):
    from vlm_export.testing.reference import vl_processor

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model_class, processor_class = (getattr(transformers, name) for name in FAMILIES[family])
    model = model_class.from_pretrained(model_dir).eval()
    video_processor = transformers.AutoVideoProcessor.from_pretrained(model_dir)
    video_processor.cap_pixels_per_frame = False  # its default (None) warns, then behaves as False
    return model, vl_processor(model_dir, processor_class, video_processor=video_processor)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("qwen_video_image") / "small.png"
    Image.fromarray(rng.integers(0, 256, (17, 13, 3), dtype=np.uint8)).resize((97, 131), Image.BILINEAR).save(path)
    return path


def _conversation(parts: list, options: dict) -> list[dict]:
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif part.suffix == ".png":
            content.append({"type": "image", "path": str(part)})
        else:
            content.append({"type": "video", "path": str(part), **options})
    return [{"role": "user", "content": content}]


def _hf_inputs(hf, family, conversation, options):
    from PIL import Image

    _, processor = hf
    sampler = "qwen2_vl" if family == "qwen2_5_vl" else "qwen3_vl"
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    parts = [p for m in conversation for p in m["content"]]
    images = [Image.open(p["path"]) for p in parts if p["type"] == "image"]
    frames, metas = [], []
    for part in parts:
        if part["type"] == "video":
            video, meta = hf_load_video(part["path"], backend="pyav")
            frames.append(video)
            metas.append(_hf_metadata(meta))
    return processor(
        text=[text],
        images=images or None,
        videos=frames,
        video_metadata=metas,
        do_sample_frames=True,
        return_tensors="pt",
        **_hf_kwargs(sampler, options),
    )


def _reference_positions(model, family, inputs):
    kwargs = {
        "mm_token_type_ids": inputs["mm_token_type_ids"],
        "image_grid_thw": inputs.get("image_grid_thw"),
        "video_grid_thw": inputs.get("video_grid_thw"),
        "attention_mask": inputs["attention_mask"],
    }
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    positions, _ = model.model.get_rope_index(inputs["input_ids"], **kwargs)
    return positions.numpy()


CASES = {
    # name: (parts builder, per-video options)
    "one_video": (lambda v, img: [v["ntsc"], "What happens in the video?"], {"fps": 1.0}),
    "image_and_video": (lambda v, img: [img, "and", v["film"], "Is the picture in the video?"], {"num_frames": 8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_video_generation_matches_transformers(case, family, pipe, hf, videos, image_path):
    model, _ = hf
    build, options = CASES[case]
    conversation = _conversation(build(videos, image_path), options)
    inputs = _hf_inputs(hf, family, conversation, options)

    prompts, visual = pipe.prepare([conversation])
    assert prompts[0] == inputs["input_ids"][0].tolist(), "prompt ids (template, timestamps, placeholders) differ"
    np.testing.assert_array_equal(visual.meta["video_grid_thw"], inputs["video_grid_thw"].numpy())
    video_rows = inputs["pixel_values_videos"].shape[0]
    assert np.abs(visual.feeds["pixel_values"][-video_rows:] - inputs["pixel_values_videos"].numpy()).max() == 0.0
    if family == "qwen2_5_vl":
        np.testing.assert_allclose(visual.meta["second_per_grid_ts"], inputs["second_per_grid_ts"].numpy(), rtol=1e-7)

    ids = np.asarray(prompts, dtype=np.int64)
    positions, _ = pipe.family.prefill_positions(ids, np.ones_like(ids), visual)
    np.testing.assert_array_equal(positions, _reference_positions(model, family, inputs))

    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True
        )
    settings = pipe.settings(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    events = list(pipe.generator.steps(prompts, visual, settings))
    theirs = out.sequences[0, ids.shape[1] :].tolist()
    eos = set(settings.eos_token_ids)
    stop = next((i for i, t in enumerate(theirs) if t in eos), len(theirs) - 1)
    assert events[-1].token_ids[0] == theirs[: stop + 1]
    assert len(events[-1].token_ids[0]) > 1
    ours_logits = np.stack([e.logits for e in events[:-1]], axis=1)
    hf_logits = np.stack([s.float().numpy() for s in out.logits], axis=1)[:, : ours_logits.shape[1]]
    assert np.abs(ours_logits - hf_logits).max() <= LOGITS_ATOL


@pytest.mark.slow
def test_video_embeddings_match_transformers(family, pipe, hf, videos, image_path):
    """One vision-graph call over an image and two videos (frame groups t > 1, different sizes) vs the tower."""
    model, _ = hf
    options = {"num_frames": 6}
    conversation = _conversation([videos["pal"], image_path, videos["ntsc"], "x"], options)
    prompts, visual = pipe.prepare([conversation])
    ours = pipe.generator._visual_embeds(np.asarray(prompts, dtype=np.int64), visual)
    inputs = _hf_inputs(hf, family, conversation, options)
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    tokens = model.config.vision_config.spatial_merge_size**2
    first = int(inputs["video_grid_thw"][0].prod()) // tokens
    video_rows, image_rows = torch.cat(list(video)), torch.cat(list(image))
    # Our single call keeps conversation order: video 1, the image, video 2.
    theirs = torch.cat([video_rows[:first], image_rows, video_rows[first:]]).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, float(np.abs(theirs).max()))


@pytest.mark.slow
def test_vlm_run_video_json_matches_transformers(exported_qwen2_5_vl, tiny_qwen2_5_vl_dir, videos, request):
    command = [
        sys.executable,
        "-m",
        "vlm_export.runtime.cli",
        str(exported_qwen2_5_vl),
        "--video",
        str(videos["ntsc"]),
        "--fps",
        "1",
        "--prompt",
        "What happens in the video?",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--greedy",
        "--json",
    ]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(exported_qwen2_5_vl)
    conversation = _conversation([videos["ntsc"], "What happens in the video?"], {"fps": 1.0})
    assert result["token_ids"] == pipe.generate(conversation, max_new_tokens=MAX_NEW_TOKENS, do_sample=False).token_ids
    # ... and that run is the one test_video_generation_matches_transformers[one_video] compares with transformers.
    assert result["prompt_tokens"] == len(pipe.prepare([conversation])[0][0])


# ---------------------------------------------------------------------------------------------- errors
def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_video_inputs_are_one_line_errors(qwen2_5_vl_pipe, tmp_path, videos):
    pipe = qwen2_5_vl_pipe
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video" * 300)
    empty = write_test_video(tmp_path / "empty.avi", num_frames=0)
    cases = {
        "cannot read video": _conversation([corrupt, "x"], {}),
        "no frames": _conversation([empty, "x"], {}),
        "not found": _conversation([tmp_path / "missing.mp4", "x"], {}),
        "mutually exclusive": _conversation([videos["ntsc"], "x"], {"fps": 1, "num_frames": 4}),
        "fps must be a positive number": _conversation([videos["ntsc"], "x"], {"fps": -1}),
        "num_frames must be a positive integer": _conversation([videos["ntsc"], "x"], {"num_frames": 2.5}),
        "cannot sample 200 frames": _conversation([videos["ntsc"], "x"], {"num_frames": 200}),
    }
    for expected, conversation in cases.items():
        with pytest.raises(InputError) as error:
            pipe.prepare([conversation])
        assert expected in _one_line(error), expected


def test_export_without_video_settings_refuses_videos(exported_qwen2_5_vl, videos):
    from vlm_export.manifest import Manifest
    from vlm_export.runtime.families import runtime_family_for
    from vlm_export.runtime.pipeline import _media_items

    manifest = Manifest.load(exported_qwen2_5_vl)
    manifest.preprocessing = {k: v for k, v in manifest.preprocessing.items() if k != "video"}  # an older export
    family = runtime_family_for(manifest, exported_qwen2_5_vl)
    items = _media_items(_conversation([videos["ntsc"], "x"], {}))
    with pytest.raises(InputError) as error:
        family.encode_media(items, [1])
    assert "re-export" in _one_line(error)


def test_cli_video_errors(exported_qwen2_5_vl, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 4000)
    base = [sys.executable, "-m", "vlm_export.runtime.cli", str(exported_qwen2_5_vl), "--prompt", "x"]
    bad = subprocess.run([*base, "--video", str(corrupt)], capture_output=True, text=True)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-run: error: cannot read video"), bad.stderr
    no_video = subprocess.run([*base, "--fps", "1"], capture_output=True, text=True)
    assert no_video.returncode == 2 and "--video" in no_video.stderr


def test_qwen3_vl_timestamps_text():
    """`<t seconds>` uses the mean time of each temporal patch, with the last index repeated for an odd count."""
    from vlm_export.runtime.families.qwen3_vl.video import video_prompt

    seconds = qwen3_vl_timestamps(np.array([0, 15, 30, 45, 60]), 30.0, 2)
    assert seconds == [0.25, 1.25, 2.0]
    text = video_prompt(seconds, 2, "<|video_pad|>")
    assert text.startswith("<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|><1.2 seconds>")
    assert math.isclose(seconds[-1], 60 / 30)


@pytest.mark.slow
def test_padded_batch_of_video_conversations(family, pipe, hf, videos, image_path):
    """Two conversations in one batch (left padding): prompt ids and M-RoPE positions equal the processor's and
    get_rope_index's; each conversation's videos keep their own timestamps / second_per_grid_ts."""
    from PIL import Image

    model, processor = hf
    options = {"fps": 1.0}
    conversations = [
        _conversation([videos["ntsc"], "What happens?"], options),
        _conversation([image_path, videos["pal"], "Compare the picture with the video, please."], options),
    ]
    prompts, visual = pipe.prepare(conversations)
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    clips = [hf_load_video(str(v), backend="pyav") for v in (videos["ntsc"], videos["pal"])]
    sampler = "qwen2_vl" if family == "qwen2_5_vl" else "qwen3_vl"
    inputs = processor(
        text=texts,
        images=[Image.open(image_path)],
        videos=[frames for frames, _ in clips],
        video_metadata=[_hf_metadata(meta) for _, meta in clips],
        do_sample_frames=True,
        padding=True,
        return_tensors="pt",
        **_hf_kwargs(sampler, options),
    )
    mask = inputs["attention_mask"].numpy()
    ids = inputs["input_ids"].numpy()
    assert prompts == [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]
    positions, _ = pipe.family.prefill_positions(ids, mask, visual)
    np.testing.assert_array_equal(positions, _reference_positions(model, family, inputs))
