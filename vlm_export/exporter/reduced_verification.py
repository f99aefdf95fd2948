"""Verification of a model too large to verify whole: the same graph code, with the model's own weights, on a
depth-reduced copy (a few of its layers: `graphs.depth`, `exporter.depth_reduction`) that is exported and verified
against transformers at its full depth. What was kept and how it compared goes into the manifest."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlm_export.errors import ExportError
from vlm_export.exporter.depth_reduction import write_reduced_checkpoint
from vlm_export.exporter.weightless import model_config

logger = logging.getLogger(__name__)


#: Bytes of scratch disk per parameter of the reduced copy: its checkpoint (bfloat16: 2), its
#: float32 export (4) and, while it is quantized, an int4 copy beside it (under 1).
SCRATCH_BYTES_PER_PARAMETER = 7


def reduced_scratch_bytes(family: Any, model_dir: Path, dtype: str) -> int:
    """Disk the depth-reduced copy and its export take while the verification runs."""
    import torch

    from vlm_export.exporter.weightless import parameter_count, weightless_model

    reduce = getattr(family, "reduce_depth", None)
    if reduce is None:
        return 0
    config = model_config(family.model_class, model_dir)
    reduce(config)
    reduced = weightless_model(family.model_class, config, torch.float32)
    return parameter_count(reduced) * SCRATCH_BYTES_PER_PARAMETER


def verify_reduced(
    family: Any,
    model_dir: Path,
    files: list[Path],
    output: Path,
    dtype: str,
    options: dict[str, str],
    quantize: Any,
) -> dict[str, Any]:
    """Export and verify a depth-reduced copy of the model beside `output`; returns the manifest's record."""
    from vlm_export.exporter.export import export_model

    reduce = getattr(family, "reduce_depth", None)
    if reduce is None:
        raise ExportError(f"{family.name} models cannot be verified on a depth-reduced copy; pass --verify full")
    config = model_config(family.model_class, model_dir)
    selections = reduce(config)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-verify", dir=output.parent))
    try:
        reduced = write_reduced_checkpoint(model_dir, files, scratch / "model", config, selections)
        logger.info(
            "verifying the graphs on a depth-reduced copy: %s",
            "; ".join(f"{s.label} {s.keep}" for s in selections),
        )
        result = export_model(
            str(reduced),
            scratch / "export",
            dtype=dtype,
            quantize=quantize,
            verify="full",
            reference="on_demand",  # the copy keeps the whole embedding and lm_head: not loaded twice
            progress=False,
            moe_form=options.get("moe_form"),
            allow_untested_transformers=True,
            golden=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    inner = result.manifest.verification
    record: dict[str, Any] = {
        "depth": "reduced",
        "kept": {s.label: s.keep for s in selections},
        "graphs": inner.get("graphs", {}),
    }
    if result.manifest.quantization:
        record["quantized_agreement"] = result.manifest.quantization.get("agreement_vs_float32")
    return record
