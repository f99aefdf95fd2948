"""Running cases through our runtime and reporting them: one line per case and stage, PASSED / FAILED, a JSON
report written beside the export's graphs so the proof ships with it (torch-free)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm_export.errors import VLMExportError
from vlm_export.verification.compare import CaseComparison, CaseResult, Stage
from vlm_export.verification.golden import REPORT_DIR, Conversation, Reference
from vlm_export.verification.observe import RuntimeObserver
from vlm_export.verification.thresholds import Thresholds

logger = logging.getLogger(__name__)


@dataclass
class VerifyCase:
    name: str
    description: str
    conversations: list[Conversation]
    reference: Reference


@dataclass
class VerifyReport:
    command: str
    export: str
    backend: str
    reference: dict[str, Any]
    thresholds: Thresholds
    cases: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case.passed for case in self.cases)

    def header(self) -> list[str]:
        made = ", ".join(f"{k} {v}" for k, v in self.reference.items() if k != "description")
        return [
            f"{self.command} {self.export} (backend {self.backend})",
            f"reference: {self.reference.get('description', '')} ({made})",
            f"limits: {self.thresholds.describe()}",
            f"{'case':<15} {'stage':<15} {'result':<6} measured",
        ]

    @staticmethod
    def case_lines(case: CaseResult) -> list[str]:
        results = {True: "PASS", False: "FAIL", None: "info"}
        return [f"{case.name:<15} {s.stage:<15} {results[s.passed]:<6} {s.measured}" for s in case.stages]

    def summary(self) -> list[str]:
        out = [f"note: {note}" for note in self.notes]
        checks = sum(stage.passed is not None for case in self.cases for stage in case.stages)
        if self.passed:
            out.append(f"PASSED: {len(self.cases)} cases, {checks} checks in {self.seconds:.1f} s")
        else:
            failed = [case for case in self.cases if not case.passed]
            first = failed[0].first_failure if failed else None
            where = f"; first divergence: {failed[0].name} / {first.stage}: {first.measured}" if first else ""
            out.append(f"FAILED: {len(failed)} of {len(self.cases)} cases{where}")
        return out

    def lines(self) -> list[str]:
        return [*self.header(), *(line for case in self.cases for line in self.case_lines(case)), *self.summary()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "export": self.export,
            "backend": self.backend,
            "passed": self.passed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reference": self.reference,
            "thresholds": self.thresholds.to_dict(),
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
            "cases": [
                {
                    "name": case.name,
                    "description": case.description,
                    "passed": case.passed,
                    "stages": [asdict(stage) for stage in case.stages],
                }
                for case in self.cases
            ],
        }

    def write(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1, default=_plain) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    def write_into_export(self, folder: Path, source: str) -> Path | None:
        """The report as `verification/<source>-<backend>.json` inside the export; None (with a warning) when the
        folder is read-only."""
        path = Path(folder) / REPORT_DIR / f"{source}-{self.backend}.json"
        try:
            self.write(path)
        except OSError as error:
            logger.warning("could not write the report into the export (%s); use --json PATH", error.strerror)
            return None
        return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run_cases(
    pipe: Any,
    cases: list[VerifyCase],
    thresholds: Thresholds,
    new_tokens: int,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Each case through our runtime, compared stage by stage with its reference."""
    observer = RuntimeObserver(pipe)
    eos = list(pipe.settings().eos_token_ids)
    results = []
    for case in cases:
        start = time.perf_counter()
        result = CaseResult(case.name, case.description)
        try:
            observation = observer.observe(case.conversations, new_tokens)
            comparison = CaseComparison(
                case.reference,
                observation,
                thresholds,
                forced=lambda tokens, o=observation: observer.forced(o, tokens),
                decode=pipe.tokenizer.decode,
                eos_ids=eos,
            )
            result.stages = comparison.stages()
        except VLMExportError as error:
            result.stages = [Stage("runtime", False, f"error: {error}")]
        logger.debug("case %s: %.1f s", case.name, time.perf_counter() - start)
        results.append(result)
        if on_case is not None:
            on_case(result)
    return results


def run_and_report(
    report: VerifyReport,
    pipe: Any,
    cases: list[VerifyCase],
    new_tokens: int,
    *,
    json_path: Path | None,
    export_dir: Path | None,
    source: str,
    start: float,
) -> int:
    """Print the header, each case's lines as it finishes, then the summary; write the JSON report (to `json_path`
    and into `export_dir`); returns the exit status (0 PASSED, 1 FAILED)."""
    print("\n".join(report.header()), flush=True)

    def show(case: CaseResult) -> None:
        print("\n".join(report.case_lines(case)), flush=True)

    report.cases = run_cases(pipe, cases, report.thresholds, new_tokens, on_case=show)
    report.seconds = time.perf_counter() - start
    if json_path is not None:
        try:
            report.write(json_path)
        except OSError as error:
            raise VLMExportError(f"cannot write --json {json_path}: {error.strerror or error}") from None
    if export_dir is not None:
        report.write_into_export(export_dir, source)
    print("\n".join(report.summary()), flush=True)
    return 0 if report.passed else 1
