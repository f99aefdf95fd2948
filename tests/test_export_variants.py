"""Export variants: transformers v5's config layout gives the same export; float16 graphs run and agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


def test_v5_layout_exports_the_same_contract(tiny_qwen2_5_vl_v5_dir, exported_qwen2_5_vl, tmp_path):
    from vlm_export.exporter.export import export_model
    from vlm_export.runtime import VLMPipeline

    result = export_model(str(tiny_qwen2_5_vl_v5_dir), tmp_path / "v5", progress=False, golden=False)
    hub = json.loads((exported_qwen2_5_vl / "manifest.json").read_text())
    v5 = json.loads((result.output / "manifest.json").read_text())
    for key in ("family", "tokens", "text", "vision", "preprocessing", "limits"):
        assert v5[key] == hub[key], key
    assert (result.output / "chat_template.jinja").read_text() == (
        exported_qwen2_5_vl / "chat_template.jinja"
    ).read_text()
    conversation = [{"role": "user", "content": "Tell me a story."}]
    a = VLMPipeline.from_pretrained(result.output).generate(conversation, max_new_tokens=6, do_sample=False)
    b = VLMPipeline.from_pretrained(exported_qwen2_5_vl).generate(conversation, max_new_tokens=6, do_sample=False)
    assert a.token_ids == b.token_ids


def test_float16_export_runs_on_cpu(tiny_qwen2_5_vl_dir, qwen2_5_vl_pipe, tmp_path):
    """fp16 graphs are verified against transformers in fp16 at export; report agreement with fp32 here."""
    from vlm_export.exporter.export import export_model
    from vlm_export.runtime import VLMPipeline

    result = export_model(str(tiny_qwen2_5_vl_dir), tmp_path / "fp16", dtype="float16", progress=False, golden=False)
    assert result.manifest.dtype == "float16"
    pipe16 = VLMPipeline.from_pretrained(result.output)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    prompts, visual = pipe16.prepare([conversation])
    settings = pipe16.settings(do_sample=False, max_new_tokens=1)
    first16 = next(iter(pipe16.generator.steps(prompts, visual, settings))).logits
    first32 = next(iter(qwen2_5_vl_pipe.generator.steps(prompts, visual, settings))).logits
    # fp16 rounding over 2 layers of a random model: agreement of the prefill logits within a loose bound
    assert np.abs(first16 - first32).max() < 0.1


def test_moe_dense_form_for_tensorrt_gives_the_same_tokens(tiny_qwen3_vl_moe_dir, exported_qwen3_vl_moe, tmp_path):
    """`--moe-form dense` (plain ONNX ops TensorRT parses) generates what the default ORT MoE kernel form does,
    which test_e2e_parity holds equal to transformers."""
    from vlm_export.exporter.cli import main
    from vlm_export.runtime import VLMPipeline

    out = tmp_path / "dense"
    flags = ["--moe-form", "dense", "--quiet", "--no-golden"]
    assert main(["--model", str(tiny_qwen3_vl_moe_dir), "--output", str(out), *flags]) == 0
    assert json.loads((out / "manifest.json").read_text())["text"]["moe_form"] == "dense"
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    dense = VLMPipeline.from_pretrained(out).generate(conversation, max_new_tokens=8, do_sample=False)
    fused = VLMPipeline.from_pretrained(exported_qwen3_vl_moe).generate(conversation, max_new_tokens=8, do_sample=False)
    assert dense.token_ids == fused.token_ids


def test_moe_form_is_refused_for_dense_models(tiny_qwen2_5_vl_dir, tmp_path, capsys):
    from vlm_export.exporter.cli import main

    code = main(["--model", str(tiny_qwen2_5_vl_dir), "--output", str(tmp_path / "x"), "--moe-form", "dense"])
    assert code == 1
    assert "--moe-form applies to mixture-of-experts models" in capsys.readouterr().err
