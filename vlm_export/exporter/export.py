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
from typing import Any

import torch
from tqdm import tqdm

import vlm_export
from vlm_export.errors import ExportError
from vlm_export.exporter.activation_scan import FLOAT16_MAX, OnDemandWeights, scan_activations
from vlm_export.exporter.assets import copy_assets, find_image_processor_config
from vlm_export.exporter.checkpoint import validate_checkpoint
from vlm_export.exporter.decoder_forms import add_decoder_forms
from vlm_export.exporter.interrupts import raise_if_interrupted
from vlm_export.exporter.model_source import read_model_type, resolve_model_dir
from vlm_export.exporter.onnx_export import OPSET, export_graph
from vlm_export.exporter.output_folder import check_output, create_staging, move_into_place
from vlm_export.exporter.quantize import (
    GraphQuantization,
    QuantizeConfig,
    finish_streamed_quantization,
    quantize_export,
    quantize_weights,
    weight_only_graphs,
)
from vlm_export.exporter.reduced_verification import reduced_scratch_bytes, verify_reduced
from vlm_export.exporter.resources import GB, available_memory, check_disk_space, log_memory
from vlm_export.exporter.verify import verify_graph
from vlm_export.exporter.weightless import build_weightless, parameter_count
from vlm_export.graphs.decoder import DECODER_OPSET
from vlm_export.graphs.registry import graph_family_for
from vlm_export.manifest import Limits, Manifest
from vlm_export.verification.reference import loads_in_memory
from vlm_export.verification.write import write_golden

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


#: --verify: "full" compares every graph with transformers' forward of the whole model; "reduced" compares the same
#: graph code on a depth-reduced copy with the model's own weights (`reduced_verification`); "auto" picks full when
#: it fits in memory.
VERIFY_MODES = ("auto", "full", "reduced")
GOLDEN_MODES = ("auto", "always", "never")
#: Resident memory of full verification with transformers' model loaded, per byte of float32 parameters: the model
#: plus the graph being checked (ONNX Runtime pre-packs its matrices) plus activations.
LOADED_REFERENCE_FACTOR = 2.3
#: ... and with the reference run on the weightless model, each module's weights read for its own call
#: (`activation_scan.OnDemandWeights`) and ONNX Runtime multiplying from the memory-mapped graph weights.
ON_DEMAND_REFERENCE_FACTOR = 1.15
HEADROOM = 1.5 * GB


@dataclass
class VerificationPlan:
    depth: str  # "full" | "reduced"
    reference: str = "loaded"  # full depth: "loaded" (transformers' model in memory) | "on_demand"


def _verification_plan(mode: str, reference: str, model: Any, dtype: str, quantize: QuantizeConfig | None):
    """How to verify: at full depth with transformers' model loaded when both fit, else at full depth with its
    weights read per module (slower, the graph's size in memory), else on a depth-reduced copy. A quantized
    export compares its agreement with the float32 graphs, which then must fit too: else it is verified reduced."""
    if mode == "reduced":
        return VerificationPlan("reduced")
    float32_bytes = parameter_count(model) * 4
    graph_bytes = parameter_count(model) * (2 if dtype == "float16" else 4)
    largest = max(p.numel() for p in model.parameters()) * 4
    available = available_memory()
    loaded_fits = LOADED_REFERENCE_FACTOR * float32_bytes + HEADROOM <= available
    on_demand_fits = ON_DEMAND_REFERENCE_FACTOR * graph_bytes + 2 * largest + HEADROOM <= available
    if reference == "on_demand" or (reference == "auto" and not loaded_fits and quantize is None):
        if on_demand_fits or mode == "full":
            return VerificationPlan("full", "on_demand")
    elif loaded_fits or mode == "full":
        return VerificationPlan("full", "loaded")
    logger.info(
        "full-depth verification needs ~%.1f GB of memory, %.1f GB are available: verifying on a depth-reduced copy",
        (ON_DEMAND_REFERENCE_FACTOR * graph_bytes + 2 * largest + HEADROOM) / GB,
        available / GB,
    )
    return VerificationPlan("reduced")


