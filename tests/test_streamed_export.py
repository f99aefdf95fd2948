"""Issue 16: graphs traced without weights and written tensor by tensor from the checkpoint are the graphs the
in-memory export made; weights are read as transformers reads them; quantization while writing equals onnxruntime's
MatMulNBitsQuantizer on the float graph; a depth-reduced copy verifies large models with their own weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import torch

from vlm_export.graphs.registry import graph_family_for


def _weightless(family, model_dir, dtype=torch.float32, **options):
    from vlm_export.exporter.checkpoint import validate_checkpoint
    from vlm_export.exporter.weightless import build_weightless

    return build_weightless(family, model_dir, validate_checkpoint(model_dir), dtype, options)


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_qwen2_5_vl_dir",
        "tiny_qwen2_5_vl_v5_dir",
        "tiny_qwen3_vl_dir",
        "tiny_qwen3_vl_moe_dir",
        "tiny_llava_onevision_dir",
    ],
)
def test_checkpoint_weights_are_what_from_pretrained_loads(fixture, request):
    """Every parameter (renamed keys, tied lm_head, Qwen3-VL-MoE's transposed experts) and every buffer."""
    from vlm_export.exporter.model_source import read_model_type

    model_dir = request.getfixturevalue(fixture)
    family = graph_family_for(read_model_type(model_dir))
    weightless, weights = _weightless(family, model_dir)
    reference = family.load_model(model_dir, torch.float32)
    assert weights.missing() == [] and weights.unexpected == []
    for name, param in reference.named_parameters(remove_duplicate=False):
        assert torch.equal(weights.read(name, torch.float32), param.detach()), name
    buffers = dict(weightless.named_buffers())
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    fake = [n for n, p in weightless.named_parameters() if type(p.data).__name__ == "FakeTensor"]
    assert fake, "the large parameters must stay weightless"
    assert weightless.generation_config.to_diff_dict() == reference.generation_config.to_diff_dict()


def _run_all(path, feeds_list):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, {k: v.numpy() for k, v in feeds.items()}) for feeds in feeds_list]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("fixture", ["tiny_qwen3_vl_moe_dir", "tiny_llava_onevision_dir"])
def test_weightless_export_equals_the_in_memory_export(fixture, request, tmp_path, monkeypatch):
    """Same ops, and bit-identical outputs on the verification inputs, for every graph. The lm_head is cut into
    vocabulary slices here (as at real sizes), so the slices' rows are read from the tied embedding table."""
    import vlm_export.exporter.weightless as weightless_module
    import vlm_export.graphs.decoder as decoder_module
    from vlm_export.exporter.model_source import read_model_type
    from vlm_export.exporter.onnx_export import export_graph

    monkeypatch.setattr(decoder_module, "LM_HEAD_SLICE_BYTES", 8 << 20)  # the tiny 39 MB table -> 5 slices
    # Every parameter above 1 KB weightless (at real sizes, all matrices are): the tiny model's would all be read
    # for real under the default threshold, and the lazily folded weights would go untested.
    monkeypatch.setattr(weightless_module, "REAL_PARAMETER_BYTES", 1024)
    model_dir = request.getfixturevalue(fixture)
    family = graph_family_for(read_model_type(model_dir))
    reference = family.load_model(model_dir, torch.float32)
    weightless, weights = _weightless(family, model_dir)
    (tmp_path / "real").mkdir()
    (tmp_path / "streamed").mkdir()
    real_specs = family.graph_specs(reference, torch.float32)
    for real, streamed in zip(real_specs, family.graph_specs(weightless, torch.float32), strict=True):
        export_graph(real, tmp_path / "real")
        export_graph(streamed, tmp_path / "streamed", weights)
        a, b = (tmp_path / side / f"{real.name}.onnx" for side in ("real", "streamed"))
        assert _ops(a) == _ops(b), real.name
        for want, got in zip(_run_all(a, real.verify_feeds), _run_all(b, real.verify_feeds), strict=True):
            for x, y in zip(want, got, strict=True):
                np.testing.assert_array_equal(x, y, err_msg=real.name)
    graph = onnx.load(str(tmp_path / "streamed" / "decoder.onnx"), load_external_data=False).graph
    matmul_outputs = {n.output[0] for n in graph.node if n.op_type == "MatMul"}
    slices = max(sum(i in matmul_outputs for i in n.input) for n in graph.node if n.op_type == "Concat")
    assert slices == 5, "the lm_head was not cut into vocabulary slices"


