"""Trace one `GraphSpec` to an ONNX file with torch's dynamo exporter and describe its IO for the manifest."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from vlm_export.errors import ExportError
from vlm_export.graphs.registry import PROMOTED_DOMAIN, GraphSpec
from vlm_export.manifest import GraphInfo, TensorInfo

logger = logging.getLogger(__name__)

OPSET = 23

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


def promote_ops(path: Path, opset: int) -> None:
    """Move the ops traced in `PROMOTED_DOMAIN` into the default domain and raise its opset to `opset`.
    Only the graph file is rewritten; external weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == PROMOTED_DOMAIN:
            node.domain = ""
    imports = [o for o in model.opset_import if o.domain != PROMOTED_DOMAIN]
    for entry in imports:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def fuse_projections(path: Path) -> int:
    """Fuse sibling MatMuls of the saved graph (see `fuse_matmuls`) and rewrite it.

    A graph with external weights is rewritten without loading them: each fused group's weights are read, joined
    and written out, then every other weight is copied over tensor by tensor, into a new data file that replaces
    the old one. (Loading a 7 GB decoder next to the PyTorch model that is still needed for verification ran a
    2B-parameter export out of 24 GB of memory.)
    """
    from vlm_export.exporter.fuse_matmuls import fuse_sibling_matmuls

    model = onnx.load(str(path), load_external_data=False)
    external = [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if not external:  # every weight is already in the proto just loaded
        fused = fuse_sibling_matmuls(model)
        if fused:
            onnx.save(model, str(path))
        return fused
    folder, location = path.parent, f"{path.name}.data"
    staged = folder / f".{location}.partial"
    old_files = {_external_field(init, "location") for init in external}
    written: set[str] = set()
    with staged.open("wb") as sink:

        def write(tensor: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
            sink.seek(-sink.tell() % 4096, os.SEEK_CUR)  # page-aligned, so ONNX Runtime can map it
            offset = sink.tell()
            sink.write(raw)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            written.add(tensor.name)
            return tensor

        def store(array, name: str) -> onnx.TensorProto:
            tensor = numpy_helper.from_array(array, name)
            return write(tensor, tensor.raw_data)

        def load(tensor: onnx.TensorProto):
            return numpy_helper.to_array(tensor, base_dir=str(folder))

        fused = fuse_sibling_matmuls(model, load=load, store=store)
        if fused:
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL and init.name not in written:
                    with (folder / _external_field(init, "location")).open("rb") as source:
                        source.seek(int(_external_field(init, "offset") or 0))
                        length = _external_field(init, "length")
                        write(init, source.read(int(length)) if length else source.read())
    if not fused:
        staged.unlink()
        return 0
    for name in old_files:
        (folder / name).unlink()
    staged.rename(folder / location)
    onnx.save(model, str(path))
    logger.debug("%s: fused %d groups of sibling MatMuls", path.name, fused)
    return fused


def _external_field(tensor: onnx.TensorProto, key: str) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == key), None)


def export_graph(spec: GraphSpec, folder: Path) -> GraphInfo:
    """Export `spec` to `folder/<name>.onnx` and return its IO description.

    Weights always go to `<name>.onnx.data` beside the graph: protobuf cannot hold 2 GiB, and ONNX Runtime
    memory-maps external weights, so a weight it never packs (the embedding table, read row by row by Gather)
    costs resident memory only for the rows a request touches."""
    path = folder / f"{spec.name}.onnx"
    captured = io.StringIO()
    try:
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
            program = torch.onnx.export(
                spec.module,
                spec.example_args,
                dynamo=True,
                opset_version=OPSET,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=spec.dynamic_shapes,
                verbose=False,
            )
            program.save(path, external_data=True)
        if spec.opset and spec.opset > OPSET:
            promote_ops(path, spec.opset)
        fuse_projections(path)
    except Exception as error:
        logger.debug("exporter output:\n%s", captured.getvalue())
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"exporting the {spec.name} graph failed: {first}") from error
    logger.debug("exporter output for %s:\n%s", spec.name, captured.getvalue())
    model = onnx.load(str(path), load_external_data=False)
    inputs = _describe(list(model.graph.input), spec.input_axes)
    outputs = _describe(list(model.graph.output), spec.output_axes)
    if [t.name for t in inputs] != spec.input_names or [t.name for t in outputs] != spec.output_names:
        raise ExportError(
            f"the exported {spec.name} graph has IO {[t.name for t in inputs]} -> {[t.name for t in outputs]}, "
            f"expected {spec.input_names} -> {spec.output_names} (an input was folded away by the exporter)"
        )
    return GraphInfo(file=path.name, inputs=inputs, outputs=outputs)
