"""Each MoE export form of `vlm_export.graphs.moe` on one sparse block of the tiny Qwen3-VL-MoE: exported with
dynamo at opset 23, run in ONNX Runtime CPU on other shapes and values than the traced example (whose tokens
all route to the same 2 experts, so a form that bakes in the example's experts fails), compared with
transformers' own block (default experts implementation)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vlm_export.graphs.moe import (  # noqa: E402
    DOWN_STACKED,
    FC1_INTERLEAVED,
    MOE_FORMS,
    apply_moe_form,
    dense_moe_forward,
    moe_form,
)

LAYER = 1  # layer 0 is the dense MLP in the tiny model (mlp_only_layers=[0])
TOLERANCE = 1e-5
#: Shapes [B, S] the exported graphs are checked on; none is the traced example's [2, 2].
VERIFY_SHAPES = [(3, 7), (1, 1), (1, 5), (4, 16)]

#: Operators of onnx-tensorrt's docs/operators.md (10.1-GA) that the portable forms may use. A form leaving
#: this set (or the ONNX domain) would not parse in TensorRT.
TENSORRT_OPS = {
    "Concat",
    "Div",
    "Expand",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gemm",
    "MatMul",
    "Mul",
    "ReduceSum",
    "Reshape",
    "ScatterElements",
    "Shape",
    "Sigmoid",
    "Softmax",
    "Split",
    "Squeeze",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "Cast",
    "Add",
}
#: TensorRT wants these inputs as initializers / constants (operators.md "Restrictions").
CONSTANT_INPUTS = {"ReduceSum": 1, "Squeeze": 1, "Unsqueeze": 1, "TopK": 1}


def _load(model_dir: Path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def cases(tiny_qwen3_vl_moe_dir: Path):
    """The example input, the verification inputs and transformers' outputs for them (untouched model)."""
    model = _load(tiny_qwen3_vl_moe_dir)
    block = model.model.language_model.layers[LAYER].mlp
    hidden = block.experts.gate_up_proj.shape[-1]
    generator = torch.Generator().manual_seed(7)
    example = torch.randn(1, 1, hidden, generator=generator).expand(2, 2, hidden).contiguous()
    inputs = [torch.randn(b, s, hidden, generator=generator) for b, s in VERIFY_SHAPES]
    with torch.no_grad():
        expected = [block(x) for x in inputs]
        example_experts = set(block.gate(example.reshape(-1, hidden))[2].unique().tolist())
        verify_experts = set(torch.cat([block.gate(x.reshape(-1, hidden))[2].reshape(-1) for x in inputs]).tolist())
    return {
        "example": example,
        "inputs": inputs,
        "expected": expected,
        "example_experts": example_experts,
        "verify_experts": verify_experts,
        "num_experts": block.experts.gate_up_proj.shape[0],
    }


def test_routing_hits_several_experts(cases) -> None:
    assert len(cases["example_experts"]) == 2  # one token repeated: top-2
    assert len(cases["verify_experts"]) >= cases["num_experts"] - 1
    assert len(cases["verify_experts"] - cases["example_experts"]) >= 4


def _export(block, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        program = torch.onnx.export(
            block,
            (example,),
            dynamo=True,
            opset_version=23,
            input_names=["hidden_states"],
            output_names=["output"],
            dynamic_shapes=({0: batch, 1: seq},),
        )
    program.save(str(path))
    return onnx.load(str(path))


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)
    return names


