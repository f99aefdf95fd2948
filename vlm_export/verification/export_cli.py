"""`vlm-export verify DIR`: run transformers (from the checkpoint the export came from) and our runtime on the
export's golden cases and on the user's own inputs, and compare them stage by stage (torch + transformers).

transformers runs first, on every case, and is released before the export's graphs load, so memory holds one
of the two at a time. Its complete outputs are compared (every pixel, embedding and logit), not the samples the
golden files keep; the golden files themselves are checked against the live run too.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import ExportError, VLMExportError
from vlm_export.verification.run_cli import add_threshold_options, golden_section, threshold_overrides

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  vlm-export verify out/q7                           # the golden cases, transformers from manifest.source_model
  vlm-export verify out/q7 --model ./Qwen2.5-VL-7B-Instruct --json report.json
  vlm-export verify out/q7 --image photo.jpg --prompt "Describe it."       # plus a case of your own
  vlm-export verify out/q7 --write-golden            # (re)write the golden cases `vlm-run verify` checks

One line per case and stage: prompt ids, preprocessing (max |diff| of the pixels), rope index (exact), vision
(embedding difference), merge, prefill and per-step logits, greedy tokens (the first divergence with the text
around it). float32 exports must give transformers' exact greedy tokens; float16 and int8/int4 exports are held to
teacher-forced agreement and a logit error. PASSED exits 0, FAILED 1. The report is also written into the export
(verification/transformers-<backend>.json). transformers runs in float32 at full depth: when the model does not
fit in memory each module's weights are read for its own call only (slow, bounded memory).
"""


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.runtime.backends import BACKEND_HELP, BACKENDS
    from vlm_export.verification.reference import WEIGHT_MODES

    parser = argparse.ArgumentParser(
        prog="vlm-export verify",
        description="Compare an export with transformers, stage by stage, on its golden cases and your own inputs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export", type=Path, help="folder written by vlm-export")
    parser.add_argument("--model", help="the checkpoint (folder or hub id) to compare with (default: the manifest's)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help=f"our side's backend: {BACKEND_HELP}")
    parser.add_argument("--image", action="append", default=[], help="add a case with this image (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="add a case with this video (repeatable)")
    parser.add_argument("--prompt", help="the added case's text (default: 'Describe this in detail.')")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=float, help="sample the added videos at this many frames per second")
    frames.add_argument("--num-frames", type=int, help="sample this many frames from each added video")
    parser.add_argument("--only-added", action="store_true", help="check only the case from --image/--video/--prompt")
    parser.add_argument(
        "--write-golden",
        action="store_true",
        help="(re)write the export's golden cases from this transformers run before comparing (for exports made "
        "before golden cases existed, or with --no-golden)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default="auto",
        help="how transformers holds the model: load = all in memory; on-demand = each module's weights read for "
        "its own call (bounded memory, slower); auto = load when it fits (default)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report to PATH")
    parser.add_argument("--no-write", action="store_true", help="do not write the report into the export folder")
    add_threshold_options(parser)
    parser.add_argument("--quiet", action="store_true", help="warnings only (no progress of the transformers run)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "transformers", "httpx", "huggingface_hub", "vlm_export.exporter"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if (args.fps is not None or args.num_frames is not None) and not args.video:
        print("vlm-export verify: error: --fps / --num-frames apply to --video", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except VLMExportError as error:
        print(f"vlm-export verify: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _source_model(args: argparse.Namespace, manifest: Any) -> Path:
    from vlm_export.exporter.model_source import read_model_type, resolve_model_dir
    from vlm_export.graphs.registry import graph_family_for

    model = args.model or manifest.source_model
    if not model:
        raise ExportError("the manifest names no source model; pass --model with the checkpoint it was exported from")
    try:
        model_dir = resolve_model_dir(model)
    except ExportError as error:
        hint = "" if args.model else " (the manifest's source_model; pass --model where the checkpoint lives now)"
        raise ExportError(f"{error}{hint}") from None
    family = graph_family_for(read_model_type(model_dir)).name
    if family != manifest.family:
        raise ExportError(f"{model} is a {family} model but {args.export} holds a {manifest.family} export")
    return model_dir


@dataclass
class PlannedCase:
    name: str
    description: str
    conversations: list[Any]  # media parts with absolute paths
    stored: list[Any] = field(default_factory=list)  # as golden/cases.json keeps them (file names), for --write-golden


def _run(args: argparse.Namespace) -> int:
    from vlm_export.manifest import Manifest
    from vlm_export.verification.golden import GoldenSet, MissingGoldenError

    if args.write_golden and args.only_added:
        raise ExportError("--write-golden writes the golden cases; drop --only-added")
    start = time.perf_counter()
    folder = args.export.expanduser()
    manifest = Manifest.load(folder)
    model_dir = _source_model(args, manifest)
    notes: list[str] = []
    stored: GoldenSet | None = None
    try:
        stored = GoldenSet.load(folder, golden_section(folder, manifest))
    except MissingGoldenError:
        if not args.write_golden:
            notes.append(
                f"{folder} has no golden cases, so `vlm-run verify` cannot check it on a device: add them with "
                f"`vlm-export verify --write-golden {folder}`"
            )
    scratch = Path(tempfile.mkdtemp(prefix="vlm-verify-"))
    try:
        planned = _plan(args, manifest, None if args.write_golden else stored, scratch)
        references, made_by = _transformers_side(model_dir, args.weights, planned)
        if stored is not None and not args.write_golden:
            _check_stored(stored, references, notes)
        if args.write_golden:
            _write_golden(folder, manifest, scratch, planned, references, made_by)
        return _runtime_side(args, folder, manifest, planned, references, made_by, notes, start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _plan(args: argparse.Namespace, manifest: Any, stored: Any, scratch: Path) -> list[PlannedCase]:
    """The export's golden cases (its own files, or fresh ones drawn in `scratch`) and the user's added case."""
    from vlm_export.verification.cases import user_case, write_media
    from vlm_export.verification.write import golden_specs, with_media_paths

    planned: list[PlannedCase] = []
    if not args.only_added and stored is not None:
        planned = [PlannedCase(c.name, c.description, c.conversations) for c in stored.cases]
    elif not args.only_added:
        specs = golden_specs(manifest)
        write_media(scratch, video=any(spec.name == "video" for spec in specs))
        planned = [
            PlannedCase(s.name, s.description, with_media_paths(s.conversations, scratch), s.conversations)
            for s in specs
        ]
    if args.image or args.video or args.prompt is not None:
        for path in [*args.image, *args.video]:
            if not Path(path).expanduser().is_file():
                raise ExportError(f"{path} is not a file")
        options = {k: v for k, v in (("fps", args.fps), ("num_frames", args.num_frames)) if v is not None}
        added = user_case(
            [str(Path(p).expanduser().resolve()) for p in args.image],
            [str(Path(p).expanduser().resolve()) for p in args.video],
            args.prompt,
            options,
        )
        planned.append(PlannedCase(added.name, added.description, added.conversations))
    if not planned:
        raise ExportError("nothing to verify: --only-added needs --image, --video or --prompt")
    return planned


def _transformers_side(model_dir: Path, weights: str, planned: list[PlannedCase]) -> tuple[list[Any], dict[str, Any]]:
    """transformers' complete outputs on every case; the model is released before the export's graphs load."""
    from vlm_export.verification.golden import NEW_TOKENS
    from vlm_export.verification.reference import TransformersReference

    reference = TransformersReference(model_dir, weights)
    try:
        references = []
        for index, case in enumerate(planned, 1):
            logger.info("transformers: case %s (%d of %d)", case.name, index, len(planned))
            references.append(reference.run(case.conversations, NEW_TOKENS, budget=None, top_k=None))
        made_by = reference.describe()
    finally:
        reference.close()
        del reference
        gc.collect()
    return references, made_by


def _check_stored(stored: Any, references: list[Any], notes: list[str]) -> None:
    """The golden files against the live run: different tokens mean another transformers version or checkpoint."""
    for case, now in zip(stored.cases, references, strict=False):
        if case.reference is None:
            continue
        if case.reference.prompt_ids != now.prompt_ids or not np.array_equal(case.reference.tokens, now.tokens):
            notes.append(
                f"golden case {case.name} differs from transformers now (made with transformers "
                f"{stored.producer.get('transformers', '?')}): rewrite it with --write-golden if this checkpoint "
                "and transformers version are the reference"
            )


def _write_golden(
    folder: Path,
    manifest: Any,
    media_dir: Path,
    planned: list[PlannedCase],
    references: list[Any],
    made_by: dict[str, Any],
) -> None:
    """This run's golden cases into the export (media, files, manifest section), replacing earlier ones."""
    from vlm_export.verification.cases import CaseSpec
    from vlm_export.verification.golden import GOLDEN_DIR
    from vlm_export.verification.write import save_golden

    golden = [(case, ref) for case, ref in zip(planned, references, strict=True) if case.stored]
    specs = [CaseSpec(case.name, case.description, case.stored) for case, _ in golden]
    target = folder / GOLDEN_DIR
    try:
        shutil.rmtree(target, ignore_errors=True)  # earlier golden cases, made by vlm-export
        target.mkdir()
        media = sorted(path.name for path in media_dir.iterdir())
        for name in media:
            shutil.copyfile(media_dir / name, target / name)
        manifest.golden = save_golden(folder, specs, [ref for _, ref in golden], media, made_by)
        temporary = folder / f".manifest.json.{os.getpid()}.tmp"
        temporary.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(temporary, folder / "manifest.json")
    except OSError as error:
        raise ExportError(f"cannot write the golden cases into {folder}: {error.strerror or error}") from None
    print(f"wrote {len(specs)} golden cases into {target}", file=sys.stderr)


def _runtime_side(
    args: argparse.Namespace,
    folder: Path,
    manifest: Any,
    planned: list[PlannedCase],
    references: list[Any],
    made_by: dict[str, Any],
    notes: list[str],
    start: float,
) -> int:
    from vlm_export.runtime.pipeline import VLMPipeline
    from vlm_export.verification.golden import NEW_TOKENS
    from vlm_export.verification.report import VerifyCase, VerifyReport, run_and_report
    from vlm_export.verification.thresholds import thresholds_for

    thresholds = thresholds_for(manifest, args.backend, threshold_overrides(args))
    pipe = VLMPipeline.from_pretrained(folder, backend=args.backend)
    report = VerifyReport(
        command="vlm-export verify",
        export=str(folder),
        backend=args.backend,
        reference={"description": "transformers now", **{k: made_by[k] for k in ("transformers", "weights")}},
        thresholds=thresholds,
        notes=notes,
    )
    cases = [VerifyCase(c.name, c.description, c.conversations, r) for c, r in zip(planned, references, strict=True)]
    return run_and_report(
        report,
        pipe,
        cases,
        NEW_TOKENS,
        json_path=args.json,
        export_dir=None if args.no_write else folder,
        source="transformers",
        start=start,
    )
