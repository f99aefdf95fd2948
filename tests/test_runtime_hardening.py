"""Export folders, messages and command lines from someone careless or hostile (issue 20): nothing is read outside the
export folder, a malformed export or request is a one-line error, and `vlm-run` behaves at the edges of a shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from vlm_export.errors import InputError, ManifestError


def _vlm_run(*args: str | bytes, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime.cli", *args], capture_output=True, text=True, **kwargs
    )


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-run: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _copy(export: Path, tmp_path: Path) -> Path:
    """A full copy of a session export (hard links would make onnx refuse the original's external data: it takes
    a data file with several links for a hard-link attack)."""
    target = tmp_path / "export"
    shutil.copytree(export, target)
    return target


def _replace(path: Path, content: str | bytes) -> None:
    path.unlink(missing_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    _replace(folder / "manifest.json", json.dumps(data))


def _load(folder: Path):
    from vlm_export.runtime import VLMPipeline

    return VLMPipeline.from_pretrained(folder)


# -- item 2: nothing outside the export folder ----------------------------------------------------------------


def test_chat_template_pointing_outside_is_refused(exported_qwen2_5_vl, tmp_path):
    """The issue's case: chat_template -> /etc/passwd became the prompt and vlm-run exited 0."""
    folder = _copy(exported_qwen2_5_vl, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET {{ messages }}")
    for target in (str(secret), "../secret.txt"):
        _edit_manifest(folder, lambda d, t=target: d["files"].update(chat_template=t))
        with pytest.raises(ManifestError, match=r"outside|not a plain file name"):
            _load(folder)
        line = _one_line_error(_vlm_run(str(folder), "--prompt", "x", "--json"))
        assert "SECRET" not in line
    (folder / "linked.jinja").symlink_to(secret)
    _edit_manifest(folder, lambda d: d["files"].update(chat_template="linked.jinja"))
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "outside the export folder")


def test_graphs_from_another_folder_are_refused(exported_qwen2_5_vl, tmp_path):
    folder = _copy(exported_qwen2_5_vl, tmp_path)
    other = _copy(exported_qwen2_5_vl, tmp_path / "other")
    for name in ("vision_encoder", "embedding", "decoder"):
        _edit_manifest(folder, lambda d, n=name: d["graphs"][n].update(file=f"{other}/{n}.onnx"))
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "export folder")
    _edit_manifest(folder, lambda d: d["graphs"]["decoder"].update(file="../other/export/decoder.onnx"))
    with pytest.raises(ManifestError):
        _load(folder)


# -- item 8: malformed exports are one-line ManifestErrors ------------------------------------------------------


def test_missing_or_broken_export_files(exported_qwen2_5_vl, tmp_path):
    folder = _copy(exported_qwen2_5_vl, tmp_path)
    (folder / "chat_template.jinja").unlink()
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "chat_template file", "missing")
    _replace(folder / "chat_template.jinja", "{% include 'other.jinja' %}")
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "include")
    _replace(folder / "chat_template.jinja", "{% for %}")
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "not valid Jinja")
    _replace(folder / "chat_template.jinja", b"\xff\xfe not utf-8")
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "cannot read the chat template")
    shutil.copy(exported_qwen2_5_vl / "chat_template.jinja", tmp_path / "template")
    _replace(folder / "chat_template.jinja", (tmp_path / "template").read_text())
    for config, needle in (
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"temperature": "hot"}', "temperature"),
    ):
        _replace(folder / "generation_config.json", config)
        _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "generation_config.json", needle)


def test_graph_file_of_the_wrong_kind(exported_qwen2_5_vl, tmp_path):
    folder = _copy(exported_qwen2_5_vl, tmp_path)
    _replace(folder / "decoder.onnx", "this is a text file, not an ONNX graph")
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "decoder.onnx", "not an ONNX model")
    _replace(folder / "decoder.onnx", b"")  # an empty protobuf: ONNX Runtime's own error, named
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "decoder.onnx", "not a valid ONNX model")
    _replace(folder / "decoder.onnx", (exported_qwen2_5_vl / "embedding.onnx").read_bytes())  # another graph
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "decoder.onnx", "is not the graph")


