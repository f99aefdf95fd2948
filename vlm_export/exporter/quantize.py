"""Weight-only block-wise int4 / int8 quantization of exported graphs with ONNX Runtime's own quantizer.

Decode on a CPU is bound by the bytes of weights read per token, so storing the decoder's matrices in 4 or 8
bits (ONNX Runtime's ``com.microsoft.MatMulNBits``, one fp32 scale and zero point per block of ``block_size``
input channels) cuts the bytes ~6x / ~3.5x. ``accuracy_level`` 4 lets MLAS quantize the activations to int8
per block and run int8 dot products (VNNI), the fast CPU path; lower levels dequantize to fp32 first.
The embedding table (a Gather) becomes ``GatherBlockQuantized`` for int4 (the quantizer has no 8-bit Gather).
The vision encoder is different: it is compute-bound (each weight serves hundreds of patches), so weight-only
formats only add dequantization work (int4/int8 MatMulNBits made the 0.5B-class Qwen2.5-VL ViT 10-21% slower).
It gets int8 weights AND int8 activations instead (ONNX Runtime's dynamic quantization: DynamicQuantizeLinear +
MatMulInteger), whatever the scheme: 4.99 -> 1.76 s per 448x448 image there (2 threads), output relative L2 error
3.8%, min cosine 0.9991. Its linear layers are exported as ``Gemm``; they are rewritten as MatMul + Add first so
the quantizers (MatMul only) can take them.

Quantized graphs are not exact, so they are not verified against transformers; `agreement.top1_agreement`
measures teacher-forced top-1 agreement with the fp32 export instead.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from vlm_export.errors import ExportError

logger = logging.getLogger(__name__)

#: --quantize value -> bits per weight.
SCHEMES = {"int4": 4, "int8": 8}
#: llama.cpp q4_0's and onnxruntime-genai's block. 128 decodes ~15% and pre-fills ~35% faster, but round-to-nearest at
#: 128 (no calibration, unlike GPTQ/AWQ) moved top-5 agreement with float32 from 0.99 to 0.36 on a text prompt (README).
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
#: Graphs quantized when none are named (README, "Quantized weights (CPU)": the vision encoder is compute-bound and
#: gains little; its weights are read once per image, not once per token).
DEFAULT_GRAPHS = ("decoder", "embedding")
QUANTIZABLE_GRAPHS = ("vision_encoder", "embedding", "decoder")
#: Graphs quantized with int8 weights and activations (dynamic quantization) rather than weight-only: see above.
DYNAMIC_INT8_GRAPHS = ("vision_encoder",)
#: Smallest weight (elements) worth a quantized kernel: tiny projections stay fp32.
MIN_WEIGHT_ELEMENTS = 1024
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

Load = Callable[[onnx.TensorProto], np.ndarray]
Store = Callable[[np.ndarray, str], onnx.TensorProto]


@dataclass
class QuantizeConfig:
    """What `--quantize` asked for; recorded in the manifest's ``quantization`` field."""

    scheme: str
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    graphs: tuple[str, ...] = DEFAULT_GRAPHS
    symmetric: bool = False

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExportError(f"--quantize {self.scheme} is not supported; choose none, {', '.join(SCHEMES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(
                f"--quant-block-size must be a power of two >= 16 (ONNX Runtime's MatMulNBits), got {self.block_size}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(
                f"--quant-accuracy-level must be 0-4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute), "
                f"got {self.accuracy_level}"
            )
        unknown = [g for g in self.graphs if g not in QUANTIZABLE_GRAPHS]
        if unknown or not self.graphs:
            raise ExportError(
                f"--quant-graphs takes a comma-separated subset of {', '.join(QUANTIZABLE_GRAPHS)}, got "
                f"{','.join(self.graphs) or 'nothing'}"
            )


@dataclass
class GraphQuantization:
    """What happened to one graph: nodes rewritten and bytes of initializers before/after."""

    matmuls: int = 0
    gathers: int = 0
    matmul_integer: int = 0  # int8-activation MatMuls (dynamic quantization)
    bytes_before: int = 0
    bytes_after: int = 0
    kept_float: list[str] = field(default_factory=list)  # weight-bearing nodes left as they were, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_record(config: QuantizeConfig, per_graph: dict[str, GraphQuantization]) -> dict[str, Any]:
    """The manifest's ``quantization`` section (empty dict = not quantized)."""
    import onnxruntime

    return {
        "scheme": config.scheme,
        "method": "weight-only, block-wise, round-to-nearest (onnxruntime MatMulNBitsQuantizer)",
        "bits": config.bits,
        "block_size": config.block_size,
        "accuracy_level": config.accuracy_level,
        "symmetric": config.symmetric,
        "quantizer": f"onnxruntime {onnxruntime.__version__}",
        "graphs": {
            name: {
                "matmul_nbits": q.matmuls,
                "gather_block_quantized": q.gathers,
                "matmul_integer": q.matmul_integer,
                "activations": "int8 (dynamic, per tensor)" if q.matmul_integer else "float",
                "bytes": q.bytes_after,
            }
            for name, q in per_graph.items()
        },
    }


