"""Trace one `GraphSpec` to an ONNX file with torch's dynamo exporter and describe its IO for the manifest."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

from vlm_export.errors import ExportError
from vlm_export.exporter.deferred_weights import (
    DEFERRED,
    DeferredWeights,
    Recipe,
    WeightReader,
    WeightSink,
    parameter_recipe,
    transposed,
)
from vlm_export.exporter.fuse_matmuls import fuse_sibling_matmuls
from vlm_export.graphs.registry import (
    DERIVE_ATTRIBUTE,
    PROMOTED_DOMAIN,
    ROWS_ATTRIBUTE,
    SOURCE_ATTRIBUTE,
    GraphSpec,
)
from vlm_export.manifest import GraphInfo, TensorInfo

logger = logging.getLogger(__name__)

OPSET = 23
#: Initializers up to this many bytes stay in the graph file; larger ones go to `<graph>.onnx.data`.
INLINE_LIMIT = 1024

_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def _describe(values: list[onnx.ValueInfoProto], axes: dict[str, dict[int, str]]) -> list[TensorInfo]:
    infos = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = []
        for index, dim in enumerate(tensor_type.shape.dim):
            named = axes.get(value.name, {}).get(index)
            if named is not None:
                shape.append(named)
            elif dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or f"dim{index}")
        dtype = _ONNX_TYPES.get(tensor_type.elem_type, onnx.TensorProto.DataType.Name(tensor_type.elem_type))
        infos.append(TensorInfo(name=value.name, dtype=dtype, shape=shape))
    return infos


@contextlib.contextmanager
def native_gqa_attention() -> Iterator[None]:
    """Trace grouped-query attention without transformers' `repeat_kv`.

    transformers' SDPA path copies the K/V heads up to the query head count unless GQA is known to be safe for
    the device; ONNX's `Attention` op takes fewer K/V heads natively, so that copy is pure cost in the graph. It
    grew with the context: on a Qwen2-0.5B-shaped decoder at 1,500 cached tokens, the Expand/Concat copies took
    ~38 ms of a 128 ms decode step. The reference forward used for verification still runs with `repeat_kv`.
    """
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


@contextlib.contextmanager
def grouped_query_rows() -> Iterator[None]:
    """Trace grouped-query attention as attention over the KV heads, each group's query heads stacked as rows.

    ONNX Runtime's CPU `Attention` kernel runs one small GEMM pair per (batch, query head); at decode each is one
    row against the whole cache. Reshaped [B, heads, S, D] -> [B, kv_heads, group * S, D], the query heads that
    share a KV head become `group` times as many rows of one GEMM pair. Exact: row (g, s) attends the same keys
    with mask row s, which is tiled once per group (once per graph: every layer gets the same mask). transformers'
    own `pack_gqa` does this for one query position; this also covers the prefill. Only while exporting; the
    reference forward and every other model keep transformers' SDPA path.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    tiled: list[torch.Tensor] = []  # [mask, its rows tiled per group]: every layer passes the same mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        if not torch.onnx.is_in_onnx_export() or attention_mask is None or kv_heads == heads or dropout:
            return original(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        group = heads // kv_heads
        if not tiled or tiled[0] is not attention_mask:
            rows = attention_mask.expand(-1, -1, length, -1)[:, :, None].expand(-1, -1, group, -1, -1)
            tiled[:] = [attention_mask, rows.reshape(batch, 1, group * length, -1)]
        mask = tiled[1]
        stacked = query.reshape(batch, kv_heads, group * length, dim)
        out = torch.nn.functional.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


#: Parameters of transformers' standard `apply_rotary_pos_emb` (rotate-half RoPE on [B, heads, S, head_dim]).
ROTARY_PARAMETERS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


@contextlib.contextmanager
def onnx_rotary_embedding() -> Iterator[None]:
    """Trace transformers' `apply_rotary_pos_emb` as ONNX `RotaryEmbedding` ops (opset 23).

    Written out, rotate-half RoPE is six ops per tensor (split, neg, concat, two muls, add): 12 per layer, a
    quarter of a decode step's ~900 ops on a 24-layer model, each a thread-pool dispatch on the CPU. The exporter
    fuses the pattern for plain RoPE but not after the multimodal (MRoPE) section mixing, which happens in the
    rotary module. The op takes the first half of cos/sin: rotate-half RoPE duplicates the frequencies over the two
    halves (MRoPE too: its sections are doubled), and the graph verification against transformers catches any
    model where that does not hold. Every loaded transformers modeling module with the standard function is
    patched while tracing, and restored after.
    """
    import inspect
    import sys

    patched = []
    for name, module in list(sys.modules.items()):
        original = getattr(module, "apply_rotary_pos_emb", None) if name.startswith("transformers.models.") else None
        if original is None or list(inspect.signature(original).parameters) != ROTARY_PARAMETERS:
            continue

        def rotary(q, k, cos, sin, unsqueeze_dim=1, _original=original):
            if not torch.onnx.is_in_onnx_export() or unsqueeze_dim != 1 or q.dim() != 4:
                return _original(q, k, cos, sin, unsqueeze_dim)
            half = cos.shape[-1] // 2
            cos_half, sin_half = cos[..., :half], sin[..., :half]
            return (
                torch.onnx.ops.rotary_embedding(q, cos_half, sin_half),
                torch.onnx.ops.rotary_embedding(k, cos_half, sin_half),
            )

        module.apply_rotary_pos_emb = rotary
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.apply_rotary_pos_emb = original


def promote_ops(model: onnx.ModelProto, opset: int) -> None:
    """Move the ops traced in `PROMOTED_DOMAIN` into the default domain and raise its opset to `opset`."""
    for node in model.graph.node:
        if node.domain == PROMOTED_DOMAIN:
            node.domain = ""
    imports = [o for o in model.opset_import if o.domain != PROMOTED_DOMAIN]
    for entry in imports:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    del model.opset_import[:]
    model.opset_import.extend(imports)


def _trace(spec: GraphSpec, captured: io.StringIO):
    """torch's dynamo exporter on `spec`, unoptimized (weights may be FakeTensors: see `weightless.py`)."""
    with (
        torch.no_grad(),
        native_gqa_attention(),
        grouped_query_rows(),
        onnx_rotary_embedding(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(captured),
        contextlib.redirect_stderr(captured),
    ):
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            spec.module,
            spec.example_args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            optimize=False,
            verbose=False,
        )


def _lazy(recipe: Recipe, value: ir.Value) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(recipe()), dtype=value.dtype, shape=value.shape, name=value.name)