def test_additive_manifest_fields_and_malformed_family_sections(exported_qwen2_5_vl, tmp_path):
    folder = _copy(exported_qwen2_5_vl, tmp_path)

    def add_fields(data):
        data["signature"] = {"sha256": "0" * 64}
        data["limits"]["max_video_frames"] = 64
        data["graphs"]["decoder"]["precision"] = "fp32"

    _edit_manifest(folder, add_fields)
    pipe = _load(folder)
    assert pipe.generate([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason == "length"
    _edit_manifest(folder, lambda d: d["text"].pop("num_layers"))
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "malformed", "num_layers")
    _edit_manifest(folder, lambda d: d["text"].update(num_layers=2, num_kv_heads="two"))
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "malformed")
    _edit_manifest(folder, lambda d: d["text"].update(num_kv_heads=2) or d["preprocessing"].pop("patch_size"))
    _one_line_error(_vlm_run(str(folder), "--prompt", "x"), "patch_size")
    _edit_manifest(folder, lambda d: d["preprocessing"].update(patch_size=14) or d["tokens"].pop("image_token_id"))
    with pytest.raises(ManifestError, match=r"malformed.*image_token_id"):  # found by test_fuzz_runtime
        _load(folder)
    _edit_manifest(folder, lambda d: d["tokens"].update(image_token_id=2**40))
    with pytest.raises(ManifestError, match="malformed"):
        _load(folder)
    _edit_manifest(folder, lambda d: d["tokens"].update(image_token_id=151655) or d["vision"].pop("spatial_merge_size"))
    with pytest.raises(ManifestError, match=r"vision.spatial_merge_size"):  # was a KeyError at the first request
        _load(folder)


# -- item 5: chat templates are bounded -------------------------------------------------------------------------


def test_runaway_chat_template_is_stopped(exported_qwen2_5_vl, tmp_path):
    folder = _copy(exported_qwen2_5_vl, tmp_path)
    _replace(
        folder / "chat_template.jinja",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    )
    _one_line_error(_vlm_run(str(folder), "--prompt", "x", timeout=300), "chat template was stopped")


# -- item 10: requests and command lines at the edges ------------------------------------------------------------


def test_lazy_sessions_load_once_under_concurrent_first_requests():
    from vlm_export.runtime.pipeline import LazySessions

    calls = []

    def slow_loader():
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return object()

    sessions = LazySessions({"vision_encoder": slow_loader})
    barrier = threading.Barrier(8)
    seen = []

    def request():
        barrier.wait()
        seen.append(sessions["vision_encoder"])

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(s) for s in seen}) == 1


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ([{"type": "text", "text": None}], "must be a string, got NoneType"),
        ([{"type": "text", "text": b"bytes"}], "must be a string, got bytes"),
        ([{"type": "text", "text": 42}], "must be a string, got int"),
        ("caf\udce9", "not valid Unicode"),
        ([{"type": "text", "text": "\ud800"}], "not valid Unicode"),
    ],
)
def test_bad_text_is_an_input_error(qwen2_5_vl_pipe, content, needle):
    with pytest.raises(InputError, match=needle):
        qwen2_5_vl_pipe.generate([{"role": "user", "content": content}], max_new_tokens=1)


def test_non_string_role_and_deep_messages(qwen2_5_vl_pipe):
    with pytest.raises(InputError, match="role must be a string"):
        qwen2_5_vl_pipe.generate([{"role": 1, "content": "hi"}], max_new_tokens=1)
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(InputError, match="nest deeper"):
        qwen2_5_vl_pipe.generate([{"role": "user", "content": "hi", "extra": deep}], max_new_tokens=1)


def test_string_content_is_not_dropped_by_llava_onevision(exported_llava_onevision):
    """Its template renders only lists of parts: transformers drops a plain string silently; we pass it as a part."""
    pipe = _load(exported_llava_onevision)
    as_string, _ = pipe.prepare([[{"role": "user", "content": "What is in the picture?"}]])
    as_parts, _ = pipe.prepare([[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}]}]])
    assert as_string == as_parts
    assert pipe.tokenizer.encode("What is in the picture?")[0] in as_string[0]


def test_invalid_utf8_prompt_and_tiny_temperature(exported_qwen2_5_vl):
    result = subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"vlm_export.runtime.cli",
            str(exported_qwen2_5_vl).encode(),
            b"--prompt",
            b"caf\xe9 au lait",
        ],
        capture_output=True,
        text=True,
    )
    _one_line_error(result, "--prompt is not valid UTF-8")
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--prompt", "x", "--temperature", "1e-40"), "temperature")