def _written_bytes(parameters: int, dtype: str, quantize: QuantizeConfig | None) -> int:
    """What the graphs will take on disk (a little over the parameters in the stored type)."""
    per_parameter = 4 if dtype == "float32" else 2
    if quantize is not None:
        per_parameter = 0.65 if quantize.bits == 4 else 1.2
    return int(parameters * per_parameter * 1.05)


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
    verify: str = "auto",
    reference: str = "auto",
    golden: str | bool = "auto",
) -> ExportResult:
    """Export `model` (folder or hub id) into `output`; returns the manifest written there.

    The graphs are traced without weights and written tensor by tensor from the checkpoint (memory: about one
    weight, not the model). They are verified against transformers at full depth when the model fits in memory
    beside them, else on a depth-reduced copy (`verify`). With `quantize`, weight-only quantization happens while
    the weights are written when the float graphs are not verified in full, else after verification (so the
    quantized export's agreement with the verified float32 one can be measured). `reference` ("auto", "loaded",
    "on_demand") says how transformers' side of a full-depth verification holds the weights. `golden` ("auto",
    "always", "never"; True / False mean always / never) stores golden cases (transformers' outputs on inputs the
    exporter makes) for `vlm-run verify`; "auto" skips them, saying how to add them, when transformers' model does
    not fit in memory (it would then read every weight again for each generated token: ~40 min at 7B on 2 cores).
    """
    golden = {True: "always", False: "never"}.get(golden, golden)  # type: ignore[call-overload]
    if golden not in GOLDEN_MODES:
        raise ExportError(f"golden={golden!r} is not one of {', '.join(GOLDEN_MODES)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    if verify not in VERIFY_MODES:
        raise ExportError(f"--verify {verify} is not supported; choose one of {', '.join(VERIFY_MODES)}")
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
    checkpoint = validate_checkpoint(model_dir)
    torch_dtype = DTYPES[dtype]
    staging = create_staging(output)
    seconds: dict[str, float] = {}
    try:
        steps = tqdm(total=6, desc="export", unit="step", disable=not progress, leave=False)
        steps.set_postfix_str(f"reading {model_dir.name}")
        start = time.perf_counter()
        weightless, weights = build_weightless(family, model_dir, checkpoint, torch_dtype, options)
        parameters = parameter_count(weightless)
        plan = _verification_plan(verify, reference, weightless, dtype, quantize)
        depth = plan.depth
        needed = _written_bytes(parameters, dtype, quantize)
        if depth == "reduced":  # its scratch folder is gone before the graphs are written: the larger counts
            needed = max(needed, reduced_scratch_bytes(family, model_dir, dtype))
        check_disk_space(output.parent, needed, "the export")
        seconds["load"] = time.perf_counter() - start
        log_memory("building the weightless model")
        steps.update()
        range_check = None
        if dtype == "float16":  # fail before writing anything when float16 cannot hold the activations
            steps.set_postfix_str("float16 range check (full depth, float32)")
            peak = scan_activations(family, model_dir, checkpoint, options)
            range_check = {"largest_activation": peak.value, "module": peak.module, "float16_max": FLOAT16_MAX}
            if peak.overflows_float16():
                raise ExportError(
                    f"float16 cannot hold this model's activations: {peak.module} reaches {peak.value:.4g} (float16 "
                    f"stops at {FLOAT16_MAX:g}) in transformers' float32 forward; export --dtype float32, or build "
                    "TensorRT engines in bfloat16 / float32 from a float32 export"
                )
            log_memory("float16 range check")
            raise_if_interrupted()
        reduced_record = None
        if depth == "reduced":  # first: a failure shows in minutes, and its scratch space is free again after
            steps.set_postfix_str("verifying a depth-reduced copy")
            start = time.perf_counter()
            reduced_record = verify_reduced(family, model_dir, checkpoint, output, dtype, options, quantize)
            seconds["verify"] = time.perf_counter() - start
            log_memory("verifying a depth-reduced copy")
            raise_if_interrupted()
        # Quantize while writing only when the float graphs will not exist to verify in full and compare with.
        stream_quantize = quantize if depth == "reduced" else None
        graph_quantization: dict[str, GraphQuantization] = {}
        graphs = {}
        for spec in family.graph_specs(weightless, torch_dtype):
            steps.set_postfix_str(f"writing {spec.name}")
            start = time.perf_counter()
            rewrite = None
            if stream_quantize is not None and spec.name in weight_only_graphs(stream_quantize):

                def rewrite(model_proto, load, store, name=spec.name):
                    graph_quantization[name] = quantize_weights(model_proto, load, store, stream_quantize)

            graphs[spec.name] = export_graph(spec, staging, weights, rewrite=rewrite, progress=progress)
            graphs[spec.name].max_abs_diff = None
            seconds[f"export {spec.name}"] = time.perf_counter() - start
            log_memory(f"writing {spec.name}")
            raise_if_interrupted()
        steps.update()
        steps.set_postfix_str("writing assets")
        generation_config = weightless.generation_config.to_diff_dict()
        files = copy_assets(model_dir, staging, generation_config)
        write_assets = getattr(family, "write_assets", None)  # family-specific host-side tensors
        if write_assets is not None:
            files.update(write_assets(weightless, staging))
        section = family.manifest_section(weightless, image_processor)
        weightless = weights = spec = None  # the checkpoint's files and the fake model are released here
        gc.collect()
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
        steps.update()
        raise_if_interrupted()
        start = time.perf_counter()
        if reduced_record is None:
            steps.set_postfix_str("verifying against transformers")
            manifest.verification = _verify_full(
                family, model_dir, checkpoint, torch_dtype, options, staging, graphs, plan.reference
            )
            seconds["verify"] = time.perf_counter() - start
        else:
            manifest.verification = reduced_record
            for name, record in reduced_record["graphs"].items():
                graphs[name].max_abs_diff = record["max_abs_diff"]
        if range_check is not None:
            manifest.verification["float16_range"] = range_check
        if golden == "always" or (golden == "auto" and loads_in_memory(parameters)):
            steps.set_postfix_str("golden cases (transformers, full depth)")
            manifest.golden = write_golden(staging, model_dir, manifest)
        elif golden == "auto":
            logger.warning(
                "golden cases skipped: transformers' float32 model does not fit in the memory available, and run one "
                "module at a time it would take long at this size; add them later with `vlm-export verify "
                "--write-golden %s` (or export with --golden)",
                output,
            )
        log_memory("verification")
        steps.update()
        raise_if_interrupted()
        if quantize is not None:
            steps.set_postfix_str(f"quantizing ({quantize.scheme})")
            start = time.perf_counter()
            if stream_quantize is None:
                manifest.quantization = quantize_export(staging, manifest, quantize)
            else:
                manifest.quantization = finish_streamed_quantization(
                    staging, manifest, quantize, graph_quantization, manifest.verification.get("quantized_agreement")
                )
            seconds["quantize"] = time.perf_counter() - start
            log_memory("quantization")
        steps.update()
        add_decoder_forms(staging, manifest)  # the decoder file older onnxruntime releases load (decoder_forms.py)
        manifest.save(staging)
        steps.update()
        steps.close()
        raise_if_interrupted()
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output=output, manifest=manifest, seconds=seconds)


