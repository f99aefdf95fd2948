"""manifest.json: round trip, and clear refusals of what the runtime cannot use."""

from __future__ import annotations

import json

import pytest

from vlm_export.errors import ManifestError
from vlm_export.manifest import GraphInfo, Manifest, TensorInfo


def _manifest() -> Manifest:
    graph = GraphInfo(
        file="x.onnx",
        inputs=[TensorInfo("input_ids", "int64", ["batch", "sequence"])],
        outputs=[TensorInfo("inputs_embeds", "float32", ["batch", "sequence", 64])],
    )
    return Manifest(
        family="qwen2_5_vl",
        dtype="float32",
        graphs={name: graph for name in ("vision_encoder", "embedding", "decoder")},
        tokens={"image_token_id": 1},
        text={"hidden_size": 64},
        vision={},
        preprocessing={},
        files={"tokenizer": "tokenizer.json"},
    )


def test_round_trip(tmp_path):
    manifest = _manifest()
    manifest.save(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"")
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest


def test_unknown_schema_version_is_refused(tmp_path):
    data = json.loads(_manifest().to_json())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema version 99 is not supported"):
        Manifest.load(tmp_path)


def test_missing_graph_file_and_folder(tmp_path):
    _manifest().save(tmp_path)
    with pytest.raises(ManifestError, match=r"graph file .* is missing"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="not a vlm-export output"):
        Manifest.load(tmp_path / "..")
    with pytest.raises(ManifestError, match="is not a folder"):
        Manifest.load(tmp_path / "nope")


def test_missing_fields(tmp_path):
    data = json.loads(_manifest().to_json())
    del data["tokens"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="missing fields"):
        Manifest.load(tmp_path)
