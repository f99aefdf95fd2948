"""`--quantize int4 / int8`: weight-only MatMulNBits graphs, the manifest record, generation, agreement with fp32.

Quantized graphs are not exact, so they are compared with the fp32 export (itself held equal to transformers by
test_e2e_parity) by teacher-forced agreement (`vlm_export.exporter.agreement`). The tiny random models amplify
weight rounding: measured on the session's tiny Qwen2.5-VL (2 layers, weights std ~0.08), the logit error
relative to the logits' spread is ~0.04 for int8 and ~0.5-0.55 for int4; int4 / int8 ~ 13, close to the ratio of
their rounding steps (255 / 15 = 17), so both are rounding, not a wiring error. Their near-flat logits (top-1 vs
top-2 gap ~ the int4 error) then give int4 a top-1 agreement between 0.25 and 0.81 depending on the prompt
(top-5 0.47-0.97), int8 top-1 0.88-1.0 and top-5 1.0 (32 forced tokens, 4 prompts measured). Thresholds sit
below those with margin; a wrongly wired weight (transposed, wrong scales) gives uncorrelated logits: relative
error ~1.4 and agreement ~0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

from vlm_export.exporter.quantize import graph_files  # noqa: E402

NEW_TOKENS = 32


def _conversation():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (112, 140, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]


def _op_counts(path):
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory, tiny_qwen2_5_vl_dir):
    """The tiny Qwen2.5-VL exported through the CLI with --quantize int4 (and the printed summary)."""
    out = tmp_path_factory.mktemp("quant") / "int4"
    command = [sys.executable, "-m", "vlm_export.exporter.cli", "--model", str(tiny_qwen2_5_vl_dir)]
    command += ["--output", str(out), "--quantize", "int4", "--quiet", "--no-golden"]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return out, completed.stdout


@pytest.fixture(scope="module")
def int8_all_graphs(tmp_path_factory, exported_qwen2_5_vl):
    """The session's fp32 export quantized to int8 in a copy, all three graphs (exercises the Gemm rewrite)."""
    from vlm_export.exporter.decoder_forms import add_decoder_forms
    from vlm_export.exporter.quantize import QuantizeConfig, quantize_export
    from vlm_export.manifest import Manifest

    out = tmp_path_factory.mktemp("quant") / "int8"
    shutil.copytree(exported_qwen2_5_vl, out)
    manifest = Manifest.load(out)
    config = QuantizeConfig(scheme="int8", graphs=("vision_encoder", "embedding", "decoder"))
    manifest.quantization = quantize_export(out, manifest, config)
    add_decoder_forms(out, manifest)  # as export_model does after quantizing
    manifest.save(out)
    return out


def test_int4_graphs_use_matmul_nbits(int4_export, exported_qwen2_5_vl):
    out, _ = int4_export
    decoder, embedding, vision = (_op_counts(out / f"{g}.onnx") for g in ("decoder", "embedding", "vision_encoder"))
    # every projection and the lm_head: 2 layers x 4 (qkv and gate-up fused) + 1, none left as a float MatMul
    assert decoder.get("MatMulNBits") == 9 and "MatMul" not in decoder
    assert embedding.get("GatherBlockQuantized") == 1
    assert "MatMulNBits" not in vision  # vision stays float32 by default

    def stored_bytes(folder):
        files = [f for g in ("decoder", "embedding") for f in graph_files(folder, f"{g}.onnx")]
        return sum(f.stat().st_size for f in files)

    fp32_bytes, int4_bytes = stored_bytes(exported_qwen2_5_vl), stored_bytes(out)
    assert int4_bytes < fp32_bytes / 5
    assert not (out / ".quantized").exists()


def test_manifest_records_quantization(int4_export):
    out, summary = int4_export
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    assert quant["scheme"] == "int4" and quant["bits"] == 4
    assert quant["block_size"] == 32 and quant["accuracy_level"] == 4
    assert set(quant["graphs"]) == {"decoder", "embedding"}
    assert quant["graphs"]["decoder"]["matmul_nbits"] == 9
    agreement = quant["agreement_vs_float32"]
    assert agreement["positions"] == 16 and 0.0 <= agreement["top1"] <= 1.0
    assert "teacher-forced agreement with float32" in summary and "quantized int4" in summary


def test_old_manifest_without_quantization_loads(exported_qwen2_5_vl):
    from vlm_export.manifest import Manifest

    data = json.loads((exported_qwen2_5_vl / "manifest.json").read_text())
    data.pop("quantization", None)
    assert Manifest.from_dict(data).quantization == {}


def test_vlm_run_generates_with_int4(int4_export):
    out, _ = int4_export
    command = [sys.executable, "-m", "vlm_export.runtime.cli", str(out), "--prompt", "Tell me a story."]
    command += ["--max-new-tokens", "6", "--greedy", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout)
    assert len(result["token_ids"]) == 6 and result["prompt_tokens"] > 0


def test_int4_agreement_with_fp32(int4_export, qwen2_5_vl_pipe):
    from vlm_export.exporter.agreement import top1_agreement
    from vlm_export.runtime import VLMPipeline

    out, _ = int4_export
    agreement = top1_agreement(qwen2_5_vl_pipe, VLMPipeline.from_pretrained(out), [_conversation()], NEW_TOKENS)
    print(f"int4 vs fp32 (tiny Qwen2.5-VL): {agreement}")
    assert agreement.relative_logit_rms < 0.8
    assert agreement.top5 >= 0.3
    assert agreement.top1 >= 0.1