def bind_fake_weights(model: ir.Model, module: torch.nn.Module, weights: WeightReader | None) -> int:
    """Give every FakeTensor initializer a lazy recipe reading its parameter from `weights`; returns how many."""
    from vlm_export.exporter.weightless import is_fake

    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))  # views a graph form derives (MoE experts)
    bound = 0
    for value in model.graph.initializers.values():
        if not is_fake(getattr(value.const_value, "raw", None)):
            continue
        tensor = tensors.get(value.name)
        source = getattr(tensor, SOURCE_ATTRIBUTE, None)
        if tensor is None or source is None or weights is None:
            raise ExportError(f"the traced graph's weight {value.name} has no known source in the checkpoint")
        rows = getattr(tensor, ROWS_ATTRIBUTE, None)
        recipe = parameter_recipe(weights, source, tensor.dtype, rows, getattr(tensor, DERIVE_ATTRIBUTE, None))
        value.const_value = _lazy(recipe, value)
        bound += 1
    return bound


def _recipe_of(tensor: ir.TensorProtocol) -> Recipe:
    return lambda: tensor.numpy()


def fold_lazy_transposes(graph: ir.Graph) -> int:
    """Fold `Transpose(weight)` into a transposed lazy weight, as the graph optimizer folds it for real weights
    (onnxscript always folds a Transpose whose large input it alone reads) without evaluating anything now."""
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or not isinstance(source.const_value, ir.LazyTensor):
            continue
        if len(source.uses()) != 1 or node.outputs[0].is_graph_output():
            continue
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else None
        dims = list(source.shape)
        order = perm if perm is not None else list(reversed(range(len(dims))))
        output = node.outputs[0]
        recipe = transposed(_recipe_of(source.const_value), perm)
        shape = ir.Shape([dims[i] for i in order])
        value = ir.Value(name=output.name, shape=shape, type=ir.TensorType(source.dtype))
        value.const_value = ir.LazyTensor(lambda r=recipe: ir.tensor(r()), dtype=source.dtype, shape=shape)
        output.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        graph.register_initializer(value)
        folded += 1
    return folded