def _initializer_bytes(graph: onnx.GraphProto) -> int:
    total = 0
    for tensor in graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += numpy_helper.to_array(tensor).nbytes
    return total


def _gemm_to_matmul(graph: onnx.GraphProto, load: Load, store: Store) -> int:
    """Rewrite ``Gemm(A, W, b, transB=1)`` with constant W [N, K] as ``MatMul(A, W^T) + b`` (returns how many).

    The quantizer only takes MatMul with a constant [K, N] weight; torch exports 2-D ``nn.Linear`` as Gemm. Each
    transposed weight is read with `load` and handed to `store` at once.
    """
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    dropped: set[str] = set()
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if weight is None or not plain or weight.data_type not in _FLOAT_TYPES:
            nodes.append(node)
            continue
        array = load(weight)
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(array.T)
        name = node.name or f"gemm_{rewritten}"
        graph.initializer.append(store(array, f"{weight.name}_kn"))
        del array
        if uses[weight.name] == 1:
            dropped.add(weight.name)
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], f"{weight.name}_kn"], [product], name=name))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}_bias"))
        rewritten += 1
    if rewritten:
        graph.ClearField("node")
        graph.node.extend(nodes)
        kept = [t for t in graph.initializer if t.name not in dropped]
        graph.ClearField("initializer")
        graph.initializer.extend(kept)
    return rewritten


