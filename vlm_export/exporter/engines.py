"""Build TensorRT engines from an exported folder's ONNX graphs (`vlm-export build-engines DIR`).

Torch-free: needs only the runtime, onnx, tensorrt and polygraphy, so it runs on the target device (a Jetson)
from ONNX exported elsewhere. One engine per graph, profiles from the manifest's limits (`engine_profiles`), built
with polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig(profiles, timing cache) -> EngineBytesFromNetwork).
Ops the installed TensorRT cannot import are rewritten into primitive ONNX ops first (`trt_ops`). What was built —
TensorRT version, GPU compute capability, precision, profile ranges, rewrites — goes to manifest.engines.
The engines' limits become the export's limits (manifest.limits), which the runtime enforces for every backend.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm_export.errors import VLMExportError
from vlm_export.exporter.engine_profiles import EngineLimits, ProfileSpec, engine_profiles
from vlm_export.exporter.trt_ops import parse_version
from vlm_export.manifest import Manifest
from vlm_export.runtime.backends.trt import ENGINE_KEY, INSTALL_HINT

logger = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
DEFAULT_MAX_BATCH = 1
DEFAULT_MAX_IMAGES = 4
DEFAULT_MAX_SEQ_LEN = 4096
# A manifest limit above this (usually max_position_embeddings) is not used for engines unless asked for.
MAX_IMPLICIT_SEQ_LEN = 32768
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPS_MODES = ("auto", "decompose")
STRONGLY_TYPED_ONLY = (11, 0)  # TensorRT 11 removed BuilderFlag.FP16/BF16 (weakly typed builds)


class EngineBuildError(VLMExportError):
    """Engines cannot be built (TensorRT missing, unsupported ops, bad limits, a failed build)."""


def require_tensorrt() -> Any:
    """The tensorrt module, or a one-line error saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildError(
            f"building TensorRT engines needs TensorRT, which is not installed: {INSTALL_HINT}"
        ) from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise EngineBuildError(
            f"building TensorRT engines needs polygraphy, which is not installed: {INSTALL_HINT}"
        ) from None
    return tensorrt


def resolve_limits(
    manifest: Manifest,
    *,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    max_image_pixels: int | None = None,
    max_images: int | None = None,
) -> EngineLimits:
    """Engine limits: the given values, else the manifest's (with finite defaults where it has none)."""
    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-seq-len", max_seq_len),
        ("--max-image-pixels", max_image_pixels),
        ("--max-images", max_images),
    ):
        if value is not None and value < 1:
            raise EngineBuildError(f"{flag} must be a positive integer, got {value}")
    limits = manifest.limits
    batch = max_batch or limits.max_batch
    if batch is None:
        batch = DEFAULT_MAX_BATCH
        logger.warning("engines are built for batch size %d; pass --max-batch to allow larger batches", batch)
    seq = max_seq_len or limits.max_seq_len
    if max_seq_len is None and (seq is None or seq > MAX_IMPLICIT_SEQ_LEN):
        logger.warning(
            "engines are built for %d tokens (prompt + generated) instead of the model's %s; pass --max-seq-len to "
            "change it",
            DEFAULT_MAX_SEQ_LEN,
            seq,
        )
        seq = DEFAULT_MAX_SEQ_LEN
    previous = manifest.engines.get(ENGINE_KEY, {}).get("limits", {})
    images = max_images or previous.get("max_images") or DEFAULT_MAX_IMAGES
    pixels = max_image_pixels or limits.max_image_pixels
    return EngineLimits(max_batch=batch, max_seq_len=seq, max_image_pixels=pixels, max_images=images)


