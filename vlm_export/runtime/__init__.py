"""Torch-free runtime: numpy preprocessing, ONNX Runtime / TensorRT backends, generation.

Never imports torch or transformers (tests check it in a fresh interpreter).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationResult", "VLMPipeline"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing a submodule (e.g. preprocessing alone) does not load onnxruntime.
    if name in __all__:
        from vlm_export.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
