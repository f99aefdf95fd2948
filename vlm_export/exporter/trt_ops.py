"""Which ONNX ops the exported graphs use, against what TensorRT's ONNX parser imports, per TensorRT version.

Source: onnx-tensorrt `docs/operators.md` (10.15: opset 9-24) and `docs/Changelog.md`: `Attention` since 10.14,
`RMSNormalization`, `RotaryEmbedding`, `TensorScatter` since 10.15; every other op our exporter emits has been
importable since TensorRT 10.0 (JetPack 6 ships 10.3). Restrictions from the same table that a graph can break
are checked per node (`check_graph`). Ops a TensorRT version lacks are rewritten into primitive ONNX ops with
ONNX's own function definitions (`decompose`) — same math, checked against ONNX Runtime in the tests.
`TensorScatter` has no function body; it becomes a `ScatterElements` along the sequence axis.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

logger = logging.getLogger(__name__)

# op -> first TensorRT release whose ONNX parser imports it (ops absent here and not in UNSUPPORTED: 10.0).
MIN_TRT_VERSION = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4),
    "HammingWindow": (10, 4),
    "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RMSNormalization": (10, 15),
    "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15),
}
# ops the parser does not import in any 10.x release (operators.md "N"), plus every non-default domain.
UNSUPPORTED = {
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
    "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique",
}  # fmt: skip
# ops `decompose` can rewrite from their ONNX function definition
DECOMPOSABLE = ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter")
MAX_OPSET = {(10, 0): 20, (10, 15): 24}  # documented opset range upper bound from this release on
# 10.15's operators.md: Attention "Q, K, V and attn_mask must be 4D"; its importer reshapes 3-D inputs by
# q_num_heads, 10.14's is not known to: graphs with heads-packed Attention are rewritten below 10.15.
PACKED_ATTENTION = (10, 15)
# What each non-default-domain op is and the export option that avoids it.
CONTRIB_HINTS = {"MoE": "re-export with --moe-form dense (plain ONNX ops TensorRT imports)"}


def documented_opset(trt_version: tuple[int, int]) -> int:
    """The highest ONNX opset TensorRT `trt_version`'s operators.md documents. Newer opsets still import (the parser
    warns only below opset 7; importers branch on `getOpsetVersion() >= N`): our graphs are 23/24 on 10.x."""
    return max(opset for since, opset in MAX_OPSET.items() if since <= trt_version)


def parse_version(version: str) -> tuple[int, int]:
    parts = str(version).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def op_support(op: str, domain: str, trt_version: tuple[int, int]) -> tuple[bool, str]:
    """(importable, why not) for one op on one TensorRT version."""
    if domain not in ("", "ai.onnx"):
        hint = CONTRIB_HINTS.get(op, "export without contrib ops")
        return False, f"{domain}.{op} is an ONNX Runtime contrib op TensorRT cannot import: {hint}"
    if op in UNSUPPORTED:
        return False, f"{op} is not supported by TensorRT's ONNX parser"
    needed = MIN_TRT_VERSION.get(op, (10, 0))
    if trt_version < needed:
        return False, f"{op} needs TensorRT {needed[0]}.{needed[1]}+"
    return True, ""


@dataclass
class GraphReport:
    """Ops of one graph and what stops TensorRT `version` from importing it."""

    ops: Counter = field(default_factory=Counter)  # (domain, op) -> count
    opset: int = 0
    unsupported: dict[str, str] = field(default_factory=dict)  # op -> reason
    restrictions: list[str] = field(default_factory=list)  # broken per-node restrictions

    @property
    def decomposable(self) -> list[str]:
        return [op for op in self.unsupported if op in DECOMPOSABLE]

    @property
    def blocking(self) -> dict[str, str]:
        return {op: why for op, why in self.unsupported.items() if op not in DECOMPOSABLE}


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return names


def _restrictions(model: onnx.ModelProto) -> list[str]:
    """Per-node restrictions of onnx-tensorrt's operators.md that our graphs could plausibly break."""
    constants = _constants(model)
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        where = f"{node.op_type} node {node.name or node.output[0]}"
        if node.op_type == "Attention":
            if any(name for name in node.input[4:]):
                problems.append(f"{where}: past_key/past_value/nonpad_kv_seqlen inputs are unsupported")
            if any(name for name in node.output[1:]):
                problems.append(f"{where}: present_key/present_value/qk_matmul_output outputs are unsupported")
            if attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0):
                problems.append(f"{where}: softcap/qk_matmul_output_mode are unsupported")
        elif node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                problems.append(f"{where}: axes must be an initializer")
        elif node.op_type == "CumSum" and node.input[1] not in constants:
            problems.append(f"{where}: axis must be a build-time constant")
        elif node.op_type == "TopK" and not attrs.get("sorted", 1):
            problems.append(f"{where}: sorted must be 1")
        elif node.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            problems.append(f"{where}: reduction is unsupported")
        elif node.op_type == "LayerNormalization" and any(name for name in node.output[1:]):
            problems.append(f"{where}: only the first output is supported")
    return problems