def resolve_precision(precision: str, export_dtype: str, trt_version: str = "10.15") -> tuple[str, bool]:
    """(engine precision, strongly typed). `auto` follows the ONNX types exactly (strongly typed); fp16/bf16 on a
    float32 export let TensorRT choose lower-precision kernels (weakly typed, I/O stays float32). TensorRT 11
    builds strongly typed networks only (its FP16/BF16 builder flags are gone): there the ONNX types decide."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    native = {"float32": "fp32", "float16": "fp16"}.get(export_dtype)
    if native is None:
        raise EngineBuildError(f"this export's dtype {export_dtype} has no TensorRT build rule; re-export it")
    if precision in ("auto", native):
        return native, True
    if native == "fp32" and parse_version(trt_version) >= STRONGLY_TYPED_ONLY:
        hint = "re-export with --dtype float16" if precision == "fp16" else "bf16 exports are not supported"
        raise EngineBuildError(
            f"TensorRT {trt_version} builds only strongly typed engines, whose precision is the export's "
            f"({export_dtype}): for --precision {precision} {hint}, or build with --precision auto"
        )
    if native == "fp32":
        return precision, False
    raise EngineBuildError(
        f"--precision {precision} needs a float32 export (this one is {export_dtype}); re-export with --dtype float32"
    )


def polygraphy_profiles(specs: list[ProfileSpec]) -> list[Any]:
    """polygraphy `Profile`s (min/opt/max per input) for CreateConfig."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for spec in specs:
        profile = Profile()
        for name, (low, opt, high) in spec.shapes.items():
            profile.add(name, min=tuple(low), opt=tuple(opt), max=tuple(high))
        profiles.append(profile)
    return profiles


def _build_one(
    onnx_path: Path,
    engine_path: Path,
    specs: list[ProfileSpec],
    precision: str,
    strongly_typed: bool,
    timing_cache: Path,
    workspace_gb: float | None,
    opt_level: int | None,
) -> None:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    # TensorRT 11 networks are always strongly typed; its STRONGLY_TYPED creation flag is deprecated and ignored
    typed_flag = strongly_typed and parse_version(trt.__version__) < STRONGLY_TYPED_ONLY
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed_flag)
    pools = {trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))} if workspace_gb else None
    config = CreateConfig(
        fp16=precision == "fp16" and not strongly_typed,
        bf16=precision == "bf16" and not strongly_typed,
        profiles=polygraphy_profiles(specs),
        load_timing_cache=str(timing_cache),
        memory_pool_limits=pools,
        builder_optimization_level=opt_level,
    )
    try:
        data = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()
    except Exception as error:  # polygraphy raises PolygraphyException after logging TensorRT's errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EngineBuildError(f"TensorRT could not build {engine_path.name}: {first}") from None
    partial = engine_path.with_name(engine_path.name + ".partial")
    partial.write_bytes(bytes(data))
    os.replace(partial, engine_path)


def engine_metadata(
    trt_version: str, compute_capability: str, precision: str, strongly_typed: bool, limits: EngineLimits
) -> dict[str, Any]:
    """manifest.engines["tensorrt"] without its per-graph entries (what the runtime checks before loading)."""
    return {
        "tensorrt_version": trt_version,
        "compute_capability": compute_capability,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "timing_cache": TIMING_CACHE,
        "limits": asdict(limits),
        "graphs": {},
    }


def engine_entry(engine: str, onnx: str, rewritten: list[str], specs: list[ProfileSpec], seconds: float) -> dict:
    """One graph's engine record: file names, ops rewritten for this TensorRT, every profile's shapes."""
    return {
        "engine": engine,
        "onnx": onnx,
        "rewritten_ops": rewritten,
        "profiles": [spec.to_json() for spec in specs],
        "build_s": round(seconds, 2),
    }


