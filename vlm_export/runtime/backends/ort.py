"""ONNX Runtime backend (CPU): the fallback that must always work."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vlm_export.errors import VLMExportError
from vlm_export.manifest import GraphInfo

logger = logging.getLogger(__name__)


class BackendError(VLMExportError):
    """A graph failed to load or run; the message names the graph and the likely fix."""


class OrtSession:
    def __init__(self, path: Path, info: GraphInfo, providers: list[str], threads: int | None):
        self.info = info
        self.name = path.stem
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types
            raise BackendError(
                f"ONNX Runtime cannot load {path} ({str(error).splitlines()[0]}); the file may be truncated: "
                "re-export the model, or upgrade onnxruntime"
            ) from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        try:
            outputs = self.session.run(self.output_names, dict(feeds))
        except Exception as error:
            shapes = {name: getattr(value, "shape", None) for name, value in feeds.items()}
            raise BackendError(
                f"ONNX Runtime failed running the {self.name} graph ({str(error).splitlines()[0]}); "
                f"input shapes {shapes}"
            ) from None
        return dict(zip(self.output_names, outputs, strict=True))

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)


class OrtCpuBackend:
    """ONNX Runtime on the CPU; numpy arrays are the 'device' buffers, so nothing is copied between calls."""

    name = "ort-cpu"

    def __init__(self, threads: int | None = None):
        env_threads = os.environ.get("VLM_EXPORT_THREADS")
        self.threads = threads or (int(env_threads) if env_threads else None)

    def load(self, path: Path, info: GraphInfo) -> OrtSession:
        return OrtSession(path, info, ["CPUExecutionProvider"], self.threads)
