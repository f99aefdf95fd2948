"""Golden cases and the two verify commands (issue 18): every tiny export carries golden cases; `vlm-run verify`
(torch-free) and `vlm-export verify` (transformers) pass on every family, fail at the first stage that diverges on
a damaged export, and say how to add golden cases to an export without them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"]
STAGES = ["prompt ids", "preprocessing", "rope index", "vision", "merge", "prefill logits", "step logits", "tokens"]


def _run_verify(argv: list[str], capsys) -> tuple[int, str, str]:
    from vlm_export.runtime.cli import main

    code = main(["verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _linked_copy(source: Path, target: Path) -> Path:
    """A copy of an export whose files are hard links (cheap); `_own` makes one file a real copy before a change,
    so the session's export is never modified through a link."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def _own(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _damage_decoder_layer(export: Path) -> str:
    """Flip an exponent bit in the first 64 values of a decoder layer weight (not the lm_head, the largest tensor)."""
    model = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    external = []
    for tensor in model.graph.initializer:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info:
            external.append((int(np.prod(tensor.dims)), int(info.get("offset", 0)), tensor.name, info["location"]))
    external.sort()
    _, offset, name, location = next(item for item in external if item[0] >= 64 * 64)  # a layer projection
    data = _own(export / location)
    with data.open("r+b") as handle:
        handle.seek(offset)
        values = np.frombuffer(handle.read(256), dtype=np.uint8) ^ np.uint8(0x40)
        handle.seek(offset)
        handle.write(values.tobytes())
    return name


def _stage_results(report: dict) -> list[tuple[str, str, bool | None]]:
    return [(case["name"], stage["stage"], stage["passed"]) for case in report["cases"] for stage in case["stages"]]


# ------------------------------------------------------------------------------------------ golden files
@pytest.mark.parametrize("family", FAMILIES)
def test_every_export_carries_small_golden_cases(family, request):
    from vlm_export.exporter.output_folder import foreign_files

    exported = request.getfixturevalue(f"exported_{family}")
    golden = json.loads((exported / "manifest.json").read_text())["golden"]
    assert golden["producer"]["transformers"] and golden["producer"]["vlm_export"]
    assert golden["producer"]["dtype"] == "float32"
    expected = ["text_only", "image_odd_size", "two_images", "video", "batch_padded"]
    assert golden["cases"] == expected
    files = [golden["cases_file"], golden["arrays_file"], *golden["media"]]
    assert all((exported / name).is_file() for name in files)
    size = sum((exported / name).stat().st_size for name in files)
    assert size < 2_000_000, f"golden cases take {size} bytes"
    assert foreign_files(exported) == [], "an export with golden cases must stay replaceable by --overwrite"


def test_golden_file_names_cannot_leave_the_export(exported_qwen2_5_vl, tmp_path):
    from vlm_export.errors import ManifestError
    from vlm_export.verification.golden import GoldenSet

    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "copy")
    cases = _own(copy / "golden" / "cases.json")
    document = json.loads(cases.read_text())
    document["cases"][1]["conversations"][0][0]["content"][0]["path"] = "../../manifest.json"
    cases.write_text(json.dumps(document))
    section = json.loads((copy / "manifest.json").read_text())["golden"]
    with pytest.raises(ManifestError, match="not a plain file name inside the export folder"):
        GoldenSet.load(copy, section)
    with pytest.raises(ManifestError, match="not a plain file name inside the export folder"):
        GoldenSet.load(copy, {**section, "arrays_file": "/etc/hostname"})


# ----------------------------------------------------------------------------------------- vlm-run verify
@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_run_verify_passes_on_every_family(family, request, tmp_path, capsys):
    exported = request.getfixturevalue(f"exported_{family}")
    report_path = tmp_path / "report.json"
    code, out, err = _run_verify([str(exported), "--no-write", "--json", str(report_path)], capsys)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[-1].startswith("PASSED: 5 cases")
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["thresholds"]["exact"]
    results = _stage_results(report)
    assert all(passed for _, _, passed in results)
    for case in ("image_odd_size", "two_images", "video", "batch_padded"):  # media cases run every stage
        stages = [stage for name, stage, _ in results if name == case]
        assert [s for s in STAGES if s in stages] == STAGES, (case, stages)
    tokens = next(
        s for c in report["cases"] for s in c["stages"] if c["name"] == "text_only" and s["stage"] == "tokens"
    )
    assert tokens["values"]["equal"] == 16


