"""Bad input gets a one-line message that says what and how to fix, from the API and from `vlm-run`."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from vlm_export.errors import InputError, ManifestError


def _vlm_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_export.runtime.cli", *args], capture_output=True, text=True)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-run: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_corrupt_image(exported_qwen2_5_vl, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--image", str(broken), "--prompt", "x"), "broken.jpg")


def test_missing_image_and_folder(exported_qwen2_5_vl, tmp_path):
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--image", str(tmp_path / "nope.png"), "--prompt", "x"))
    _one_line_error(_vlm_run(str(tmp_path / "not-exported"), "--prompt", "x"), "vlm-export")


def test_invalid_sampling_settings(exported_qwen2_5_vl):
    _one_line_error(_vlm_run(str(exported_qwen2_5_vl), "--prompt", "x", "--temperature", "-1"), "temperature")


def test_prompt_longer_than_limit_names_the_flag(qwen2_5_vl_pipe):
    pipe = copy.copy(qwen2_5_vl_pipe)
    pipe.manifest = copy.deepcopy(pipe.manifest)
    pipe.generator = copy.copy(pipe.generator)
    pipe.generator.manifest = pipe.manifest
    pipe.manifest.limits.max_seq_len = 16
    with pytest.raises(InputError, match="--max-seq-len"):
        pipe.generate([{"role": "user", "content": "a long prompt " * 10}], max_new_tokens=2)
    pipe.manifest.limits.max_seq_len = None
    pipe.manifest.limits.max_batch = 1
    conversation = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="--max-batch"):
        pipe.generate([conversation, conversation], max_new_tokens=2)


def test_placeholder_mismatch_and_bad_messages(qwen2_5_vl_pipe, tmp_path):
    with pytest.raises(InputError, match="placeholder"):
        qwen2_5_vl_pipe.generate([{"role": "user", "content": "<|image_pad|> what?"}], max_new_tokens=2)
    with pytest.raises(InputError, match="conversation"):
        qwen2_5_vl_pipe.generate("just a string")
    with pytest.raises(InputError, match="unsupported content type"):
        qwen2_5_vl_pipe.generate([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])


def test_unknown_manifest_version(exported_qwen2_5_vl, tmp_path):
    import json
    import shutil

    from vlm_export.runtime import VLMPipeline

    copy_dir = tmp_path / "copy"
    shutil.copytree(exported_qwen2_5_vl, copy_dir)
    data = json.loads((copy_dir / "manifest.json").read_text())
    data["schema_version"] = 1  # a concatenating-cache export
    (copy_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"schema version 1 .*re-export"):
        VLMPipeline.from_pretrained(copy_dir)
