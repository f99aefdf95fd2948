"""Every family end to end: export through the public CLI, generate through VLMPipeline on ONNX Runtime CPU, and
compare with transformers on the same inputs — prompt token ids, vision embeddings, per-step logits and greedy
tokens (text only, one image, two images of different sizes, an image above max_pixels, padded batches)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS = 12
# Logits of the tiny random model are O(1-10); fp32 ORT vs PyTorch differ by float rounding only.
LOGITS_ATOL = 1e-4


FAMILIES = {
    # family: (transformers model class, transformers processor class)
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def exported(family, request):
    return request.getfixturevalue(f"exported_{family}")


@pytest.fixture(scope="module")
def pipe(exported):
    from vlm_export.runtime import VLMPipeline

    return VLMPipeline.from_pretrained(exported, backend="ort-cpu")


@pytest.fixture(scope="module")
def hf(family, request):
    from vlm_export.testing.reference import vl_processor

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model_class, processor_class = (getattr(transformers, name) for name in FAMILIES[family])
    model = model_class.from_pretrained(model_dir).eval()
    return model, vl_processor(model_dir, processor_class)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Odd sizes, portrait and landscape, one larger than the processor's max_pixels."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (w, h) in {"small": (97, 131), "wide": (300, 118), "big": (1100, 900)}.items():
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


def _user(*parts):
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            content.append({"type": "image", "path": str(part)})
    return [{"role": "user", "content": content}]


def _hf_generate(hf, conversations):
    model, processor = hf
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # one image list per conversation, as apply_chat_template passes them (LLaVA-OneVision treats a
    # conversation with several images differently)
    images = [
        [Image.open(part["path"]) for m in c for part in m["content"] if part["type"] == "image"] for c in conversations
    ]
    inputs = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = inputs["input_ids"].shape[1]
    pairs = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    prompts = [ids[mask.bool()].tolist() for ids, mask in pairs]
    generated = out.sequences[:, prompt_len:].numpy()
    logits = np.stack([step.float().numpy() for step in out.logits], axis=1)  # [B, steps, V]
    return prompts, generated, logits


def _trim(row: np.ndarray, eos: set[int]) -> list[int]:
    for index, token in enumerate(row.tolist()):
        if token in eos:
            return row[: index + 1].tolist()
    return row.tolist()


CASES = {
    "text_only": lambda img: [_user("Write a haiku about rivers.")],
    "one_image": lambda img: [_user(img["small"], "Describe the image.")],
    "two_images": lambda img: [_user(img["wide"], img["small"], "Compare these two pictures.")],
    "image_above_max_pixels": lambda img: [_user(img["big"], "What is this?")],
    "batch_padded": lambda img: [
        _user(img["small"], img["wide"], "Compare them in detail please."),
        _user("Hi!"),
    ],
    "batch_images_each": lambda img: [
        _user(img["wide"], "What is it?"),
        _user("First:", img["small"], "and second:", img["wide"], "Which is brighter?"),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logits_match_transformers(case, pipe, hf, images):
    conversations = CASES[case](images)
    hf_prompts, hf_generated, hf_logits = _hf_generate(hf, conversations)

    prompts, visual = pipe.prepare(conversations)
    assert prompts == hf_prompts, "prompt token ids (template + placeholder expansion) differ from transformers"

    settings = pipe.settings(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    events = list(pipe.generator.steps(prompts, visual, settings))
    output, steps = events[-1], events[:-1]
    eos = set(settings.eos_token_ids)
    for row in range(len(conversations)):
        assert output.token_ids[row] == _trim(hf_generated[row], eos), f"row {row} tokens differ"
    assert len(output.token_ids[0]) > 1
    ours = np.stack([event.logits for event in steps], axis=1)
    steps_compared = ours.shape[1]
    diff = np.abs(ours - hf_logits[:, :steps_compared]).max()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff}"


def test_generate_api_returns_results(pipe, images):
    single = pipe.generate(_user(images["small"], "Describe it."), max_new_tokens=5, do_sample=False)
    assert single.prompt_tokens > 10 and 1 <= len(single.token_ids) <= 5
    assert single.text == pipe.tokenizer.decode(single.token_ids)
    batch = pipe.generate([_user("a"), _user(images["wide"], "b")], max_new_tokens=3, do_sample=False)
    assert isinstance(batch, list) and len(batch) == 2
    streamed = "".join(pipe.stream(_user(images["small"], "Describe it."), max_new_tokens=5, do_sample=False))
    eos = set(pipe.settings().eos_token_ids)
    assert streamed == pipe.tokenizer.decode([t for t in single.token_ids if t not in eos])


def test_vlm_run_json_matches_transformers(exported, pipe, hf, images):
    command = [
        sys.executable,
        "-m",
        "vlm_export.runtime.cli",
        str(exported),
        "--image",
        str(images["wide"]),
        "--image",
        str(images["small"]),
        "--prompt",
        "Compare the two animals.",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--greedy",
        "--json",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout)
    _, hf_generated, _ = _hf_generate(hf, [_user(images["wide"], images["small"], "Compare the two animals.")])
    assert result["token_ids"] == _trim(hf_generated[0], set(pipe.settings().eos_token_ids))
    assert result["prompt_tokens"] > 0 and set(result["timings"]) >= {"ttft_s", "decode_s"}


def test_manifest_records_verification(exported, family):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["family"] == family
    for name in ("vision_encoder", "embedding", "decoder"):
        assert manifest["graphs"][name]["max_abs_diff"] <= 1e-4
    assert (exported / "chat_template.jinja").is_file() and (exported / "tokenizer.json").is_file()


def test_vision_embeddings_match_transformers(family, pipe, hf, images):
    """Our preprocessing + vision graph vs transformers' processor + vision tower, several images at once."""
    model, processor = hf
    paths = [images["wide"], images["small"], images["big"]]
    conversation = _user(*paths, "x")
    prompts, visual = pipe.prepare([conversation])
    ours = pipe.generator._visual_embeds(np.asarray(prompts, dtype=np.int64), visual)
    pil_images = [Image.open(p) for p in paths]
    with torch.no_grad():
        if family == "llava_onevision":  # one conversation with several images: the multi-image path
            inputs = processor.image_processor(images=[pil_images], return_tensors="pt")
            config = model.config
            theirs = model.get_image_features(
                inputs["pixel_values"],
                inputs["image_sizes"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                vision_aspect_ratio=config.vision_aspect_ratio,
                batch_num_images=inputs["batch_num_images"],
            ).pooler_output
        else:
            inputs = processor.image_processor(images=pil_images, return_tensors="pt")
            theirs = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            np.testing.assert_array_equal(visual.meta["image_grid_thw"], inputs["image_grid_thw"].numpy())
    theirs = torch.cat(theirs).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


def test_moe_routes_to_many_experts(family, hf, pipe, images):
    """The MoE parity above means something only if tokens spread over experts and dense layers are mixed in."""
    if family != "qwen3_vl_moe":
        pytest.skip("not an MoE family")
    from vlm_export.testing.tiny_models import expert_usage

    model, _ = hf
    assert model.config.text_config.mlp_only_layers, "the tiny MoE config must keep some dense MLP layers"
    prompts, _ = pipe.prepare([_user("Write a haiku about rivers and mountains in the spring.")])
    usage = expert_usage(model, torch.tensor(prompts))
    assert usage and all(len(experts) >= 3 for experts in usage.values()), usage
    assert json.loads((pipe.folder / "manifest.json").read_text())["text"]["moe_form"] == "ort_moe"
