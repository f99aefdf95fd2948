"""What "passes" means for an export on a backend (torch-free).

float32 graphs on ONNX Runtime are held to transformers' exact greedy tokens, with every stage within float
rounding (differences relative to the reference's largest magnitude, `max(1, max |reference|)`, as the exporter's
own graph verification measures them). Graphs that are not float32 (float16, TensorRT engines, int8 / int4
weights) cannot give exact tokens; they are held to teacher-forced agreement with transformers' tokens and to a
logit error measured against the spread of transformers' logits. Those bounds are floors that catch broken exports
(float16 overflow, garbage, a damaged engine), not a quality certificate: each report prints the measured values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from vlm_export.manifest import Manifest

#: A different top-1 choice counts as agreeing (approximate profiles) when transformers' own logit for it is within
#: this fraction of the logits' spread (std over the vocabulary) of their best: a near tie any rounding may flip.
NEAR_TIE = 0.05


@dataclass(frozen=True)
class Thresholds:
    profile: str  # what the export computes in, on this backend
    exact: bool  # greedy tokens must equal transformers'
    pixels: float = 1e-4  # preprocessing (host numpy, same in every profile): max |diff| / max(1, max |ref|)
    # exact: max |diff| / max(1, max |ref|); otherwise: rms(diff) / rms(ref)
    vision: float = 1e-3
    text_embeddings: float = 1e-5
    # exact: max |diff| / max(1, max |ref|) over the compared logits; otherwise: rms(diff) / std of the ref logits
    logits: float = 1e-3
    min_top1: float = 1.0  # teacher-forced: our argmax == transformers' token
    min_top5: float = 1.0  # transformers' token among our 5 highest logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.exact:
            return (
                f"{self.profile}: greedy tokens must equal transformers', logits within {self.logits:g} of their scale"
            )
        return (
            f"{self.profile}: teacher-forced top-1 >= {self.min_top1:g}, top-5 >= {self.min_top5:g}, logit error <= "
            f"{self.logits:g} of the logits' spread"
        )


EXACT = Thresholds("float32", exact=True)
PROFILES = {
    "float32": EXACT,
    # CUDA kernels (float32, TF32 off: runtime/backends/ort.py) round differently from PyTorch's CPU ones: still
    # transformers' greedy tokens, at a looser bound on the differences.
    "float32-cuda": Thresholds("float32-cuda", exact=True, vision=1e-2, logits=1e-2),
    # TensorRT float32 engines may use TF32 tensor cores and their own kernels: close, not bit-exact.
    "tensorrt-fp32": Thresholds("tensorrt-fp32", False, vision=0.01, logits=0.05, min_top1=0.9, min_top5=0.98),
    "float16": Thresholds("float16", False, vision=0.02, text_embeddings=1e-3, logits=0.1, min_top1=0.9, min_top5=0.98),
    "bfloat16": Thresholds(
        "bfloat16", False, vision=0.05, text_embeddings=1e-2, logits=0.2, min_top1=0.8, min_top5=0.9
    ),
    "int8": Thresholds("int8", False, vision=0.1, logits=0.2, min_top1=0.8, min_top5=0.9),
    "int4": Thresholds("int4", False, vision=0.1, text_embeddings=0.2, logits=0.6, min_top1=0.5, min_top5=0.8),
}
_TRT_PRECISIONS = {"fp32": "tensorrt-fp32", "fp16": "float16", "bf16": "bfloat16"}


def thresholds_for(manifest: Manifest, backend: str, overrides: dict[str, float | None] | None = None) -> Thresholds:
    """The profile of `manifest`'s graphs on `backend`, with the user's overrides (None = keep)."""
    if manifest.quantization:
        scheme = str(manifest.quantization.get("scheme", "int4"))
        profile = PROFILES.get(scheme, PROFILES["int4"])
        if "vision_encoder" in manifest.quantization.get("graphs", []):
            profile = replace(profile, vision=max(profile.vision, PROFILES["int8"].vision))
    elif backend == "trt":
        precision = str(manifest.engines.get("tensorrt", {}).get("precision", "auto"))
        if precision == "auto":
            precision = "fp16" if manifest.dtype == "float16" else "fp32"
        profile = PROFILES[_TRT_PRECISIONS.get(precision, "float16")]
    elif manifest.dtype == "float16":
        profile = PROFILES["float16"]
    else:
        profile = PROFILES["float32-cuda"] if backend == "ort-cuda" else EXACT
    changes = {key: value for key, value in (overrides or {}).items() if value is not None}
    if changes:
        profile = replace(profile, **changes)
    return profile