def _targets(graph: onnx.GraphProto, bits: int) -> tuple[list[str], list[str], list[str]]:
    """Names of the MatMul and Gather nodes to quantize, and the weight-bearing nodes left float (with why)."""
    shapes = {t.name: (list(t.dims), t.data_type) for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    matmuls, gathers, kept = [], [], []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in shapes:
            dims, dtype = shapes[node.input[1]]
            if dtype in _FLOAT_TYPES and len(dims) >= 2 and all(d == 1 for d in dims[:-2]):
                if uses[node.input[1]] > 1:  # the quantizer would write one packed copy per use, same name
                    kept.append(f"{node.name} (weight shared with another node)")
                elif int(np.prod(dims)) >= MIN_WEIGHT_ELEMENTS:
                    matmuls.append(node.name)
                else:
                    kept.append(f"{node.name} (small)")
        elif node.op_type == "Gather" and node.input[0] in shapes:
            dims, dtype = shapes[node.input[0]]
            if dtype in _FLOAT_TYPES and len(dims) == 2 and int(np.prod(dims)) >= MIN_WEIGHT_ELEMENTS:
                if bits == 4:
                    gathers.append(node.name)
                else:
                    kept.append(f"{node.name} (no {bits}-bit GatherBlockQuantized in the quantizer)")
    return matmuls, gathers, kept


def _name_nodes(graph: onnx.GraphProto) -> None:
    """The quantizer selects nodes by name; give unnamed ones a unique name."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's values, from its dims (nothing is read)."""
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (int(np.prod(tensor.dims)) + 1) // 2
    return int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _node_quantizer(config: QuantizeConfig, op_types: tuple[str, ...]):
    """onnxruntime's own per-node weight-only quantizer (what MatMulNBitsQuantizer runs on every node)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    # The quantizer's module calls logging.basicConfig(level=INFO) on import: undo that for a library caller, and
    # keep its per-node INFO lines out of the export's log.
    root.handlers[:], root.level = handlers, level
    logging.getLogger("onnxruntime.quantization").setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    return DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level or None,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=op_types,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=config.bits,
        )
    )


def quantize_weights(model: onnx.ModelProto, load: Load, store: Store, config: QuantizeConfig) -> GraphQuantization:
    """Weight-only quantization of `model` in place, one weight at a time.

    Each selected MatMul / Gather weight is read with `load`, quantized by onnxruntime's own node quantizer (the one
    `MatMulNBitsQuantizer` runs on every node, so the result is what it gives on the whole float graph), and the
    packed weights, scales and zero points are handed to `store` at once: memory holds one weight, whether the
    float weights come from a graph file or are still being read from the checkpoint (`deferred_weights`)."""
    graph = model.graph
    _name_nodes(graph)
    result = GraphQuantization(bytes_before=sum(_tensor_bytes(t) for t in graph.initializer))
    _gemm_to_matmul(graph, load, store)
    matmuls, gathers, kept = _targets(graph, config.bits)
    result.kept_float = kept
    if not matmuls and not gathers:
        result.bytes_after = result.bytes_before
        return result
    op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
    quantizer = _node_quantizer(config, op_types)
    initializers = {t.name: t for t in graph.initializer}
    selected = set(matmuls) | set(gathers)
    nodes: list[onnx.NodeProto] = []
    quantized_weights: set[str] = set()
    for node in graph.node:
        if node.name not in selected:
            nodes.append(node)
            continue
        weight = initializers[node.input[1] if node.op_type == "MatMul" else node.input[0]]
        if node.op_type == "Gather":  # an embedding table can pass protobuf's 2 GB: no TensorProto of it
            replacement, made_tensors = _quantize_gather(node, load(weight), weight.name, config, quantizer)
        else:
            scratch = onnx.GraphProto()  # the quantizer reads the weight from, and adds its outputs to, this graph
            scratch.initializer.append(numpy_helper.from_array(np.ascontiguousarray(load(weight)), weight.name))
            replacement = quantizer.quantize(node, [scratch])
            made_tensors = list(scratch.initializer[1:])
            del scratch
        for made in made_tensors:
            packed = made.data_type in _PACKED
            graph.initializer.append(
                _store_packed(made, store) if packed else store(numpy_helper.to_array(made), made.name)
            )
        nodes.extend(replacement)
        quantized_weights.add(weight.name)
    graph.ClearField("node")
    graph.node.extend(nodes)
    still_read = {name for node in graph.node for name in node.input}
    kept_inits = [t for t in graph.initializer if t.name not in quantized_weights or t.name in still_read]
    graph.ClearField("initializer")
    graph.initializer.extend(kept_inits)
    _set_opset(model, "com.microsoft", 1)
    if gathers:  # int4 tensors need opset 21 and IR version 10 (as MatMulNBitsQuantizer.process sets them)
        _set_opset(model, "", 21, at_least=True)
        model.ir_version = max(model.ir_version, 10)
    counts = {op: sum(1 for n in graph.node if n.op_type == op) for op in ("MatMulNBits", "GatherBlockQuantized")}
    result.matmuls, result.gathers = counts["MatMulNBits"], counts["GatherBlockQuantized"]
    if result.matmuls != len(matmuls) or result.gathers != len(gathers):
        raise ExportError(
            f"quantizing {graph.name or 'a graph'}: expected {len(matmuls)} MatMulNBits and {len(gathers)} "
            f"GatherBlockQuantized nodes, got {result.matmuls} and {result.gathers}; please report this model and "
            "your onnxruntime version"
        )
    result.bytes_after = sum(_tensor_bytes(t) for t in graph.initializer)
    return result


def _quantize_gather(
    node: onnx.NodeProto, data: np.ndarray, name: str, config: QuantizeConfig, quantizer: Any
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`DefaultWeightOnlyQuantizer.quantize_gather` on an array instead of a TensorProto (same quantization call,
    same names and attributes: a test holds the result equal to MatMulNBitsQuantizer's)."""
    rank = data.ndim
    quantize_axis = (1 + rank) % rank  # quant_axes: ("Gather", 1)
    quantized, scales, zero_points = quantizer.quantize_ndarray(
        data, quantize_axis, config.block_size, config.symmetric
    )
    qtype = onnx.TensorProto.INT4 if config.symmetric else onnx.TensorProto.UINT4
    tensors = [
        onnx.helper.make_tensor(f"{name}_Q4", qtype, data.shape, quantized.tobytes(), True),
        numpy_helper.from_array(scales, f"{name}_scales"),
    ]
    inputs = [tensors[0].name, node.input[1], tensors[1].name]
    if not config.symmetric:
        tensors.append(onnx.helper.make_tensor(f"{name}_zero_points", qtype, scales.shape, zero_points.tobytes(), True))
        inputs.append(tensors[2].name)
    try:
        gather_axis = onnx.helper.get_node_attr_value(node, "axis")
    except ValueError:
        gather_axis = 0
    gathered = onnx.helper.make_node(
        "GatherBlockQuantized",
        inputs=inputs,
        outputs=[node.output[0]],
        name=node.name + "_Q4" if node.name else "",
        domain="com.microsoft",
        gather_axis=gather_axis,
        quantize_axis=quantize_axis,
        block_size=config.block_size,
    )
    return [gathered], tensors


