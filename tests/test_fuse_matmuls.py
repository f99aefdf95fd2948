"""Sibling-MatMul fusion on small hand-built graphs: same outputs (ONNX Runtime), fewer MatMuls, and groups that
must not fuse (different inputs, a weight computed at run time, a member without bias) left alone or fused
without bias."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlm_export.exporter.fuse_matmuls import fuse_sibling_matmuls

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inits, outputs, extra_inputs=()):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8]), *extra_inputs]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _count(model, op):
    return sum(1 for node in model.graph.node if node.op_type == op)


def test_qkv_with_biases_and_gate_up_without():
    nodes, inits = [], []
    for name, width in (("q", 8), ("k", 4), ("v", 4)):
        inits += [_init(f"w{name}", 8, width), _init(f"b{name}", width)]
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_mm"]),
            helper.make_node("Add", [f"{name}_mm", f"b{name}"], [name]),
        ]
    nodes.append(helper.make_node("Mul", ["q", "q"], ["q2"]))  # a consumer of a fused output
    inits += [_init("wg", 8, 16), _init("wu", 8, 16)]
    nodes.append(helper.make_node("Relu", ["x"], ["h"]))  # the MLP reads another activation
    nodes += [helper.make_node("MatMul", ["h", "wg"], ["g"]), helper.make_node("MatMul", ["h", "wu"], ["u"])]
    model = _model(nodes, inits, ["q2", "k", "v", "g", "u"])
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
    want = _run(model, feeds)
    assert fuse_sibling_matmuls(model) == 2
    assert _count(model, "MatMul") == 2 and _count(model, "Split") == 2 and _count(model, "Add") == 1
    assert {i.name for i in model.graph.initializer}.isdisjoint({"wq", "wk", "wv", "bq", "wg", "wu"})
    for a, b in zip(want, _run(model, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_groups_that_must_not_fuse():
    inits = [_init("wa", 8, 4), _init("wb", 8, 4), _init("wc", 8, 4), _init("bc", 4)]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"]),  # alone on x once the others are excluded
        helper.make_node("MatMul", ["x", "w_runtime"], ["r"]),  # weight is an input, not an initializer
        helper.make_node("MatMul", ["y", "wb"], ["b"]),  # another activation
        helper.make_node("MatMul", ["y", "wc"], ["c_mm"]),
        helper.make_node("Add", ["c_mm", "bc"], ["c"]),  # only one of y's pair has a bias: fused, bias kept apart
    ]
    extra = [
        helper.make_tensor_value_info("w_runtime", TensorProto.FLOAT, [8, 4]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8]),
    ]
    model = _model(nodes, inits, ["a", "r", "b", "c"], extra)
    feeds = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in
             (("x", (1, 2, 8)), ("w_runtime", (8, 4)), ("y", (1, 2, 8)))}  # fmt: skip
    want = _run(model, feeds)
    assert fuse_sibling_matmuls(model) == 1
    assert _count(model, "MatMul") == 3 and _count(model, "Add") == 1
    for a, b in zip(want, _run(model, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_deferred_weights_are_fused_and_written_once(tmp_path):
    """The exporter's path for multi-GB graphs: weights are recipes until written; a fused weight is the
    concatenation of its members' recipes, evaluated when written, and every weight lands in one data file that
    ONNX Runtime reads back to the unfused graph's outputs."""
    from vlm_export.exporter.deferred_weights import DeferredWeights, WeightSink

    inits = [_init("wq", 8, 8), _init("wk", 8, 4), _init("bq", 8), _init("bk", 4), _init("wo", 12, 8)]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q_mm"]),
        helper.make_node("Add", ["q_mm", "bq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k_mm"]),
        helper.make_node("Add", ["k_mm", "bk"], ["k"]),
        helper.make_node("Relu", ["q"], ["q_act"]),  # (MatMuls feeding one Concat directly stay apart on purpose)
        helper.make_node("Concat", ["q_act", "k"], ["qk"], axis=-1),
        helper.make_node("MatMul", ["qk", "wo"], ["y"]),  # a single MatMul: its weight is written as is
    ]
    model = _model(nodes, inits, ["y"])
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
    want = _run(model, feeds)
    deferred = DeferredWeights(tmp_path)
    evaluated: list[str] = []
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)

        def recipe(array=array, name=tensor.name):
            evaluated.append(name)
            return array

        model.graph.initializer[index].CopyFrom(
            deferred.placeholder(tensor.name, list(tensor.dims), tensor.data_type, recipe)
        )
    sink = WeightSink(tmp_path / "g.onnx.data")
    assert fuse_sibling_matmuls(model, load=deferred.load, store=sink.store, join=deferred.join) == 1
    assert evaluated == [], "fusing read weights before they were written"
    deferred.write_all(model.graph, sink)
    sink.close()
    assert sorted(evaluated) == ["bk", "bq", "wk", "wo", "wq"], "each weight read exactly once"
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    assert _count(onnx.load(str(path), load_external_data=False), "MatMul") == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], want[0], rtol=1e-6, atol=1e-6)


def test_matmuls_feeding_one_concat_stay_apart():
    """Vocabulary slices of an lm_head (graphs.decoder.VocabSlicedLinear) read the same activation, but were split
    on purpose: fusing them would rebuild the one huge matrix."""
    inits = [_init("w0", 8, 6), _init("w1", 8, 6)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["l0"]),
        helper.make_node("MatMul", ["x", "w1"], ["l1"]),
        helper.make_node("Concat", ["l0", "l1"], ["y"], axis=-1),
    ]
    model = _model(nodes, inits, ["y"])
    assert fuse_sibling_matmuls(model) == 0
    assert _count(model, "MatMul") == 2
