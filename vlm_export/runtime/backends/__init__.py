"""Backends by name, imported lazily so the runtime imports on machines without CUDA or TensorRT.

Selecting a backend whose libraries are missing fails with one line saying what to install.
"""

from __future__ import annotations

from vlm_export.errors import VLMExportError
from vlm_export.runtime.backends.base import Backend, GraphSession

BACKENDS = ("ort-cpu", "ort-cuda", "trt")
BACKEND_HELP = (
    "ort-cpu: ONNX Runtime on the CPU (always available); ort-cuda: ONNX Runtime CUDA (onnxruntime-gpu), same "
    "ONNX graphs; trt: TensorRT engines built by `vlm-export build-engines` (tensorrt + polygraphy)"
)

__all__ = ["BACKENDS", "BACKEND_HELP", "Backend", "GraphSession", "create_backend"]


def create_backend(name: str, **options) -> Backend:
    if name == "ort-cpu":
        from vlm_export.runtime.backends.ort import OrtCpuBackend

        return OrtCpuBackend(**options)
    if name == "ort-cuda":
        from vlm_export.runtime.backends.ort import OrtCudaBackend

        return OrtCudaBackend(**options)
    if name == "trt":
        from vlm_export.runtime.backends.trt import TrtBackend

        return TrtBackend(**options)
    raise VLMExportError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
