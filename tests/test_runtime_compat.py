"""Every family's default export gives transformers' greedy tokens on the decoder form the installed onnxruntime
loads, and (onnxruntime >= 1.25) on the opset-23 form too; an int4 export gives the tokens of the default form on
the main test run's onnxruntime. Torch-free: the transformers tokens come from the
`field_cases` fixture, so tools/check_runtime_compat.sh runs this file again in a venv with only the runtime's
dependencies and onnxruntime 1.23.2, on the exports and tokens the main test run wrote."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from vlm_export.runtime.graph_forms import parse_version
from vlm_export.testing.field_cases import read_cases, run_case

pytestmark = pytest.mark.field

EXPORTS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "qwen2_5_vl_int4")
IN_PLACE_FROM = (1, 25)  # first onnxruntime with a TensorScatter kernel (vlm_export/exporter/decoder_forms.py)


@pytest.mark.parametrize("form", ["installed", "opset23"])
@pytest.mark.parametrize("export", EXPORTS)
def test_decoder_forms_give_reference_tokens(field_cases, export, form, monkeypatch):
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.ort import OrtCpuBackend

    installed = parse_version(ort.__version__)
    if form == "opset23":
        if installed < IN_PLACE_FROM:
            pytest.skip(f"onnxruntime {ort.__version__} loads the opset-23 form anyway (the 'installed' case)")
        monkeypatch.setattr(OrtCpuBackend, "onnxruntime_version", "1.23.2")
    entry = read_cases(field_cases)[export]
    pipe = VLMPipeline.from_pretrained(field_cases / entry["export"], backend="ort-cpu")
    chosen = pipe.graph_forms["decoder"]
    if form == "installed" and installed >= IN_PLACE_FROM:
        assert (chosen.file, chosen.opset, chosen.in_place_cache) == ("decoder.onnx", 24, True)
    else:
        assert (chosen.file, chosen.opset, chosen.in_place_cache) == ("decoder.opset23.onnx", 23, False)
    assert pipe.generator.in_place_cache is chosen.in_place_cache
    for case, data in entry["cases"].items():
        assert run_case(pipe, field_cases, data["conversations"]) == data["token_ids"], f"{case}: tokens differ"


@pytest.mark.parametrize("export", EXPORTS[:4])
def test_vlm_run_verify_passes_on_the_installed_onnxruntime(field_cases, export, capsys):
    """`vlm-run verify` against the golden cases each export carries (float32: transformers' exact tokens), here
    and in the runtime-only venv on onnxruntime 1.23.2 (the opset-23 decoder form)."""
    from vlm_export.runtime.cli import main

    folder = field_cases / read_cases(field_cases)[export]["export"]
    code = main(["verify", str(folder), "--no-write"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1].startswith("PASSED: 5 cases")
