"""`vlm-run verify DIR`: check an export on this machine's backend against the golden cases stored in it (no torch).

The command a Jetson user runs after `build-engines`: the golden cases hold transformers' outputs on inputs the
exporter made (`vlm_export.verification.golden`), so nothing but the runtime is needed to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from vlm_export.errors import VLMExportError

EPILOG = """\
examples:
  vlm-run verify out/q7                       # ONNX Runtime on the CPU
  vlm-run verify out/q7 --backend trt         # the TensorRT engines built by `vlm-export build-engines`
  vlm-run verify out/q7 --backend ort-cuda --json report.json

Every case prints one line per stage (prompt ids, preprocessing, rope index, vision, merge, prefill logits, step
logits, tokens): the first FAIL says where the export diverges from transformers. float32 graphs on ONNX Runtime
must give transformers' exact greedy tokens; float16 graphs, TensorRT engines and int8/int4 weights are held to
teacher-forced top-1 / top-5 agreement and a logit error instead (floors that catch broken exports; the measured
values are printed). Exit status 0 = PASSED, 1 = FAILED or an error. The report is also written into the export
(verification/golden-<backend>.json).
"""


def add_threshold_options(parser: argparse.ArgumentParser) -> None:
    """--min-top1 / --min-top5 / --max-logit-error: override the profile's limits (shared with vlm-export verify)."""
    group = parser.add_argument_group("limits (defaults depend on the export's precision and the backend)")
    group.add_argument("--min-top1", type=float, help="lowest teacher-forced top-1 agreement that passes")
    group.add_argument("--min-top5", type=float, help="lowest teacher-forced top-5 agreement that passes")
    group.add_argument(
        "--max-logit-error",
        type=float,
        help="largest logit difference that passes: a fraction of the logits' scale (float32) or spread (others)",
    )


def threshold_overrides(args: argparse.Namespace) -> dict[str, float | None]:
    return {"min_top1": args.min_top1, "min_top5": args.min_top5, "logits": args.max_logit_error}


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.runtime.backends import BACKEND_HELP, BACKENDS

    parser = argparse.ArgumentParser(
        prog="vlm-run verify",
        description="Check an export on this machine against the golden cases stored in it (transformers' outputs "
        "on inputs the exporter made); needs no torch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="folder written by vlm-export")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help=f"inference backend: {BACKEND_HELP}")
    parser.add_argument("--case", action="append", default=[], help="check only this golden case (repeatable)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report to PATH")
    parser.add_argument("--no-write", action="store_true", help="do not write the report into the export folder")
    add_threshold_options(parser)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def golden_section(folder: Path, manifest: Any) -> dict[str, Any]:
    """The manifest's `golden` section (read from the JSON too, for manifest classes that drop unknown fields)."""
    section = getattr(manifest, "golden", None)
    if section:
        return section
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    section = data.get("golden") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except VLMExportError as error:
        print(f"vlm-run verify: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from vlm_export.manifest import Manifest
    from vlm_export.runtime.pipeline import VLMPipeline
    from vlm_export.verification.golden import GoldenSet
    from vlm_export.verification.report import VerifyCase, VerifyReport, run_and_report
    from vlm_export.verification.thresholds import thresholds_for

    start = time.perf_counter()
    folder = args.model.expanduser()
    manifest = Manifest.load(folder)
    golden = GoldenSet.load(folder, golden_section(folder, manifest))
    cases = [c for c in golden.cases if not args.case or c.name in args.case]
    unknown = sorted(set(args.case) - {c.name for c in golden.cases})
    if unknown:
        names = ", ".join(c.name for c in golden.cases)
        raise VLMExportError(f"no golden case named {', '.join(unknown)} in {folder} (it has {names})")
    thresholds = thresholds_for(manifest, args.backend, threshold_overrides(args))
    pipe = VLMPipeline.from_pretrained(folder, backend=args.backend)
    made = golden.producer
    report = VerifyReport(
        command="vlm-run verify",
        export=str(folder),
        backend=args.backend,
        reference={
            "description": "golden cases stored at export",
            "transformers": made.get("transformers", "?"),
            "weights": made.get("weights", "?"),
            "made": made.get("created", "?"),
        },
        thresholds=thresholds,
    )
    verify_cases = [VerifyCase(c.name, c.description, c.conversations, c.reference) for c in cases]
    return run_and_report(
        report,
        pipe,
        verify_cases,
        golden.new_tokens,
        json_path=args.json,
        export_dir=None if args.no_write else folder,
        source="golden",
        start=start,
    )