#: Element types numpy cannot hold unpacked (the quantizer writes them as raw packed bytes).
_PACKED = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _store_packed(tensor: onnx.TensorProto, store: Store) -> onnx.TensorProto:
    """Write an int4 tensor's packed bytes as they are and keep its element type."""
    holder = store(np.frombuffer(tensor.raw_data, dtype=np.uint8), tensor.name)
    holder.data_type = tensor.data_type
    del holder.dims[:]
    holder.dims.extend(tensor.dims)
    return holder


def _set_opset(model: onnx.ModelProto, domain: str, version: int, at_least: bool = False) -> None:
    for entry in model.opset_import:
        if entry.domain == domain or (domain == "" and entry.domain == "ai.onnx"):
            entry.version = max(entry.version, version) if at_least else version
            return
    model.opset_import.add(domain=domain, version=version)


def quantize_graph(source: Path, target: Path, config: QuantizeConfig) -> GraphQuantization:
    """Quantize the graph file ``source`` into ``target``, weights in ``<target>.data`` beside it (memory-mapped by
    ONNX Runtime, like the float32 export's), reading the float weights one at a time."""
    from vlm_export.exporter.deferred_weights import WeightSink

    model = onnx.load(str(source), load_external_data=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    sink = WeightSink(target.parent / f"{target.name}.data")
    try:

        def load(tensor: onnx.TensorProto) -> np.ndarray:
            sink.flush()  # a weight this pass wrote (a Gemm's transpose) may be read back
            base = target.parent if tensor.name in sink.written else source.parent
            return numpy_helper.to_array(tensor, base_dir=str(base))

        result = quantize_weights(model, load, sink.store, config)
        for tensor in model.graph.initializer:  # the float weights left as they are: copied one at a time
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name not in sink.written:
                sink.write(
                    tensor, np.ascontiguousarray(numpy_helper.to_array(tensor, base_dir=str(source.parent))).tobytes()
                )
    finally:
        sink.close()
    onnx.save(model, str(target))
    logger.info(
        "%s: %d MatMulNBits, %d GatherBlockQuantized, weights %.1f -> %.1f MB",
        source.stem,
        result.matmuls,
        result.gathers,
        result.bytes_before / 1e6,
        result.bytes_after / 1e6,
    )
    return result


class _DropMessage(logging.Filter):
    """Drop log records containing any of `texts` (a quantizer's advice that does not apply here, its per-tensor
    chatter on the root logger)."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quantize_graph_dynamic_int8(source: Path, target: Path) -> GraphQuantization:
    """int8 weights and activations for ``source`` (ONNX Runtime's ``quantize_dynamic``) into ``target``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as _quantize_dynamic

    root.handlers[:], root.level = handlers, level  # see quantize_graph
    logging.getLogger("onnxruntime.quantization").setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    model = onnx.load(str(source), load_external_data=True)
    _name_nodes(model.graph)
    result = GraphQuantization(bytes_before=_initializer_bytes(model.graph))
    _gemm_to_matmul(model.graph, numpy_helper.to_array, numpy_helper.from_array)
    matmuls, _, kept = _targets(model.graph, 8)
    result.kept_float = [k for k in kept if "Gather" not in k]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dynamic-") as scratch:
        # the quantizer reads a file; external data keeps a >2 GB float graph within protobuf's limit
        staged = Path(scratch) / "float.onnx"
        onnx.save_model(model, str(staged), save_as_external_data=True, location="float.onnx.data")
        del model
        # ORT's advice for calibrated CNN quantization, and one INFO line per activation it quantizes dynamically
        hint = _DropMessage("pre-processing before quantization", "Quantization parameters for tensor")
        root.addFilter(hint)
        try:
            _quantize_dynamic(
                staged,
                target,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=matmuls,
                weight_type=QuantType.QInt8,
                per_channel=False,
                extra_options={"MatMulConstBOnly": True},
                use_external_data_format=True,  # memory-mapped on load, like every graph's weights
            )
        finally:
            root.removeFilter(hint)
    quantized = onnx.load(str(target), load_external_data=True)
    result.matmul_integer = sum(1 for n in quantized.graph.node if n.op_type == "MatMulInteger")
    result.bytes_after = _initializer_bytes(quantized.graph)
    if result.matmul_integer != len(matmuls):
        raise ExportError(
            f"quantizing {source.name}: expected {len(matmuls)} MatMulInteger nodes, got {result.matmul_integer}; "
            "please report this model and your onnxruntime version"
        )
    logger.info(
        "%s: %d MatMulInteger (int8 weights and activations), weights %.1f -> %.1f MB",
        source.stem,
        result.matmul_integer,
        result.bytes_before / 1e6,
        result.bytes_after / 1e6,
    )
    return result


def graph_files(folder: Path, file: str) -> list[Path]:
    """The graph file and the external-data files it references (to move or delete them together)."""
    path = folder / file
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path, *(folder / loc for loc in sorted(locations))]


#: Fixed input of the export-time agreement check: a seeded small image (exercises a quantized vision encoder)
#: and a text prompt; AGREEMENT_TOKENS forced positions.
AGREEMENT_TOKENS = 16
AGREEMENT_PROMPT = "Describe this picture in detail, then tell a short story about it."


def agreement_conversation() -> list[dict[str, Any]]:
    """The conversation `quantize_export` measures agreement on (seeded, so the number is reproducible)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:112, 0:140]
    base = np.stack([x, y, (x + y) // 2], axis=-1) * (255 / 280)
    image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": AGREEMENT_PROMPT}]}
    ]


def quantize_export(folder: Path, manifest: Any, config: QuantizeConfig) -> dict[str, Any]:
    """Quantize ``config.graphs`` of the complete fp32 export in ``folder`` in place; returns the manifest record.

    Each graph is quantized into a side folder, teacher-forced top-1 agreement of the quantized export with the
    fp32 one is measured (`agreement.top1_agreement`), then the fp32 files are replaced by the quantized ones.
    """
    import copy

    from vlm_export.exporter.agreement import top1_agreement
    from vlm_export.runtime import VLMPipeline

    side = folder / ".quantized"
    per_graph: dict[str, GraphQuantization] = {}
    candidate = copy.deepcopy(manifest)
    for name in config.graphs:  # other forms of a float graph (an export quantized after the fact) go with it
        candidate.graph_forms.pop(name, None)
    for name in config.graphs:
        info = manifest.graphs[name]
        if name in DYNAMIC_INT8_GRAPHS:
            per_graph[name] = quantize_graph_dynamic_int8(folder / info.file, side / info.file)
        else:
            per_graph[name] = quantize_graph(folder / info.file, side / info.file, config)
        candidate.graphs[name].file = f"{side.name}/{info.file}"
    reference = VLMPipeline(folder, manifest, "ort-cpu")
    quantized = VLMPipeline(folder, candidate, "ort-cpu")
    agreement = top1_agreement(reference, quantized, [agreement_conversation()], AGREEMENT_TOKENS)
    del reference, quantized  # release the sessions (and their mapped files) before the files move
    for name in config.graphs:
        info = manifest.graphs[name]
        for path in graph_files(folder, info.file):
            path.unlink()
        for form in manifest.graph_forms.pop(name, [])[1:]:  # decoder_forms.add_decoder_forms writes them anew
            (folder / form["file"]).unlink(missing_ok=True)
        for path in graph_files(side, info.file):
            path.rename(folder / path.name)
    side.rmdir()
    record = manifest_record(config, per_graph)
    record["agreement_vs_float32"] = {"prompt": "agreement_conversation() in vlm_export/exporter/quantize.py"}
    record["agreement_vs_float32"].update(agreement.to_dict())
    logger.info(
        "teacher-forced top-1 agreement with float32: %.3f over %d positions (top-5 %.3f)",
        agreement.top1,
        agreement.positions,
        agreement.top5,
    )
    return record


def weight_only_graphs(config: QuantizeConfig) -> tuple[str, ...]:
    """The graphs `config` quantizes weight-only (the others get dynamic int8, see DYNAMIC_INT8_GRAPHS)."""
    return tuple(name for name in config.graphs if name not in DYNAMIC_INT8_GRAPHS)


def finish_streamed_quantization(
    folder: Path,
    manifest: Any,
    config: QuantizeConfig,
    per_graph: dict[str, GraphQuantization],
    agreement: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest record of an export whose weight-only graphs were quantized while written (a model verified on a
    depth-reduced copy): the dynamic-int8 graphs are quantized now, and the agreement with float32 is the one
    measured on that copy (the float32 graphs of the whole model were never written)."""
    side = folder / ".quantized"
    for name in config.graphs:
        if name not in DYNAMIC_INT8_GRAPHS:
            continue
        info = manifest.graphs[name]
        per_graph[name] = quantize_graph_dynamic_int8(folder / info.file, side / info.file)
        for path in graph_files(folder, info.file):
            path.unlink()
        for path in graph_files(side, info.file):
            path.rename(folder / path.name)
    if side.exists():
        side.rmdir()
    record = manifest_record(config, per_graph)
    if agreement:
        record["agreement_vs_float32"] = {"measured_on": "the depth-reduced copy (manifest: verification)", **agreement}
    return record