def check_graph(path: Path | str, trt_version: str | tuple[int, int]) -> GraphReport:
    """Ops of an ONNX file (weights not loaded) checked against TensorRT `trt_version`'s parser."""
    version = parse_version(trt_version) if isinstance(trt_version, str) else trt_version
    model = onnx.load(str(path), load_external_data=False)
    report = GraphReport()
    report.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for node in model.graph.node:
        report.ops[(node.domain or "", node.op_type)] += 1
        ok, why = op_support(node.op_type, node.domain, version)
        if not ok:
            report.unsupported[node.op_type] = why
    if version < PACKED_ATTENTION and "Attention" not in report.unsupported and _packed_attention(model):
        report.unsupported["Attention"] = (
            "Attention on heads-packed 3-D inputs needs TensorRT 10.15+ (10.14's importer takes 4-D inputs only)"
        )
    report.restrictions = _restrictions(model)
    return report


def _packed_attention(model: onnx.ModelProto) -> bool:
    """Whether an Attention node takes 3-D [batch, length, heads * head_dim] inputs (the Qwen vision graphs)."""
    attention = [node for node in model.graph.node if node.op_type == "Attention" and node.domain in ("", "ai.onnx")]
    if not attention:
        return False
    types = _value_types(model)
    return any(node.input[0] in types and len(types[node.input[0]].tensor_type.shape.dim) == 3 for node in attention)


# -- decomposition --------------------------------------------------------------------------------------
def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for init in model.graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def _expand(node: onnx.NodeProto, types: dict[str, onnx.TypeProto], opset: int, index: int) -> list[onnx.NodeProto]:
    """`node` as the nodes of its ONNX function body, with body-internal names made unique."""
    schema = onnx.defs.get_schema(node.op_type, opset)
    arg_types = [
        types[name].SerializeToString() if name else onnx.TypeProto().SerializeToString() for name in node.input
    ]
    body = onnx.FunctionProto()
    body.ParseFromString(schema.get_context_dependent_function(node.SerializeToString(), arg_types))
    rename = dict(zip(body.input, node.input, strict=False))
    rename.update(zip(body.output, node.output, strict=False))
    prefix = f"_trt{index}_{node.op_type}_"
    nodes = []
    for inner in body.node:
        new = onnx.NodeProto()
        new.CopyFrom(inner)
        new.name = prefix + (inner.name or inner.output[0])
        for field_name in ("input", "output"):
            values = getattr(new, field_name)
            for i, name in enumerate(values):
                if name:
                    values[i] = rename.get(name, prefix + name)
        nodes.append(new)
    return nodes


