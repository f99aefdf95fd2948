"""Run each exported graph in ONNX Runtime on inputs of other shapes than the traced example and compare
with transformers' own forward: catches shapes baked in by tracing as well as numerical drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vlm_export.errors import ExportError
from vlm_export.graphs.registry import GraphSpec


def non_finite_message(graph: str, output: str, dtype: np.dtype) -> str:
    if dtype == np.float16:
        return (
            f"the float16 {graph} graph overflows: its output {output} has inf/NaN where transformers' is finite "
            "(activations past float16's 65504); export with --dtype float32, or build TensorRT engines in "
            "bfloat16 / float32 from a float32 export"
        )
    return f"the {graph} graph's output {output} has inf/NaN where transformers' is finite; please report this model"


def verify_graph(spec: GraphSpec, onnx_path: Path, prepack: bool = True) -> float:
    """Return the max abs difference over all verification inputs and outputs.

    Raises when a difference exceeds `tolerance * max(1, max |reference|)` for its output: the bound scales with
    the output's magnitude so large activations are not held to an absolute bound meant for O(1) values. Without
    `prepack`, ONNX Runtime multiplies from the memory-mapped weights (slower, half the memory).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not prepack:  # run MatMuls on the memory-mapped weights: no second, packed copy of the graph in memory
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    worst_ratio = 0.0
    for index, feeds in enumerate(spec.verify_feeds):
        with torch.no_grad():
            expected = [t.detach().float().numpy() for t in spec.reference(feeds)]
        try:
            actual = session.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})
        except Exception as error:  # ORT raises its own exception types
            raise ExportError(
                f"the exported {spec.name} graph fails in ONNX Runtime on verification input {index}: "
                f"{str(error).splitlines()[0]}"
            ) from error
        for name, got, want in zip(spec.output_names, actual, expected, strict=True):
            if got.shape != want.shape:
                raise ExportError(
                    f"{spec.name} output {name} has shape {got.shape} in ONNX Runtime but {want.shape} in "
                    f"transformers (verification input {index})"
                )
            if not np.isfinite(got).all() and np.isfinite(want).all():
                raise ExportError(non_finite_message(spec.name, name, got.dtype))
            diff = float(np.abs(got.astype(np.float32) - want).max()) if got.size else 0.0
            scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
            worst = max(worst, diff)
            worst_ratio = max(worst_ratio, diff / scale)
    if worst_ratio > spec.tolerance:
        raise ExportError(
            f"{spec.name}: ONNX Runtime differs from transformers by {worst:.3g} (relative tolerance "
            f"{spec.tolerance:g}); "
            "the export is not trustworthy — please report this model and your versions"
        )
    return worst