def test_int8_agreement_with_fp32(int8_all_graphs, qwen2_5_vl_pipe):
    from vlm_export.exporter.agreement import top1_agreement
    from vlm_export.runtime import VLMPipeline

    vision = _op_counts(int8_all_graphs / "vision_encoder.onnx")
    assert vision.get("MatMulInteger") == 22 and "MatMulNBits" not in vision  # 4 blocks x 5 + merger 2
    assert vision.get("DynamicQuantizeLinear", 0) >= 1  # activations int8 too
    assert "GatherBlockQuantized" not in _op_counts(int8_all_graphs / "embedding.onnx")  # no 8-bit Gather
    agreement = top1_agreement(qwen2_5_vl_pipe, VLMPipeline.from_pretrained(int8_all_graphs), [_conversation()])
    print(f"int8 (all graphs) vs fp32 (tiny Qwen2.5-VL): {agreement}")
    assert agreement.relative_logit_rms < 0.1
    assert agreement.top5 >= 0.95
    assert agreement.top1 >= 0.75


@pytest.mark.parametrize("fixture", ["int4_export", "int8_all_graphs"])
def test_quantized_exports_carry_the_opset23_decoder(fixture, request, monkeypatch):
    """A quantized export (also one quantized after export) gets the older decoder form from the quantized graph:
    the same MatMulNBits nodes, the same weights file, the same greedy tokens as the default form (on onnxruntime
    1.23.2: the int4 field case, tests/test_runtime_compat.py)."""
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.ort import OrtCpuBackend

    out = request.getfixturevalue(fixture)
    out = out[0] if isinstance(out, tuple) else out
    forms = json.loads((out / "manifest.json").read_text())["graph_forms"]["decoder"]
    assert [f["file"] for f in forms] == ["decoder.onnx", "decoder.opset23.onnx"]
    default, older = _op_counts(out / "decoder.onnx"), _op_counts(out / "decoder.opset23.onnx")
    assert older["MatMulNBits"] == default["MatMulNBits"] >= 9 and "TensorScatter" not in older
    assert [p.name for p in graph_files(out, "decoder.opset23.onnx")] == ["decoder.opset23.onnx", "decoder.onnx.data"]
    conversation = _conversation()
    want = VLMPipeline.from_pretrained(out).generate(conversation, max_new_tokens=8, do_sample=False).token_ids
    monkeypatch.setattr(OrtCpuBackend, "onnxruntime_version", "1.23.2")
    pipe = VLMPipeline.from_pretrained(out)
    assert pipe.graph_forms["decoder"].file == "decoder.opset23.onnx"
    assert pipe.generate(conversation, max_new_tokens=8, do_sample=False).token_ids == want


def test_int8_vision_encoder_close_to_fp32(int8_all_graphs, qwen2_5_vl_pipe):
    """The Gemm -> MatMul rewrite and dynamic int8 keep the vision encoder's meaning: embeddings close to fp32.

    Int8 weights and activations (per tensor); a transposed or misplaced weight would give ~1.4. On the 0.5B-class
    model's full ViT the relative L2 error was 0.038.
    """
    from vlm_export.runtime import VLMPipeline

    quantized = VLMPipeline.from_pretrained(int8_all_graphs)
    prompts, visual = qwen2_5_vl_pipe.prepare([_conversation()])
    ids = np.asarray(prompts, dtype=np.int64)
    reference = qwen2_5_vl_pipe.generator._visual_embeds(ids, visual)
    got = quantized.generator._visual_embeds(ids, visual)
    relative = np.sqrt(((got - reference) ** 2).mean() / (reference**2).mean())
    assert relative < 0.1, relative


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "float16"], "drop --dtype float16 or --quantize"),
        (["--quant-block-size", "48"], "--quant-block-size must be a power of two"),
        (["--quant-graphs", "decoder,lm_head"], "--quant-graphs takes a comma-separated subset"),
    ],
)
def test_bad_quantize_options_are_one_line_errors(tiny_qwen2_5_vl_dir, tmp_path, capsys, extra, message):
    from vlm_export.exporter.cli import main

    argv = ["--model", str(tiny_qwen2_5_vl_dir), "--output", str(tmp_path / "x"), "--quantize", "int4", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_dynamic_int8_keeps_the_quantizers_chatter_out_of_the_log(exported_qwen2_5_vl, tmp_path, caplog):
    """onnxruntime's quantize_dynamic logs one INFO line per activation on the root logger (130 for a 0.5B-class
    ViT); the export's log keeps only our one-line summary."""
    import logging

    from vlm_export.exporter.quantize import quantize_graph_dynamic_int8

    with caplog.at_level(logging.INFO):
        quantize_graph_dynamic_int8(exported_qwen2_5_vl / "vision_encoder.onnx", tmp_path / "vision_encoder.onnx")
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "Quantization parameters" in m]
    assert any("MatMulInteger (int8 weights and activations)" in m for m in messages)
    assert (tmp_path / "vision_encoder.onnx.data").is_file()  # weights external, memory-mapped like the rest
