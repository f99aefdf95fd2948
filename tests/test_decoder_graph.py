"""The exported decoders attend with grouped K/V heads natively: no `repeat_kv` copy of the cache per step."""

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
        query, key, value = (shapes[name] for name in node.input[:3])
        # the tiny models have 2 query heads per K/V head: a repeat_kv copy would give key[1] == query[1]
        assert query[1] == 2 * kv_heads, (node.name, query)
        assert key[1] == kv_heads and value[1] == kv_heads, (node.name, query, key, value)
