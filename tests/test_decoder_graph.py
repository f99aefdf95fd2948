"""The exported decoders attend with grouped K/V heads natively: no `repeat_kv` copy of the cache per step, and
each group's query heads stacked as rows of one attention over their K/V head."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_reads_the_cache_with_kv_heads(family: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(f"exported_{family}")
    text = json.loads((folder / "manifest.json").read_text())["text"]
    kv_heads = int(text["num_kv_heads"])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "decoder.onnx")))
    shapes = {
        value.name: [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    attention = [node for node in model.graph.node if node.op_type == "Attention"]
    assert len(attention) == int(text["num_layers"])
    for node in attention:
        query, key, value, mask = (shapes[name] for name in node.input[:4])
        # the tiny models have 2 query heads per K/V head: a repeat_kv copy would give key[1] == 2 * kv_heads,
        # and attention per query head would give query [batch, 2 * kv_heads, sequence, head_dim]
        assert key[1] == kv_heads and value[1] == kv_heads, (node.name, query, key, value)
        assert query[1] == kv_heads and query[2] == "2*sequence", (node.name, query)
        assert mask[1:3] == [1, "2*sequence"], (node.name, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_written_in_place_not_concatenated(family: str, request: pytest.FixtureRequest) -> None:
    """Each layer writes K and V with one TensorScatter into the fixed-capacity cache, which Attention reads
    directly: no Concat grows the cache, and present has the past's capacity."""
    folder: Path = request.getfixturevalue(f"exported_{family}")
    text = json.loads((folder / "manifest.json").read_text())["text"]
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    assert next(o.version for o in model.opset_import if o.domain == "") == 24
    assert not [o.domain for o in model.opset_import if o.domain.startswith("vlm_export")]
    scatters = [node for node in model.graph.node if node.op_type == "TensorScatter"]
    assert len(scatters) == 2 * int(text["num_layers"])
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    present = {o.name for o in model.graph.output if o.name.startswith("present.")}
    assert {node.input[0] for node in scatters} == past and {node.output[0] for node in scatters} == present
    attention_kv = {name for node in model.graph.node if node.op_type == "Attention" for name in node.input[1:3]}
    assert attention_kv == present
    capacity = {
        v.name: v.type.tensor_type.shape.dim[2].dim_param
        for v in [*model.graph.input, *model.graph.output]
        if v.name in past | present
    }
    assert {capacity[name] for name in past | present} == {"cache_capacity"}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_sibling_projections_are_one_matmul(family: str, request: pytest.FixtureRequest) -> None:
    """q/k/v and gate/up read the same activation: each group is one MatMul + Split (4 MatMuls per dense layer:
    qkv, o, gate-up, down) plus the lm_head."""
    folder: Path = request.getfixturevalue(f"exported_{family}")
    text = json.loads((folder / "manifest.json").read_text())["text"]
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == 4 * int(text["num_layers"]) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_is_one_op_per_tensor(family: str, request: pytest.FixtureRequest) -> None:
    """Queries and keys are rotated by ONNX RotaryEmbedding (MRoPE included), not the six-op rotate-half chain."""
    folder: Path = request.getfixturevalue(f"exported_{family}")
    text = json.loads((folder / "manifest.json").read_text())["text"]
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * int(text["num_layers"])
    assert "Neg" not in ops


def test_large_lm_head_is_exported_in_vocabulary_slices(tmp_path: Path, monkeypatch, tiny_qwen2_5_vl_dir) -> None:
    """An lm_head above LM_HEAD_SLICE_BYTES becomes MatMuls over vocabulary slices + one Concat (ONNX Runtime's
    load-time pre-pack then never doubles one huge matrix), projection fusion leaves them apart, and the graph
    still matches transformers."""
    import torch

    import vlm_export.graphs.decoder as decoder
    from vlm_export.exporter.onnx_export import export_graph
    from vlm_export.exporter.verify import verify_graph
    from vlm_export.graphs.registry import graph_family_for

    family = graph_family_for("qwen2_5_vl")
    model = family.load_model(tiny_qwen2_5_vl_dir, torch.float32)
    lm_head_bytes = model.lm_head.weight.numel() * 4  # 151,936 x 64 float32
    monkeypatch.setattr(decoder, "LM_HEAD_SLICE_BYTES", lm_head_bytes // 3 + 1)  # three slices, the last shorter
    spec = next(s for s in family.graph_specs(model, torch.float32) if s.name == "decoder")
    info = export_graph(spec, tmp_path)
    graph = onnx.load(str(tmp_path / info.file), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    concat = producers[producers["logits"].input[0]] if producers["logits"].op_type != "Concat" else producers["logits"]
    assert concat.op_type == "Concat"
    sources = [producers[name] for name in concat.input]
    assert [node.op_type for node in sources] == ["MatMul"] * 3
    sizes = {init.name: list(init.dims) for init in graph.initializer}
    assert sum(sizes[node.input[1]][1] for node in sources) == model.lm_head.weight.shape[0]
    assert verify_graph(spec, tmp_path / info.file) < 1e-4


def test_left_pad_rows_attend_to_themselves_only() -> None:
    """No query row of the decoder's mask is fully masked (GPU kernels give NaN there), and real rows are exactly
    the causal padding mask: pad keys stay masked for every real query."""
    torch = pytest.importorskip("torch")
    from vlm_export.graphs.decoder import additive_causal_mask

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = additive_causal_mask(padding, query_len=3, capacity=7, dtype=torch.float32)[:, 0]
    allowed = mask == 0
    assert allowed.any(-1).all()
    assert allowed[0, 0].tolist() == [False, False, True, False, False, False, False]  # pads 0, 1 masked
    assert allowed[0, 1].tolist() == [False, False, True, True, False, False, False]
    assert allowed[1, 2].tolist() == [True] * 5 + [False] * 2
    prefill = additive_causal_mask(padding, query_len=5, capacity=5, dtype=torch.float32)[0, 0] == 0
    assert prefill[0].tolist() == [True, False, False, False, False]  # a pad query: itself only
    assert prefill[1].tolist() == [False, True, False, False, False]
    assert not prefill[2:, :2].any()  # real queries never see the pads