def test_output_to_a_closed_pipe_exits_quietly(exported_qwen2_5_vl):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlm_export.runtime.cli",
            str(exported_qwen2_5_vl),
            "--prompt",
            "x",
            "--max-new-tokens",
            "8",
            "--greedy",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # like `| head -c 0`: the reader is gone before the first piece
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_fifo_is_refused_as_image_and_video(exported_qwen2_5_vl, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _one_line_error(
        _vlm_run(str(exported_qwen2_5_vl), "--image", str(fifo), "--prompt", "x", timeout=120), "not a regular file"
    )
    _one_line_error(
        _vlm_run(str(exported_qwen2_5_vl), "--video", str(fifo), "--prompt", "x", timeout=120), "not a regular file"
    )


def test_prompt_file(exported_qwen2_5_vl, tmp_path):
    prompt = "Describe the weather in one word. " * 3
    expected = json.loads(
        _vlm_run(str(exported_qwen2_5_vl), "--prompt", prompt, "--json", "--greedy", "--max-new-tokens", "2").stdout
    )
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n", encoding="utf-8")
    from_file = json.loads(
        _vlm_run(
            str(exported_qwen2_5_vl), "--prompt-file", str(path), "--json", "--greedy", "--max-new-tokens", "2"
        ).stdout
    )
    from_stdin = json.loads(
        _vlm_run(
            str(exported_qwen2_5_vl), "--prompt-file", "-", "--json", "--greedy", "--max-new-tokens", "2", input=prompt
        ).stdout
    )
    assert expected["prompt_tokens"] == from_file["prompt_tokens"] == from_stdin["prompt_tokens"]
    assert expected["token_ids"] == from_file["token_ids"] == from_stdin["token_ids"]
    path.write_bytes(b"caf\xe9")
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--prompt-file", str(path)), "not UTF-8")
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--prompt-file", str(tmp_path / "nope.txt")), "cannot read")


def test_decompression_bomb_warning_becomes_a_log_line(tmp_path, monkeypatch, caplog):
    from vlm_export.runtime.image_io import load_image

    path = tmp_path / "big.png"
    PIL.Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the warning threshold only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw warning would fail the test
        with caplog.at_level("WARNING", logger="vlm_export.runtime.image_io"):
            image = load_image(path)
    assert image.size == (40, 40)
    assert "decompression-bomb warning threshold" in caplog.text and len(caplog.records) == 1


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_scales_that_overflow_float32_logits_are_refused(name):
    from vlm_export.runtime.sampling import GenerationSettings, TokenSelector

    for bad in (1e-40, 1e-31, 1e31, float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(InputError, match=name):
            GenerationSettings(do_sample=True, **{name: bad})
    logits = np.full((1, 1000), -3e4, dtype=np.float32)
    logits[0, 7] = 3e4  # extreme but finite
    for edge in (1e-30, 1e30):
        settings = GenerationSettings(do_sample=True, seed=0, **{name: edge})
        assert TokenSelector(settings).select(logits, np.array([[7, 8]])).shape == (1,)


def test_trt_engine_paths_stay_inside_the_folder(exported_qwen2_5_vl, tmp_path):
    """The trt backend reads the engines the manifest names: on the CPU stand-in for TensorRT, an engine path
    leading out of the folder is refused before anything is read (real engines: tests/test_gpu.py)."""
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime import VLMPipeline
    from vlm_export.testing.fake_tensorrt import fake_tensorrt

    folder = _copy(exported_qwen2_5_vl, tmp_path)
    with fake_tensorrt():
        build_engines(folder, progress=False, max_batch=1, max_seq_len=32, max_images=1)
        shutil.copy(folder / "decoder.engine", tmp_path / "outside.engine")
        for engine in ("../outside.engine", str(tmp_path / "outside.engine")):
            _edit_manifest(folder, lambda d, e=engine: d["engines"]["tensorrt"]["graphs"]["decoder"].update(engine=e))
            with pytest.raises(ManifestError, match="TensorRT engine"):
                VLMPipeline.from_pretrained(folder, backend="trt")
        _edit_manifest(folder, lambda d: d["engines"]["tensorrt"]["graphs"]["decoder"].update(engine="decoder.engine"))
        assert (
            VLMPipeline.from_pretrained(folder, backend="trt")
            .generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
            .token_ids
        )


def test_build_engines_reads_no_graph_outside_the_folder(exported_qwen2_5_vl, tmp_path):
    from vlm_export.exporter.engines import check_ops

    folder = _copy(exported_qwen2_5_vl, tmp_path)
    other = _copy(exported_qwen2_5_vl, tmp_path / "other")
    _edit_manifest(folder, lambda d: d["graphs"]["decoder"].update(file=str(other / "decoder.onnx")))
    with pytest.raises(ManifestError, match="export folder"):
        check_ops(folder, "10.3.0")