def _tensor_scatter(
    node: onnx.NodeProto, types: dict[str, onnx.TypeProto], index: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """TensorScatter (linear mode) on a [batch, heads, capacity, head_dim] cache as ScatterElements: row b's
    update lands at positions write_indices[b] + 0..S-1 of the sequence axis; without write_indices, at 0..S-1."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"linear")
    rank = len(types[node.input[0]].tensor_type.shape.dim) if node.input[0] in types else 4
    axis = int(attrs.get("axis", -2)) % rank
    if mode not in (b"linear", "linear") or rank != 4 or axis in (0, 3):
        raise ValueError(f"TensorScatter node {node.name}: only linear updates of a rank-4 cache can be rewritten")
    cache, update = node.input[0], node.input[1]
    writes = node.input[2] if len(node.input) > 2 and node.input[2] else None
    p = f"_trt{index}_TensorScatter_"
    consts = {
        "axis": np.array([axis], np.int64),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "row_shape": np.array([-1, 1, 1, 1], np.int64),
        "step_shape": np.array([-1 if dim == axis else 1 for dim in range(rank)], np.int64),
    }
    inits = [numpy_helper.from_array(value, p + name) for name, value in consts.items()]
    nodes = [
        helper.make_node("Shape", [update], [p + "shape"]),
        helper.make_node("Gather", [p + "shape", p + "axis"], [p + "length1"], axis=0),
        helper.make_node("Squeeze", [p + "length1"], [p + "length"]),
        helper.make_node("Range", [p + "zero", p + "length", p + "one"], [p + "steps"]),
        helper.make_node("Reshape", [p + "steps", p + "step_shape"], [p + "positions"]),
    ]
    positions = p + "positions"
    if writes:
        nodes.append(helper.make_node("Reshape", [writes, p + "row_shape"], [p + "starts"]))
        nodes.append(helper.make_node("Add", [p + "starts", positions], [p + "shifted"]))
        positions = p + "shifted"
    nodes.append(helper.make_node("Expand", [positions, p + "shape"], [p + "indices"]))
    nodes.append(helper.make_node("ScatterElements", [cache, p + "indices", update], [node.output[0]], axis=axis))
    for new in nodes:
        new.name = p + new.output[0].removeprefix(p)
    return nodes, inits


#: Rewrites for ops without an ONNX function body; every other DECOMPOSABLE op expands its function body.
HAND_WRITTEN = {"TensorScatter": _tensor_scatter}


def _fold_shape_constants(model: onnx.ModelProto) -> None:
    """Fold Size/Shape of statically shaped tensors and integer arithmetic on constants into initializers, so
    reduction axes computed in a function body (RMSNormalization's Range over the rank) become initializers."""
    foldable = {"Add", "Sub", "Mul", "Div", "Range", "Concat", "Cast", "Identity", "Unsqueeze", "Squeeze", "Size",
                "Shape", "Constant", "Slice", "Reshape", "Equal", "Not", "Neg"}  # fmt: skip
    from onnx.reference import ReferenceEvaluator

    for _ in range(8):
        types = _value_types(model)
        values = {
            init.name: numpy_helper.to_array(init)
            for init in model.graph.initializer
            if init.data_location != onnx.TensorProto.EXTERNAL and np.prod(init.dims) <= 64
        }
        keep, changed = [], False
        for node in model.graph.node:
            result = None
            if node.op_type in ("Shape", "Size") and node.input[0] in types:
                dims = types[node.input[0]].tensor_type.shape.dim
                static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Shape":
                    static = static[attrs.get("start", 0) : attrs.get("end", len(static))]
                if types[node.input[0]].tensor_type.HasField("shape") and None not in static:
                    shape = np.array(static, dtype=np.int64)
                    result = [shape if node.op_type == "Shape" else np.array(np.prod(shape), dtype=np.int64)]
            elif node.op_type in foldable and all(not name or name in values for name in node.input):
                graph = helper.make_graph(
                    [node],
                    "fold",
                    [],
                    [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                    [numpy_helper.from_array(values[n], n) for n in node.input if n],
                )
                evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import))
                result = evaluator.run(None, {})
            if result is None or any(np.asarray(r).dtype.kind not in "iub" for r in result):
                keep.append(node)
                continue
            for name, value in zip(node.output, result, strict=True):
                model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
                values[name] = np.asarray(value)
            changed = True
        del model.graph.node[:]
        model.graph.node.extend(keep)
        if not changed:
            return


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads (folding leaves the function bodies' scalar constants)."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(list(model.graph.node)):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    initializers = [init for init in model.graph.initializer if init.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)


def _decompose_model(model: onnx.ModelProto, ops: list[str]) -> list[str]:
    """Replace every node of `ops` in `model` by its ONNX function body (or hand-written rewrite); returns the
    ops rewritten."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = _value_types(model)
    nodes, done = [], set()
    for index, node in enumerate(model.graph.node):
        if node.op_type in ops and node.domain in ("", "ai.onnx"):
            rewrite = HAND_WRITTEN.get(node.op_type)
            if rewrite is None:
                nodes.extend(_expand(node, types, opset, index))
            else:
                new_nodes, initializers = rewrite(node, types, index)
                nodes.extend(new_nodes)
                model.graph.initializer.extend(initializers)
            done.add(node.op_type)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _fold_shape_constants(model)
    _prune(model)
    return sorted(done)


def decompose(source: Path, target: Path, ops: list[str]) -> list[str]:
    """Write `source` to `target` with every node of `ops` replaced by its ONNX function body; returns the ops
    rewritten. Weights stay where they are: `target` must sit in the same folder and refers to the same external
    data file."""
    model = onnx.load(str(source), load_external_data=False)
    done = _decompose_model(model, ops)
    onnx.save(model, str(target))
    return done


# -- the TensorRT copy of a graph ---------------------------------------------------------------------------
#: The KV cache's sequence axis (decoder inputs past_key_values.*, outputs present.*).
CACHE_AXIS = "cache_capacity"
#: Attribute onnx-tensorrt's Attention importer reads into IAttention::setDecomposable (default 0: one fused
#: kernel or a failed build). TensorRT-private: ONNX Runtime refuses a node that carries it.
TRT_DECOMPOSABLE = "TRT_decomposable"


def pin_axis(model: onnx.ModelProto, axis: str, size: int) -> int:
    """Give the symbolic dimension `axis` the fixed size `size` on every graph input, output and value_info;
    returns how many dimensions were pinned."""
    pinned = 0
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param == axis:
                dim.dim_value = size  # clears dim_param (a oneof)
                pinned += 1
    return pinned


def mark_attention_decomposable(model: onnx.ModelProto) -> int:
    """Set TRT_decomposable=1 on every ONNX Attention node, so TensorRT may split IAttention into several kernels
    where no fused kernel fits (float32, small head sizes, masks it has no fused kernel for) instead of failing
    the build; returns how many nodes were marked."""
    marked = 0
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            kept = [a for a in node.attribute if a.name != TRT_DECOMPOSABLE]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute(TRT_DECOMPOSABLE, 1)])
            marked += 1
    return marked


@dataclass
class TensorRTCopy:
    """What `tensorrt_copy` changed: ops rewritten, the cache capacity pinned (None: left symbolic), Attention
    nodes marked decomposable."""

    rewritten: list[str] = field(default_factory=list)
    cache_capacity: int | None = None
    decomposable_attention: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.rewritten or self.cache_capacity or self.decomposable_attention)


def tensorrt_copy(source: Path, target: Path, rewrite: list[str], cache_capacity: int | None) -> TensorRTCopy:
    """Write the graph TensorRT builds from: `rewrite` ops decomposed, the cache axis fixed at `cache_capacity`
    (IKVCacheUpdateLayer, i.e. a TensorScatter TensorRT imports, needs a static capacity: a symbolic ONNX dimension
    stays -1 in the network whatever the profile), Attention nodes marked decomposable. Nothing is written when
    nothing changes (`changed` is False). `target` sits next to `source` and shares its external weights."""
    model = onnx.load(str(source), load_external_data=False)
    report = TensorRTCopy(rewritten=_decompose_model(model, rewrite) if rewrite else [])
    if cache_capacity is not None and pin_axis(model, CACHE_AXIS, cache_capacity):
        report.cache_capacity = cache_capacity
    report.decomposable_attention = mark_attention_decomposable(model)
    if report.changed:
        onnx.save(model, str(target))
    return report