def _to_proto(model: ir.Model, deferred: DeferredWeights, inline_limit: int) -> onnx.ModelProto:
    """Serialize `model` without evaluating its weights: lazy ones, and real ones over `inline_limit` bytes, become
    deferred placeholders (evaluated when written)."""
    placeholders: dict[str, tuple[list[int], Recipe]] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        large = tensor.size * tensor.dtype.itemsize > inline_limit
        if isinstance(tensor, ir.LazyTensor) or large:
            placeholders[value.name] = ([int(d) for d in tensor.shape], _recipe_of(tensor))
            value.const_value = ir.ExternalTensor(
                DEFERRED, None, None, tensor.dtype, shape=tensor.shape, name=value.name
            )
    proto = ir.serde.serialize_model(model)
    for init in proto.graph.initializer:
        if init.name in placeholders:
            dims, recipe = placeholders[init.name]
            fresh = deferred.placeholder(init.name, dims, init.data_type, recipe)
            init.CopyFrom(fresh)
    return proto


#: A graph pass run on the traced graph before its weights are written: (model, load, store), see `fuse_matmuls`.
Rewrite = Callable[[onnx.ModelProto, Callable[[onnx.TensorProto], Any], Callable[[Any, str], onnx.TensorProto]], Any]


def export_graph(
    spec: GraphSpec,
    folder: Path,
    weights: WeightReader | None = None,
    rewrite: Rewrite | None = None,
    progress: bool = False,
) -> GraphInfo:
    """Export `spec` to `folder/<name>.onnx` and return its IO description.

    The module may hold FakeTensor parameters (`weightless.weightless_model`): their values are read from `weights`
    one at a time while `<name>.onnx.data` is written, so no step holds the graph's weights. Weights always go to
    that file beside the graph: protobuf cannot hold 2 GiB, and ONNX Runtime memory-maps external weights, so a
    weight it never packs (the embedding table, read row by row by Gather) costs resident memory only for the rows
    a request touches.

    `rewrite` (e.g. weight-only quantization) runs after the projections are fused, reading and writing weights one
    at a time like the rest; `progress` shows a bar of the weights being written."""
    path = folder / f"{spec.name}.onnx"
    captured = io.StringIO()
    deferred = DeferredWeights(folder)
    sink = None
    try:
        program = _trace(spec, captured)
        bind_fake_weights(program.model, spec.module, weights)
        fold_lazy_transposes(program.model.graph)
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            program.optimize()
        model = _to_proto(program.model, deferred, INLINE_LIMIT)
        del program
        if spec.opset and spec.opset > OPSET:
            promote_ops(model, spec.opset)
        sink = WeightSink(folder / f"{path.name}.data")
        fused = fuse_sibling_matmuls(model, load=deferred.load, store=sink.store, join=deferred.join)
        logger.debug("%s: fused %d groups of sibling MatMuls", spec.name, fused)
        if rewrite is not None:
            rewrite(model, deferred.load, sink.store)
        with tqdm(desc=f"writing {spec.name}", unit="tensor", disable=not progress, leave=False) as bar:
            deferred.write_all(
                model.graph, sink, INLINE_LIMIT, on_write=lambda name: (bar.update(), bar.set_postfix_str(name[-60:]))
            )
        sink.close()
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    except ExportError:
        raise
    except Exception as error:
        logger.debug("exporter output:\n%s", captured.getvalue())
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"exporting the {spec.name} graph failed: {first}") from error
    finally:
        if sink is not None:
            sink.close()
    logger.debug("exporter output for %s:\n%s", spec.name, captured.getvalue())
    inputs = _describe(list(model.graph.input), spec.input_axes)
    outputs = _describe(list(model.graph.output), spec.output_axes)
    if [t.name for t in inputs] != spec.input_names or [t.name for t in outputs] != spec.output_names:
        raise ExportError(
            f"the exported {spec.name} graph has IO {[t.name for t in inputs]} -> {[t.name for t in outputs]}, "
            f"expected {spec.input_names} -> {spec.output_names} (an input was folded away by the exporter)"
        )
    return GraphInfo(file=path.name, inputs=inputs, outputs=outputs)