@pytest.mark.parametrize("form", MOE_FORMS)
def test_form_exports_and_matches_transformers(form: str, cases, tiny_qwen3_vl_moe_dir: Path, tmp_path: Path) -> None:
    model = _load(tiny_qwen3_vl_moe_dir)
    apply_moe_form(model, form)
    assert moe_form(model) == form
    block = model.model.language_model.layers[LAYER].mlp

    with torch.no_grad():  # eager still runs (transformers' forward) and still matches
        for x, want in zip(cases["inputs"], cases["expected"], strict=True):
            assert float((block(x) - want).abs().max()) <= TOLERANCE

    proto = _export(block, cases["example"], tmp_path / f"{form}.onnx")
    ops = collections.Counter((node.domain or "ai.onnx", node.op_type) for node in proto.graph.node)
    # weights re-laid by the exporter, never by graph ops (ORT does not fold those at real size)
    initializers = {init.name for init in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "Transpose" and set(n.input) & initializers]
    if form == "ort_moe":
        assert f"experts.{FC1_INTERLEAVED}" in initializers and "experts.gate_up_proj" not in initializers
    if form == "dense":
        assert f"experts.{DOWN_STACKED}" in initializers and "experts.down_proj" not in initializers
    if form == "ort_moe":
        (moe,) = [node for node in proto.graph.node if node.op_type == "MoE"]
        assert moe.domain == "com.microsoft"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe.attribute}
        assert attrs["k"] == 2 and attrs["swiglu_fusion"] == 1 and attrs["normalize_routing_weights"] == 1
        assert attrs["activation_type"] == b"swiglu"
    else:
        assert {domain for domain, _ in ops} == {"ai.onnx"}
        assert {op for _, op in ops} <= TENSORRT_OPS, sorted({op for _, op in ops} - TENSORRT_OPS)
        assert not {"Loop", "If", "NonZero", "Scan"} & {op for _, op in ops}
        constants = _constant_names(proto)
        for node in proto.graph.node:
            index = CONSTANT_INPUTS.get(node.op_type)
            if index is not None and len(node.input) > index and node.input[index]:
                assert node.input[index] in constants, f"{node.op_type} {node.name}: input {index} not constant"

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / f"{form}.onnx"), options, providers=["CPUExecutionProvider"])
    for x, want in zip(cases["inputs"], cases["expected"], strict=True):
        (got,) = session.run(None, {"hidden_states": x.numpy()})
        assert got.shape == tuple(want.shape)
        diff = float(np.abs(got - want.numpy()).max())
        assert diff <= TOLERANCE, f"{form} on {tuple(x.shape)}: max abs diff {diff:.3g}"


def test_dense_computation_matches_transformers(cases, tiny_qwen3_vl_moe_dir: Path) -> None:
    """The dense math itself (what the export traces), run eagerly."""
    block = _load(tiny_qwen3_vl_moe_dir).model.language_model.layers[LAYER].mlp
    with torch.no_grad():
        for x, want in zip(cases["inputs"], cases["expected"], strict=True):
            assert float((dense_moe_forward(block, x) - want).abs().max()) <= TOLERANCE


def test_switching_forms_and_errors(tiny_qwen3_vl_moe_dir: Path) -> None:
    model = _load(tiny_qwen3_vl_moe_dir)
    layers = model.model.language_model.layers
    experts = layers[LAYER].mlp.experts
    apply_moe_form(model, "ort_moe")
    view = getattr(experts, FC1_INTERLEAVED)  # a view of the parameter: no copy, not saved
    assert view.untyped_storage().data_ptr() == experts.gate_up_proj.untyped_storage().data_ptr()
    assert not any(FC1_INTERLEAVED in key for key in model.state_dict())
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    interleaved = view.reshape(num_experts, two_inter, hidden)
    assert torch.equal(interleaved[:, 0::2], experts.gate_up_proj[:, : two_inter // 2])  # gate rows
    assert torch.equal(interleaved[:, 1::2], experts.gate_up_proj[:, two_inter // 2 :])  # up rows
    apply_moe_form(model, "dense")
    assert not hasattr(experts, FC1_INTERLEAVED)
    assert getattr(experts, DOWN_STACKED).untyped_storage().data_ptr() == experts.down_proj.untyped_storage().data_ptr()
    assert "forward" in layers[LAYER].mlp.__dict__
    assert "forward" not in layers[0].mlp.__dict__  # the dense MLP layer is not a sparse block
    apply_moe_form(model, "batched_mm")
    assert "forward" not in layers[LAYER].mlp.__dict__
    assert not hasattr(experts, DOWN_STACKED)
    assert model.config.text_config._experts_implementation == "batched_mm"
    assert moe_form(model) == "batched_mm"
    # a bare block has no set_experts_implementation: its experts module is switched instead
    apply_moe_form(layers[2].mlp, "batched_mm")
    assert "forward" in layers[2].mlp.experts.__dict__
    with pytest.raises(ValueError, match="unknown moe form"):
        apply_moe_form(model, "grouped_mm")
    with pytest.raises(ValueError, match="no sparse MoE block"):
        apply_moe_form(layers[0].mlp, "dense")
