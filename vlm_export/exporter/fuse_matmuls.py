"""Fuse sibling projections (MatMuls reading the same activation) into one wider MatMul + Split.

A transformer layer projects one normalized activation several times: query, key and value, then gate and up in
a SwiGLU MLP. Exported as written, a decode step runs 7 narrow MatMuls per layer; on a CPU each op also costs a
thread-pool dispatch, which for the 0.5B-class decoder is as much as the small K/V projections themselves. One
MatMul over the concatenated weights (plus one Add for concatenated biases) and a Split computes the same columns
in 3 ops instead of 7, and a quantizer sees a wider matrix (block-wise int4 quantizes each output column on its
own, so the quantized values do not change). TensorRT, too, runs one GEMM instead of three.

Only MatMuls whose weight is a 2-D initializer are grouped; a bias is fused only when every member has one (an
Add with a 1-D initializer as the MatMul output's only consumer). Outputs keep their names, so nothing
downstream changes. Weights are read one group at a time through `load` and handed to `store` as soon as they
are concatenated, so a multi-GB graph is rewritten without holding its weights in memory (see
`onnx_export.fuse_projections`, which streams them into a new external-data file).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)


@dataclass
class _Member:
    matmul: onnx.NodeProto
    weight: onnx.TensorProto  # [K, N] initializer, read only when its group is fused
    bias_node: onnx.NodeProto | None = None
    bias: onnx.TensorProto | None = None

    @property
    def columns(self) -> int:
        return int(self.weight.dims[1])

    @property
    def output(self) -> str:
        return self.bias_node.output[0] if self.bias_node is not None else self.matmul.output[0]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def _feed_one_concat(members: list[_Member], readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True when every member's output is read only by one and the same Concat node."""
    concats = set()
    for member in members:
        after = readers[member.output]
        if len(after) != 1 or after[0].op_type != "Concat":
            return False
        concats.add(id(after[0]))
    return len(concats) == 1


Load = Callable[[onnx.TensorProto], np.ndarray]
Store = Callable[[np.ndarray, str], onnx.TensorProto]
#: (initializers, axis, name) -> the initializer holding their concatenation (possibly computed later).
Join = Callable[[list[onnx.TensorProto], int, str], onnx.TensorProto]


def fuse_sibling_matmuls(
    model: onnx.ModelProto,
    load: Load = numpy_helper.to_array,
    store: Store = numpy_helper.from_array,
    join: Join | None = None,
) -> int:
    """Rewrite `model` in place; returns the number of MatMul groups fused. `load` reads an initializer's values
    (default: weights already in the proto), `store` turns a new array into an initializer; `join`, when given,
    makes the concatenated weights instead (the exporter's defers reading them until they are written)."""
    if join is None:

        def join(tensors: list[onnx.TensorProto], axis: int, name: str) -> onnx.TensorProto:
            return store(np.concatenate([load(t) for t in tensors], axis=axis), name)

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    groups: dict[str, list[_Member]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in initializers:
            continue
        weight_init = initializers[node.input[1]]
        if len(weight_init.dims) != 2 or len(readers[node.input[1]]) != 1:
            continue
        member = _Member(node, weight_init)
        after = readers[node.output[0]]
        if len(after) == 1 and after[0].op_type == "Add" and node.output[0] not in outputs:
            add = after[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if other in initializers and list(initializers[other].dims) == [member.columns]:
                member.bias_node, member.bias = add, initializers[other]
        groups[node.input[0]].append(member)

    fused, removed, replacement = 0, set(), {}
    dropped_inits: set[str] = set()
    for source, members in groups.items():
        if len(members) < 2 or len({m.weight.data_type for m in members}) != 1:
            continue
        if len({m.weight.dims[0] for m in members}) != 1:
            continue
        if _feed_one_concat(members, readers):  # split on purpose (graphs.decoder.VocabSlicedLinear)
            continue
        with_bias = all(m.bias is not None for m in members)
        prefix = f"{members[0].matmul.name or members[0].matmul.output[0]}_fused{fused}"
        weight = join([m.weight for m in members], 1, prefix + ".weight")
        new_inits = [weight]
        nodes = [helper.make_node("MatMul", [source, weight.name], [prefix + ".out"], name=prefix)]
        split_input = prefix + ".out"
        if with_bias:
            new_inits.append(join([m.bias for m in members if m.bias is not None], 0, prefix + ".bias"))
            nodes.append(
                helper.make_node("Add", [split_input, prefix + ".bias"], [prefix + ".biased"], name=prefix + "_add")
            )
            split_input = prefix + ".biased"
        sizes = numpy_helper.from_array(np.array([m.columns for m in members], np.int64), prefix + ".sizes")
        new_inits.append(sizes)
        member_outputs = [m.output if with_bias else m.matmul.output[0] for m in members]
        nodes.append(
            helper.make_node("Split", [split_input, sizes.name], member_outputs, axis=-1, name=prefix + "_split")
        )
        graph.initializer.extend(new_inits)
        for m in members:
            removed.add(id(m.matmul))
            dropped_inits.add(m.matmul.input[1])
            if with_bias and m.bias_node is not None:
                removed.add(id(m.bias_node))
                dropped_inits.add(next(n for n in m.bias_node.input if n != m.matmul.output[0]))
        replacement[id(members[0].matmul)] = nodes
        fused += 1
    if not fused:
        return 0
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replacement.get(id(node), []))
        if id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name not in dropped_inits or init.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return fused
