"""Backends by name, imported lazily so the runtime imports on machines without CUDA or TensorRT."""

from __future__ import annotations

from vlm_export.errors import VLMExportError
from vlm_export.runtime.backends.base import Backend, GraphSession

BACKENDS = ("ort-cpu",)

__all__ = ["BACKENDS", "Backend", "GraphSession", "create_backend"]


def create_backend(name: str, **options) -> Backend:
    if name == "ort-cpu":
        from vlm_export.runtime.backends.ort import OrtCpuBackend

        return OrtCpuBackend(**options)
    raise VLMExportError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