def build_engines(
    folder: str | Path,
    *,
    precision: str = "auto",
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    max_image_pixels: int | None = None,
    max_images: int | None = None,
    graphs: list[str] | None = None,
    ops: str = "auto",
    workspace_gb: float | None = None,
    opt_level: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Build `<graph>.engine` for each graph of an exported folder and record them in its manifest."""
    from tqdm import tqdm

    from vlm_export.exporter.trt_ops import DECOMPOSABLE, check_graph, tensorrt_copy
    from vlm_export.runtime.backends.trt import compute_capability

    folder = Path(folder).expanduser().resolve()
    manifest = Manifest.load(folder)
    trt = require_tensorrt()
    if ops not in OPS_MODES:
        raise EngineBuildError(f"--ops must be one of {', '.join(OPS_MODES)}, got {ops}")
    engine_precision, strongly_typed = resolve_precision(precision, manifest.dtype, trt.__version__)
    if not strongly_typed:
        logger.warning(
            "--precision %s on a %s export builds a weakly typed engine, deprecated since TensorRT 10.15 and gone in "
            "11; a --dtype float16 export with --precision auto gives strongly typed fp16 engines",
            engine_precision,
            manifest.dtype,
        )
    limits = resolve_limits(
        manifest,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_image_pixels=max_image_pixels,
        max_images=max_images,
    )
    names = graphs or list(manifest.graphs)
    unknown = [n for n in names if n not in manifest.graphs]
    if unknown:
        raise EngineBuildError(f"unknown graphs {unknown}; this export has {', '.join(manifest.graphs)}")
    previous = manifest.engines.get(ENGINE_KEY, {})
    meta = engine_metadata(trt.__version__, compute_capability(0), engine_precision, strongly_typed, limits)
    meta["graphs"] = dict(previous.get("graphs", {})) if graphs else {}
    kept = ("tensorrt_version", "precision", "limits")
    if graphs and previous and any(previous.get(k) != meta[k] for k in kept):
        raise EngineBuildError(
            "rebuilding only some graphs needs the same TensorRT version, precision and limits; drop --graph"
        )
    reports = {name: check_graph(folder / manifest.graphs[name].file, trt.__version__) for name in names}
    problems = [f"{name}: {why}" for name, r in reports.items() for why in [*r.blocking.values(), *r.restrictions]]
    if problems:  # before building anything
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot import this export: {'; '.join(problems)}")
    rewrites = {}
    for name, report in reports.items():
        present = {op for domain, op in report.ops if domain in ("", "ai.onnx")}
        rewrites[name] = report.decomposable if ops == "auto" else sorted(present & set(DECOMPOSABLE))
    # an in-place KVCacheUpdate needs a fixed capacity; a rewritten (out-of-place) TensorScatter grows with the request
    decoder_rewrite = rewrites.get("decoder", previous.get("graphs", {}).get("decoder", {}).get("rewritten_ops", []))
    static_cache = "TensorScatter" not in decoder_rewrite
    profiles = engine_profiles(manifest, folder, limits, static_cache=static_cache)
    if not graphs and ENGINE_KEY in manifest.engines:  # a failed rebuild must not leave stale engines described
        del manifest.engines[ENGINE_KEY]
        manifest.save(folder)
    timing_cache = folder / TIMING_CACHE
    for name in tqdm(names, desc="engines", unit="graph", disable=not progress, leave=False):
        onnx_path = folder / manifest.graphs[name].file
        source = onnx_path.with_name(f"{name}.trt.onnx")
        capacity = limits.max_seq_len if name == "decoder" and static_cache else None
        copy = tensorrt_copy(onnx_path, source, rewrites[name], cache_capacity=capacity)
        rewritten = copy.rewritten
        if rewritten:
            logger.info("%s: rewrote %s into primitive ONNX ops for TensorRT %s", name, rewritten, trt.__version__)
        if not copy.changed:
            source = onnx_path
        engine_path = folder / f"{name}.engine"
        start = time.perf_counter()
        try:
            _build_one(
                source,
                engine_path,
                profiles[name],
                engine_precision,
                strongly_typed,
                timing_cache,
                workspace_gb,
                opt_level,
            )
        finally:
            if source != onnx_path:
                source.unlink(missing_ok=True)
        meta["graphs"][name] = engine_entry(
            engine_path.name, onnx_path.name, rewritten, profiles[name], time.perf_counter() - start
        )
        logger.info("%s: built %s in %.1f s", name, engine_path.name, meta["graphs"][name]["build_s"])
    manifest.limits = limits.to_limits()
    manifest.engines[ENGINE_KEY] = meta
    manifest.save(folder)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-export build-engines",
        description="Build TensorRT engines for a folder written by vlm-export, on the machine that will run them "
        "(engines are tied to the TensorRT version and the GPU). Needs tensorrt and polygraphy, not torch.",
    )
    parser.add_argument("folder", type=Path, help="folder written by vlm-export")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: the export's dtype, strongly typed (default); fp16/bf16 on a float32 export: TensorRT picks "
        "lower-precision kernels",
    )
    parser.add_argument("--max-batch", type=int, help="largest batch (default: the manifest's, else 1)")
    parser.add_argument("--max-seq-len", type=int, help=f"longest prompt + generated tokens (default: the manifest's "
                        f"if at most {MAX_IMPLICIT_SEQ_LEN}, else {DEFAULT_MAX_SEQ_LEN})")  # fmt: skip
    parser.add_argument("--max-image-pixels", type=int, help="pixel budget per image (default: the manifest's)")
    parser.add_argument(
        "--max-images", type=int, help=f"images per request, over the whole batch (default {DEFAULT_MAX_IMAGES})"
    )
    parser.add_argument("--graph", action="append", dest="graphs", help="build only this graph (repeatable)")
    parser.add_argument(
        "--ops",
        choices=OPS_MODES,
        default="auto",
        help="auto: rewrite only ops this TensorRT cannot import; decompose: always rewrite Attention, "
        "RMSNormalization, RotaryEmbedding into primitive ops",
    )
    parser.add_argument(
        "--check-ops",
        metavar="TRT_VERSION",
        help="only report, without TensorRT installed, whether TensorRT TRT_VERSION (e.g. 10.3 for JetPack 6) can "
        "import each graph and which ops would be rewritten; exit status 1 if one cannot be imported",
    )
    parser.add_argument("--workspace-gb", type=float, help="TensorRT workspace limit in GiB")
    parser.add_argument("--opt-level", type=int, choices=range(6), help="TensorRT builder optimization level (0-5)")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def summary(manifest: Manifest, folder: Path) -> str:
    meta = manifest.engines[ENGINE_KEY]
    lines = [
        f"built TensorRT {meta['tensorrt_version']} engines ({meta['precision']}, compute capability "
        f"{meta['compute_capability']}) in {folder}",
        f"  limits: {meta['limits']}",
    ]
    for name, entry in meta["graphs"].items():
        rewritten = f", rewrote {', '.join(entry['rewritten_ops'])}" if entry["rewritten_ops"] else ""
        lines.append(f"  {name:<16}{entry['engine']:<24}{len(entry['profiles'])} profile(s){rewritten}")
    lines.append(f'run it: vlm-run {folder} --backend trt --prompt "..." [--image PATH] [--video PATH]')
    return "\n".join(lines)


def check_ops(folder: Path, trt_version: str) -> tuple[bool, str]:
    """(importable, report) of every graph of `folder` for TensorRT `trt_version`, without TensorRT."""
    from vlm_export.exporter.trt_ops import check_graph, documented_opset

    manifest = Manifest.load(folder)
    documented = documented_opset(parse_version(trt_version))
    ok, lines = True, [f"TensorRT {trt_version} ONNX parser (documents opsets up to {documented}) vs {folder}:"]
    for name, info in manifest.graphs.items():
        report = check_graph(folder / info.file, trt_version)
        problems = [*report.blocking.values(), *report.restrictions]
        ok = ok and not problems
        rewritten = f"rewrites {', '.join(report.decomposable)}" if report.decomposable else "imports as is"
        status = "CANNOT import: " + "; ".join(problems) if problems else rewritten
        lines.append(f"  {name:<16}opset {report.opset}, {len(report.ops)} op types: {status}")
    return ok, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.check_ops:
        try:
            ok, report = check_ops(args.folder.expanduser().resolve(), args.check_ops)
        except (VLMExportError, ValueError) as error:
            print(f"vlm-export build-engines: error: {error}", file=sys.stderr)
            return 1
        print(report)
        return 0 if ok else 1
    try:
        manifest = build_engines(
            args.folder,
            precision=args.precision,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_image_pixels=args.max_image_pixels,
            max_images=args.max_images,
            graphs=args.graphs,
            ops=args.ops,
            workspace_gb=args.workspace_gb,
            opt_level=args.opt_level,
            progress=not args.quiet,
        )
    except VLMExportError as error:
        print(f"vlm-export build-engines: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(summary(manifest, args.folder.expanduser().resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