def test_vlm_run_verify_needs_no_torch(exported_qwen3_vl, tmp_path):
    """torch and transformers made unimportable in a fresh interpreter: the command still runs and passes."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None  # import torch -> ImportError\n"
        "from vlm_export.runtime.cli import main\n"
        f"rc = main(['verify', {str(exported_qwen3_vl)!r}, '--no-write', '--case', 'two_images'])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') and sys.modules[m]]\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("PASSED: 1 cases")


def test_damaged_decoder_fails_at_the_first_decoder_stage(exported_qwen2_5_vl, tmp_path, capsys):
    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "damaged")
    _damage_decoder_layer(copy)
    code, out, _ = _run_verify([str(copy), "--case", "image_odd_size"], capsys)
    assert code == 1
    assert out.splitlines()[-1].startswith("FAILED: 1 of 1 cases; first divergence: image_odd_size / prefill logits")
    report = json.loads((copy / "verification" / "golden-ort-cpu.json").read_text())  # written into the export
    stages = {stage: passed for _, stage, passed in _stage_results(report)}
    assert all(stages[s] for s in ("prompt ids", "preprocessing", "rope index", "vision", "merge"))
    assert stages["prefill logits"] is False and stages["tokens"] is False
    from vlm_export.exporter.output_folder import foreign_files

    assert foreign_files(copy) == [], "the report the command writes is part of the export"


def test_a_logit_that_jumps_outside_the_kept_top_k_is_caught(exported_qwen2_5_vl, tmp_path, capsys):
    """The golden files keep transformers' top 10 logits per step; one lm_head row blown up elsewhere in the
    vocabulary must still fail the logits (not only the tokens)."""
    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "lm_head")
    data = _own(copy / "decoder.onnx.data")
    row = 40000  # the lm_head [hidden, vocab] is stored first: element (i, row) sits at 4 * (i * vocab + row)
    text = json.loads((copy / "manifest.json").read_text())["text"]
    vocab, hidden = text["vocab_size"], text["hidden_size"]
    with data.open("r+b") as handle:
        for i in range(hidden):  # the token's logit becomes 1000x what it was, of either sign from step to step
            handle.seek(4 * (i * vocab + row))
            value = np.frombuffer(handle.read(4), dtype=np.float32)[0]
            handle.seek(4 * (i * vocab + row))
            handle.write(np.float32(value * 1000).tobytes())
    code, out, _ = _run_verify([str(copy), "--no-write", "--case", "text_only"], capsys)
    assert code == 1
    last = out.splitlines()[-1]
    assert "text_only / prefill logits" in last or "text_only / step logits" in last, last
    assert f"token {row}" in out


def test_vlm_run_verify_on_tensorrt_engines(exported_qwen2_5_vl, tmp_path, capsys):
    """The trt backend (on the CPU stand-in for TensorRT that runs the engines' ONNX graphs within their profiles):
    float32 engines are held to agreement, as TensorRT may use TF32; a padded batch and two images in one request."""
    from vlm_export.exporter.engines import build_engines
    from vlm_export.testing.fake_tensorrt import fake_tensorrt

    folder = tmp_path / "export"
    shutil.copytree(exported_qwen2_5_vl, folder)
    with fake_tensorrt():
        build_engines(folder, progress=False, max_batch=2, max_seq_len=160, max_images=2)
        code, out, err = _run_verify(
            [str(folder), "--backend", "trt", "--case", "two_images", "--case", "batch_padded"], capsys
        )
    assert code == 0, out + err
    assert "limits: tensorrt-fp32: teacher-forced top-1 >= 0.9" in out
    assert out.count("agreement       PASS   teacher-forced top-1 1.000") == 2
    assert json.loads((folder / "verification" / "golden-trt.json").read_text())["backend"] == "trt"


def test_export_without_golden_cases_says_how_to_add_them(exported_qwen2_5_vl, tmp_path, capsys):
    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "old")
    manifest = _own(copy / "manifest.json")
    data = json.loads(manifest.read_text())
    del data["golden"]
    manifest.write_text(json.dumps(data))
    code, out, err = _run_verify([str(copy)], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"vlm-export verify --write-golden {copy}" in err and "re-export" in err


def test_golden_cases_are_skipped_with_a_hint_when_transformers_would_run_on_demand(
    tiny_qwen2_5_vl_dir, tmp_path, monkeypatch, caplog
):
    """By default golden cases are written only when transformers' model loads in memory (on demand they cost
    ~40 minutes at 7B); the export says how to add them. `golden="always"` writes them on demand anyway."""
    import vlm_export.exporter.export as export_module
    import vlm_export.verification.reference as reference_module
    from vlm_export.exporter.export import export_model

    monkeypatch.setattr(export_module, "loads_in_memory", lambda parameters: False)
    monkeypatch.setattr(reference_module, "loads_in_memory", lambda parameters: False)
    skipped = export_model(str(tiny_qwen2_5_vl_dir), tmp_path / "skipped", progress=False, verify="reduced")
    assert not skipped.manifest.golden and not (tmp_path / "skipped" / "golden").exists()
    assert f"vlm-export verify --write-golden {tmp_path / 'skipped'}" in caplog.text
    forced = export_model(
        str(tiny_qwen2_5_vl_dir), tmp_path / "forced", progress=False, verify="reduced", golden="always"
    )
    assert forced.manifest.golden["producer"]["weights"].startswith("on demand")


def test_approximate_profiles_use_agreement(exported_qwen2_5_vl, tmp_path, capsys):
    """An int8-quantized export is held to teacher-forced agreement, not exact tokens (here its graphs are still the
    float32 ones, so it agrees fully); a damaged decoder fails the agreement."""
    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "int8")
    manifest = _own(copy / "manifest.json")
    data = json.loads(manifest.read_text())
    data["quantization"] = {"scheme": "int8", "graphs": ["decoder"]}
    manifest.write_text(json.dumps(data))
    code, out, _ = _run_verify([str(copy), "--no-write", "--case", "two_images"], capsys)
    assert code == 0, out
    assert "limits: int8: teacher-forced top-1 >= 0.8" in out
    assert "agreement       PASS   teacher-forced top-1 1.000" in out
    _damage_decoder_layer(copy)
    code, out, _ = _run_verify([str(copy), "--no-write", "--case", "two_images"], capsys)
    assert code == 1 and "agreement       FAIL" in out


def test_thresholds_follow_precision_and_backend():
    from vlm_export.manifest import Manifest
    from vlm_export.verification.thresholds import thresholds_for

    base = {"family": "x", "dtype": "float32", "graphs": {}, "tokens": {}, "text": {}, "vision": {}}
    manifest = Manifest(**base, preprocessing={}, files={})
    assert thresholds_for(manifest, "ort-cpu").exact and thresholds_for(manifest, "ort-cpu").profile == "float32"
    assert thresholds_for(manifest, "ort-cuda").exact
    manifest.engines = {"tensorrt": {"precision": "fp16"}}
    assert thresholds_for(manifest, "trt").profile == "float16" and not thresholds_for(manifest, "trt").exact
    manifest.engines = {"tensorrt": {"precision": "auto"}}
    assert thresholds_for(manifest, "trt").profile == "tensorrt-fp32"
    manifest.quantization = {"scheme": "int4", "graphs": ["decoder", "vision_encoder"]}
    assert thresholds_for(manifest, "ort-cpu").profile == "int4"
    assert thresholds_for(manifest, "ort-cpu", {"min_top1": 0.99, "logits": None}).min_top1 == 0.99
    manifest.quantization = {}
    manifest.dtype = "float16"
    assert thresholds_for(manifest, "ort-cpu").profile == "float16"


# ------------------------------------------------------------------------- each stage catches its own fault
def _shifted_pixels(original):
    def encode(*args, **kwargs):
        visual = original(*args, **kwargs)
        visual.feeds["pixel_values"] = visual.feeds["pixel_values"] + np.float32(0.05)
        return visual

    return encode


def _shifted_positions(original):
    def prefill(*args, **kwargs):
        ids, state = original(*args, **kwargs)
        return ids + 1, state

    return prefill


def _scaled_vision(original):
    def post(outputs, visual):
        outputs = original(outputs, visual)
        return {**outputs, "visual_embeds": outputs["visual_embeds"] * np.float32(1.01)}

    return post


#: A fault injected into one runtime stage (the family method it wraps) and the stage that must fail first.
FAULTS = {
    "encode_media": (_shifted_pixels, "preprocessing"),
    "prefill_positions": (_shifted_positions, "rope index"),
    "postprocess_vision": (_scaled_vision, "vision"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_stage_catches_a_fault_of_its_own(fault, qwen2_5_vl_pipe, exported_qwen2_5_vl, monkeypatch):
    from vlm_export.manifest import Manifest
    from vlm_export.verification.golden import GoldenSet
    from vlm_export.verification.report import VerifyCase, run_cases
    from vlm_export.verification.thresholds import thresholds_for

    wrap, expected = FAULTS[fault]
    family = qwen2_5_vl_pipe.family
    monkeypatch.setattr(family, fault, wrap(getattr(family, fault)))
    manifest = Manifest.load(exported_qwen2_5_vl)
    golden = GoldenSet.load(exported_qwen2_5_vl, manifest.golden)
    case = next(c for c in golden.cases if c.name == "image_odd_size")
    [result] = run_cases(
        qwen2_5_vl_pipe,
        [VerifyCase(case.name, case.description, case.conversations, case.reference)],
        thresholds_for(manifest, "ort-cpu"),
        golden.new_tokens,
    )
    assert result.first_failure is not None and result.first_failure.stage == expected, result.stages


# -------------------------------------------------------------------------------------- vlm-export verify
def _export_verify(argv: list[str], capsys) -> tuple[int, str, str]:
    from vlm_export.exporter.cli import main

    code = main(["verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def user_image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("verify_user") / "photo.jpg"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (41, 59, 3), dtype=np.uint8)).resize((177, 123)).save(path, quality=90)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_export_verify_passes_on_every_family(family, request, tmp_path, capsys, user_image):
    """transformers now (every pixel, embedding and logit) against our runtime on the golden cases plus an added
    case; the golden files agree with the live run."""
    exported = request.getfixturevalue(f"exported_{family}")
    report_path = tmp_path / "report.json"
    argv = [str(exported), "--no-write", "--json", str(report_path), "--image", str(user_image), "--prompt", "What?"]
    code, out, err = _export_verify(argv, capsys)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("PASSED: 6 cases")
    assert "whole vocabulary" in out and "note:" not in out  # the stored golden cases match transformers now
    report = json.loads(report_path.read_text())
    user = next(case for case in report["cases"] if case["name"] == "user")
    assert {s["stage"] for s in user["stages"]} >= {"preprocessing", "vision", "tokens"}


@pytest.mark.slow
def test_vlm_export_verify_fails_on_a_damaged_export(exported_qwen3_vl_moe, tmp_path, capsys):
    copy = _linked_copy(exported_qwen3_vl_moe, tmp_path / "damaged")
    _damage_decoder_layer(copy)
    code, out, _ = _export_verify([str(copy), "--no-write", "--only-added", "--prompt", "Hello there."], capsys)
    assert code == 1
    assert out.splitlines()[-1].startswith("FAILED: 1 of 1 cases; first divergence: user / prefill logits")


@pytest.mark.slow
def test_write_golden_adds_cases_that_vlm_run_verify_then_checks(exported_qwen3_vl, tmp_path, capsys):
    copy = _linked_copy(exported_qwen3_vl, tmp_path / "old")
    manifest = _own(copy / "manifest.json")
    data = json.loads(manifest.read_text())
    del data["golden"]
    manifest.write_text(json.dumps(data))
    shutil.rmtree(copy / "golden")
    code, out, _ = _export_verify([str(copy), "--only-added", "--prompt", "Hi"], capsys)
    assert code == 0 and "note: " in out and "--write-golden" in out  # compares; says vlm-run verify cannot
    code, out, err = _export_verify([str(copy), "--write-golden"], capsys)
    assert code == 0, out + err
    assert (copy / "verification" / "transformers-ort-cpu.json").is_file()
    rewritten = json.loads((copy / "golden" / "cases.json").read_text())
    original = json.loads((exported_qwen3_vl / "golden" / "cases.json").read_text())
    assert [c["tokens"] for c in rewritten["cases"]] == [c["tokens"] for c in original["cases"]]
    code, out, _ = _run_verify([str(copy), "--no-write"], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("PASSED: 5 cases")


def test_vlm_export_verify_errors_are_one_line(exported_qwen2_5_vl, tmp_path, capsys):
    code, _, err = _export_verify([str(tmp_path / "missing")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a folder" in err
    copy = _linked_copy(exported_qwen2_5_vl, tmp_path / "moved")
    manifest = _own(copy / "manifest.json")
    data = json.loads(manifest.read_text())
    data["source_model"] = str(tmp_path / "gone")
    manifest.write_text(json.dumps(data))
    code, _, err = _export_verify([str(copy)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "pass --model" in err
    code, _, err = _export_verify([str(exported_qwen2_5_vl), "--image", str(tmp_path / "nope.png")], capsys)
    assert code == 1 and "nope.png is not a file" in err


# --------------------------------------------------------------------------- transformers at bounded memory
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "llava_onevision"])  # fused experts; a CLIP-style tower
def test_on_demand_weights_give_the_loaded_models_outputs(family, request, tmp_path):
    """transformers with each module's weights read for its own call equals the loaded model, bit for bit."""
    from vlm_export.verification.cases import golden_cases, write_media
    from vlm_export.verification.reference import TransformersReference
    from vlm_export.verification.write import with_media_paths

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    folder = tmp_path
    write_media(folder, video=False)
    case = next(c for c in golden_cases(False, None) if c.name == "image_odd_size")
    conversations = with_media_paths(case.conversations, folder)
    runs = {}
    for weights in ("load", "on-demand"):
        reference = TransformersReference(model_dir, weights)
        runs[weights] = reference.run(conversations, 6, budget=None, top_k=None)
        reference.close()
    loaded, on_demand = runs["load"], runs["on-demand"]
    assert loaded.prompt_ids == on_demand.prompt_ids
    np.testing.assert_array_equal(loaded.tokens, on_demand.tokens)
    np.testing.assert_array_equal(loaded.logits.values, on_demand.logits.values)
    np.testing.assert_array_equal(loaded.vision.values, on_demand.vision.values)
    np.testing.assert_array_equal(loaded.text.values, on_demand.text.values)
