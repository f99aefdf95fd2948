"""Export a model folder/hub id to an output folder: graphs, verification, assets, manifest.

Everything is written into a hidden temporary folder beside the output and moved into place only when the
export is complete and verified, so an interrupted export never leaves a folder that looks usable.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import vlm_export
from vlm_export.errors import ExportError
from vlm_export.exporter.assets import copy_assets, find_image_processor_config
from vlm_export.exporter.checkpoint import validate_checkpoint
from vlm_export.exporter.interrupts import raise_if_interrupted
from vlm_export.exporter.model_source import read_model_type, resolve_model_dir
from vlm_export.exporter.onnx_export import OPSET, export_graph
from vlm_export.exporter.output_folder import check_output, create_staging, move_into_place
from vlm_export.exporter.quantize import QuantizeConfig, quantize_export
from vlm_export.exporter.verify import verify_graph
from vlm_export.graphs.decoder import DECODER_OPSET
from vlm_export.graphs.registry import graph_family_for
from vlm_export.manifest import Limits, Manifest

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
TESTED_TRANSFORMERS = ("5.24.",)


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    seconds: dict[str, float] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "vlm_export": vlm_export.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": str(OPSET),  # the default; a graph that needs newer ops (the decoder's TensorScatter) says so
        "decoder_opset": str(DECODER_OPSET),
    }


def _check_transformers(allow_untested: bool) -> None:
    import transformers

    if not transformers.__version__.startswith(TESTED_TRANSFORMERS):
        message = (
            f"transformers {transformers.__version__} is not the version vlm-export's parity tests prove "
            f"({', '.join(v + 'x' for v in TESTED_TRANSFORMERS)})"
        )
        if not allow_untested:
            raise ExportError(message + "; install transformers==5.24.* or pass --allow-untested-transformers")
        logger.warning("%s; continuing because --allow-untested-transformers was given", message)


def export_model(
    model: str,
    output: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    max_image_pixels: int | None = None,
    revision: str | None = None,
    allow_untested_transformers: bool = False,
    progress: bool = True,
    moe_form: str | None = None,
    quantize: QuantizeConfig | None = None,
) -> ExportResult:
    """Export `model` (folder or hub id) into `output`; returns the manifest written there.

    With `quantize`, the verified fp32 graphs are then quantized (weight-only) in place; see `quantize.py`.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    if quantize is not None:
        quantize.validate()
        if dtype != "float32":
            raise ExportError(
                f"--quantize {quantize.scheme} quantizes float32 graphs (weights int4/int8, activations float32); "
                "drop --dtype float16 or --quantize"
            )
    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-seq-len", max_seq_len),
        ("--max-image-pixels", max_image_pixels),
    ):
        if value is not None and value < 1:
            raise ExportError(f"{flag} must be a positive integer, got {value}")
    _check_transformers(allow_untested_transformers)
    output = Path(output).expanduser().resolve()
    model_dir = resolve_model_dir(model, revision)
    check_output(output, model_dir, overwrite)
    family = graph_family_for(read_model_type(model_dir))
    options: dict[str, str] = {}
    if moe_form is not None:
        if "moe_form" not in getattr(family, "options", ()):
            raise ExportError(f"--moe-form applies to mixture-of-experts models; {family.name} has no experts")
        options["moe_form"] = moe_form
    image_processor = find_image_processor_config(model_dir)
    validate_checkpoint(model_dir)
    staging = create_staging(output)
    seconds: dict[str, float] = {}
    try:
        steps = tqdm(total=8, desc="export", unit="step", disable=not progress, leave=False)
        steps.set_postfix_str(f"loading {model_dir.name}")
        start = time.perf_counter()
        torch_model = family.load_model(model_dir, DTYPES[dtype], **options)
        seconds["load"] = time.perf_counter() - start
        steps.update()
        raise_if_interrupted()
        graphs = {}
        for spec in family.graph_specs(torch_model, DTYPES[dtype]):
            steps.set_postfix_str(f"exporting {spec.name}")
            start = time.perf_counter()
            info = export_graph(spec, staging)
            seconds[f"export {spec.name}"] = time.perf_counter() - start
            steps.update()
            raise_if_interrupted()
            steps.set_postfix_str(f"verifying {spec.name}")
            start = time.perf_counter()
            info.max_abs_diff = verify_graph(spec, staging / info.file)
            seconds[f"verify {spec.name}"] = time.perf_counter() - start
            logger.info("%s: max abs diff vs transformers %.3g", spec.name, info.max_abs_diff)
            graphs[spec.name] = info
            steps.update()
            raise_if_interrupted()
        steps.set_postfix_str("writing assets")
        generation_config = torch_model.generation_config.to_diff_dict()
        files = copy_assets(model_dir, staging, generation_config)
        write_assets = getattr(family, "write_assets", None)  # family-specific host-side tensors
        if write_assets is not None:
            files.update(write_assets(torch_model, staging))
        section = family.manifest_section(torch_model, image_processor)
        text = section["text"]
        limits = Limits(
            max_batch=max_batch,
            max_seq_len=max_seq_len or text.get("max_position_embeddings"),
            max_image_pixels=max_image_pixels or section["preprocessing"].get("max_pixels"),
        )
        manifest = Manifest(
            family=family.name,
            dtype=dtype,
            graphs=graphs,
            tokens=section["tokens"],
            text=text,
            vision=section["vision"],
            preprocessing=section["preprocessing"],
            files=files,
            limits=limits,
            producer=_versions(),
            source_model=model,
        )
        if quantize is not None:
            torch_model = spec = None  # free the PyTorch weights before the graphs are loaded for quantization
            gc.collect()
            steps.set_postfix_str(f"quantizing ({quantize.scheme})")
            start = time.perf_counter()
            manifest.quantization = quantize_export(staging, manifest, quantize)
            seconds["quantize"] = time.perf_counter() - start
        manifest.save(staging)
        steps.update()
        raise_if_interrupted()
        steps.close()
        raise_if_interrupted()
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output=output, manifest=manifest, seconds=seconds)
