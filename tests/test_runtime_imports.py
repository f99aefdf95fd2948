"""The runtime must run on a Jetson with numpy, pillow, av, tokenizers, jinja2 and a backend: no torch, no
transformers — checked in a fresh interpreter, since this test session itself has both loaded."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "vlm_export.runtime",
    "vlm_export.runtime.pipeline",
    "vlm_export.runtime.cli",
    "vlm_export.runtime.generation",
    "vlm_export.runtime.families.qwen2_vl.family",
    "vlm_export.runtime.families.qwen3_vl.family",
    "vlm_export.runtime.families.llava_onevision.family",
    "vlm_export.runtime.backends.ort",
    "vlm_export.manifest",
    # `vlm-run verify` and what it runs (golden files, comparison, report)
    "vlm_export.verification.run_cli",
    "vlm_export.verification.golden",
    "vlm_export.verification.cases",
    "vlm_export.verification.observe",
    "vlm_export.verification.compare",
    "vlm_export.verification.report",
    "vlm_export.verification.thresholds",
]


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        f"for name in {MODULES!r}: __import__(name)\n"
        "from vlm_export.runtime import VLMPipeline\n"
        "from vlm_export.runtime.families import runtime_family_for\n"
        "import vlm_export.runtime.families.qwen2_vl.family\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"runtime imported {result.stdout.strip()}"