def test_streamed_quantization_equals_matmul_nbits_quantizer(exported_qwen2_5_vl, tmp_path):
    """Quantizing one weight at a time gives exactly onnxruntime's MatMulNBitsQuantizer on the whole float graph."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    from vlm_export.exporter.quantize import QuantizeConfig, _name_nodes, _targets, quantize_graph

    def contents(model):
        nodes = [(n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in model.graph.node]
        weights = {
            t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer
        }
        return nodes, weights

    for scheme, graph in (("int4", "decoder"), ("int4", "embedding"), ("int8", "decoder")):
        config = QuantizeConfig(scheme=scheme)
        streamed = tmp_path / scheme / f"{graph}.onnx"
        quantize_graph(exported_qwen2_5_vl / f"{graph}.onnx", streamed, config)
        whole = onnx.load(str(exported_qwen2_5_vl / f"{graph}.onnx"))
        _name_nodes(whole.graph)
        matmuls, gathers, _ = _targets(whole.graph, config.bits)
        op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
        chosen = set(matmuls) | set(gathers)
        quantizer = MatMulNBitsQuantizer(
            whole,
            bits=config.bits,
            block_size=config.block_size,
            accuracy_level=config.accuracy_level,
            nodes_to_exclude=[n.name for n in whole.graph.node if n.op_type in op_types and n.name not in chosen],
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=op_types,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
        assert contents(onnx.load(str(streamed))) == contents(quantizer.model.model), (scheme, graph)


def _data_bytes_in_use(folder):
    used = 0
    for path in folder.glob("*.onnx"):
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
            used += sum(int(e.value) for e in tensor.external_data if e.key == "length")
    return used


@pytest.fixture(scope="module")
def tiny_four_layer_dir(tmp_path_factory):
    from vlm_export.testing.tiny_models import build_tiny_qwen2_5_vl

    out = tmp_path_factory.mktemp("tiny_four_layers")
    return build_tiny_qwen2_5_vl(out, layout="hub", seed=1, num_hidden_layers=4, check_greedy=False)


def test_depth_reduced_copy_holds_the_kept_layers(tiny_four_layer_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_export.exporter.checkpoint import validate_checkpoint
    from vlm_export.exporter.depth_reduction import write_reduced_checkpoint
    from vlm_export.exporter.weightless import model_config

    family = graph_family_for("qwen2_5_vl")
    config = model_config(family.model_class, tiny_four_layer_dir)
    selections = family.reduce_depth(config)
    assert {s.label: s.keep for s in selections}["text layers"] == [0, 3]
    reduced = write_reduced_checkpoint(
        tiny_four_layer_dir, validate_checkpoint(tiny_four_layer_dir), tmp_path / "r", config, selections
    )
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_four_layer_dir, dtype=torch.float32)
    small = Qwen2_5_VLForConditionalGeneration.from_pretrained(reduced, dtype=torch.float32)
    assert len(small.model.language_model.layers) == 2
    kept = {0: 0, 1: 3}
    for new, old in kept.items():
        a = small.model.language_model.layers[new].state_dict()
        b = full.model.language_model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    vision_keep = {s.label: s.keep for s in selections}["vision blocks"]
    assert small.config.vision_config.fullatt_block_indexes == [
        vision_keep.index(i) for i in full.config.vision_config.fullatt_block_indexes if i in vision_keep
    ]
    assert torch.equal(small.lm_head.weight, full.lm_head.weight)


def test_reduced_verification_and_quantizing_while_writing(tiny_four_layer_dir, tmp_path):
    """`--verify reduced --quantize int4`: the manifest says which layers were verified, the int4 weights are
    written without float copies of the fused projections, and the export generates."""
    from vlm_export.exporter.export import export_model
    from vlm_export.exporter.quantize import QuantizeConfig
    from vlm_export.runtime import VLMPipeline

    config = QuantizeConfig(scheme="int4", graphs=("decoder", "embedding", "vision_encoder"))
    result = export_model(
        str(tiny_four_layer_dir), tmp_path / "out", verify="reduced", quantize=config, progress=False, golden=False
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    verification = manifest["verification"]
    assert verification["depth"] == "reduced"
    assert verification["kept"]["text layers"] == [0, 3]
    assert all(g["max_abs_diff"] <= g["tolerance"] * 100 for g in verification["graphs"].values())
    assert manifest["quantization"]["agreement_vs_float32"]["measured_on"].startswith("the depth-reduced copy")
    assert manifest["quantization"]["graphs"]["decoder"]["matmul_nbits"] > 0
    out = tmp_path / "out"
    on_disk = sum(p.stat().st_size for p in out.glob("*.onnx.data"))
    in_use = _data_bytes_in_use(out)
    assert on_disk - in_use < 4096 * 400, "weights written to the data files that no graph reads"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the reduced copy or a staging folder was left behind"
    pipe = VLMPipeline.from_pretrained(out)
    text = pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=3, do_sample=False)
    assert len(text.token_ids) == 3
    assert result.manifest.verification == verification
    shutil.rmtree(out)


def test_float16_export_refuses_activations_float16_cannot_hold(tiny_qwen2_5_vl_dir, tmp_path, capsys):
    """The range check runs the whole model (one module's weights at a time): a norm scale that pushes one layer's
    activations past 65504 fails the float16 export before anything is written, naming the module."""
    from safetensors.torch import load_file, save_file

    from vlm_export.exporter.cli import main

    model = shutil.copytree(tiny_qwen2_5_vl_dir, tmp_path / "loud")
    key = "model.layers.1.post_attention_layernorm.weight"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key] * 1e5
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["--model", str(model), "--output", str(tmp_path / "out"), "--dtype", "float16", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "float16 cannot hold" in err and "language_model.layers.1" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud"]


@pytest.mark.parametrize("fixture", ["tiny_qwen2_5_vl_dir", "tiny_qwen3_vl_moe_dir"])
def test_on_demand_reference_equals_the_loaded_model(fixture, request, monkeypatch):
    """transformers' forward on the weightless model, each module reading its weights for its own call (how models
    too large to load beside their graphs are verified at full depth), is bit-identical to the loaded model's;
    Qwen3-VL-MoE's export form replaces the MoE block's forward, which reads its experts' weights directly."""
    import vlm_export.exporter.weightless as weightless_module
    from vlm_export.exporter.activation_scan import OnDemandWeights
    from vlm_export.exporter.model_source import read_model_type

    monkeypatch.setattr(weightless_module, "REAL_PARAMETER_BYTES", 1024)  # see the test above
    model_dir = request.getfixturevalue(fixture)
    family = graph_family_for(read_model_type(model_dir))
    loaded = family.load_model(model_dir, torch.float32)
    weightless, weights = _weightless(family, model_dir)
    hooks = OnDemandWeights(weightless, weights)
    pairs = zip(family.graph_specs(loaded, torch.float32), family.graph_specs(weightless, torch.float32), strict=True)
    with torch.no_grad():
        for want_spec, got_spec in pairs:
            for want_feeds, got_feeds in zip(want_spec.verify_feeds, got_spec.verify_feeds, strict=True):
                for want, got in zip(want_spec.reference(want_feeds), got_spec.reference(got_feeds), strict=True):
                    assert torch.equal(want, got), want_spec.name
    hooks.remove()
    fake = [type(p.data).__name__ == "FakeTensor" for p in weightless.model.language_model.layers.parameters()]
    assert sum(fake) > len(fake) // 2, "the layers' weights must be weightless for the test to mean anything"
    assert all(
        type(p.data).__name__ == "FakeTensor" for p in weightless.model.language_model.layers[0].mlp.parameters()
    )