def _verify_full(
    family: Any,
    model_dir: Path,
    checkpoint: list[Path],
    dtype: torch.dtype,
    options: dict[str, str],
    folder: Path,
    graphs: dict,
    reference: str,
) -> dict[str, Any]:
    """Every graph against transformers' forward of the whole model; returns the manifest's record. With
    `reference` "on_demand" transformers runs on the weightless model, each module reading its weights for its own
    call, and ONNX Runtime multiplies from the memory-mapped weights: memory is about the graph, not twice it."""
    hooks = None
    if reference == "on_demand":
        model, weights = build_weightless(family, model_dir, checkpoint, dtype, options)
        hooks = OnDemandWeights(model, weights, dtype)
    else:
        try:
            model = family.load_model(model_dir, dtype, **options)
        except (OSError, ValueError) as error:
            raise ExportError(f"cannot load {model_dir} with transformers to verify the export: {error}") from None
    log_memory(f"loading transformers' model to verify against ({reference})")
    record: dict[str, Any] = {"depth": "full", "reference": reference, "graphs": {}}
    try:
        for spec in family.graph_specs(model, dtype):
            diff = verify_graph(spec, folder / graphs[spec.name].file, prepack=reference != "on_demand")
            graphs[spec.name].max_abs_diff = diff
            cases = len(spec.verify_feeds)
            record["graphs"][spec.name] = {"max_abs_diff": diff, "tolerance": spec.tolerance, "cases": cases}
            logger.info("%s: max abs diff vs transformers %.3g", spec.name, diff)
            log_memory(f"verifying {spec.name}")
            raise_if_interrupted()
    finally:
        if hooks is not None:
            hooks.remove()
    return record
