"""The decoder's forms: what the exporter writes (an opset-23 file beside the default, same weights file, same IO)
and which one the runtime picks for an onnxruntime version (before onnxruntime sees a file it would refuse)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from vlm_export.errors import ManifestError
from vlm_export.manifest import Manifest
from vlm_export.runtime.graph_forms import parse_version, select_forms


def _manifest(forms: list[dict] | None, decoder_opset: str = "24") -> Manifest:
    graphs = {
        name: {"file": f"{name}.onnx", "inputs": [], "outputs": []}
        for name in ("vision_encoder", "embedding", "decoder")
    }
    data = {
        "schema_version": 2,
        "family": "qwen2_5_vl",
        "dtype": "float32",
        "graphs": graphs,
        "tokens": {},
        "text": {},
        "vision": {},
        "preprocessing": {},
        "files": {},
        "producer": {"decoder_opset": decoder_opset},
    }
    if forms is not None:
        data["graph_forms"] = {"decoder": forms}
    return Manifest.from_dict(data)


FORMS = [
    {"file": "decoder.onnx", "opset": 24, "min_onnxruntime": "1.25", "in_place_cache": True},
    {"file": "decoder.opset23.onnx", "opset": 23, "min_onnxruntime": "1.23", "in_place_cache": False},
]


@pytest.mark.parametrize(
    ("version", "file", "in_place"),
    [
        ("1.32.0", "decoder.onnx", True),
        ("1.25.0", "decoder.onnx", True),
        ("1.25.0.dev20260301", "decoder.onnx", True),
        ("1.24.4", "decoder.opset23.onnx", False),
        ("1.23.2", "decoder.opset23.onnx", False),
        ("1.23.0+cu126", "decoder.opset23.onnx", False),
        (None, "decoder.onnx", True),  # TensorRT: engines, built from the default file
    ],
)
def test_the_first_form_the_installed_onnxruntime_meets_is_chosen(version, file, in_place):
    forms = select_forms(_manifest(FORMS), version)
    assert (forms["decoder"].file, forms["decoder"].in_place_cache) == (file, in_place)
    assert forms["embedding"].file == "embedding.onnx" and forms["embedding"].in_place_cache


def test_onnxruntime_older_than_every_form_is_refused_in_one_line():
    with pytest.raises(ManifestError, match=r"needs onnxruntime >= 1\.23, but 1\.22\.1 is installed; upgrade") as error:
        select_forms(_manifest(FORMS), "1.22.1")
    assert "\n" not in str(error.value)


def test_export_from_before_graph_forms_says_to_re_export():
    """No graph_forms: the producer's decoder opset says what it needs (1.23.2 would refuse it)."""
    assert select_forms(_manifest(None), "1.25.1")["decoder"].file == "decoder.onnx"
    with pytest.raises(ManifestError, match=r"needs onnxruntime >= 1\.25, but 1\.23\.2 is installed; re-export"):
        select_forms(_manifest(None), "1.23.2")
    assert select_forms(_manifest(None, decoder_opset="23"), "1.23.2")["decoder"].file == "decoder.onnx"


@pytest.mark.parametrize(
    "entry",
    [
        {"opset": 23},
        {"file": "decoder.onnx", "min_onnxruntime": "new"},
        {"file": "../other/decoder.onnx"},
        {"file": "/etc/decoder.onnx"},
        {"file": "..\\decoder.onnx"},
        "decoder.onnx",
    ],
)
def test_malformed_graph_forms_is_a_manifest_error(entry):
    """Including a file outside the export folder: nothing is read from there."""
    with pytest.raises(ManifestError, match="malformed graph_forms entry of decoder"):
        select_forms(_manifest([entry]), "1.23.2")


def test_parse_version():
    assert parse_version("1.23.2") == (1, 23, 2) and parse_version("1.25.0.dev2026+cu12") == (1, 25, 0)
    assert parse_version("1.24.4") < parse_version("1.25") <= parse_version("1.25.0")


# -- the exporter's side ----------------------------------------------------------------------------------------
def _external_files(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _io(path) -> list[tuple]:
    model = onnx.load(str(path), load_external_data=False)
    return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe"])
def test_export_carries_an_opset23_decoder_sharing_the_weights(family, request):
    exported = request.getfixturevalue(f"exported_{family}")
    forms = json.loads((exported / "manifest.json").read_text())["graph_forms"]["decoder"]
    assert forms == FORMS
    default, older = (exported / form["file"] for form in forms)
    model = onnx.load(str(older), load_external_data=False)
    assert [(o.domain or "", o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 23)]
    ops = {node.op_type for node in model.graph.node}
    assert "TensorScatter" not in ops and "ScatterElements" in ops
    assert _external_files(older) == _external_files(default) == {"decoder.onnx.data"}
    assert _io(older) == _io(default)
    assert older.stat().st_size < 1_000_000  # graph only: the weights stay in decoder.onnx.data
    assert not [p for p in exported.iterdir() if p.name.startswith("decoder") and p.name.endswith(".data") and
                p.name != "decoder.onnx.data"]  # fmt: skip


def test_opset23_decoder_returns_the_cache_as_new_buffers(exported_qwen2_5_vl):
    """The older form's `present` is the `past` with the new positions written, in new buffers (`past` is left as it
    was), and prefill 3 + decode 1 gives the logits of the default form's 4-token prefill."""
    from vlm_export.runtime.backends import create_backend

    manifest = Manifest.load(exported_qwen2_5_vl)
    info = manifest.graphs["decoder"]
    backend = create_backend("ort-cpu")
    older = backend.load(exported_qwen2_5_vl / "decoder.opset23.onnx", info)
    default = backend.load(exported_qwen2_5_vl / info.file, info)
    text = manifest.text
    past = [n for n in info.input_names() if n.startswith("past_key_values.")]
    shape = (1, int(text["num_kv_heads"]), 6, int(text["head_dim"]))
    embeds = np.random.default_rng(0).standard_normal((1, 4, int(text["hidden_size"]))).astype(np.float32)

    def feeds(start, stop, cache):
        return {
            "inputs_embeds": embeds[:, start:stop],
            "position_ids": np.broadcast_to(np.arange(start, stop), (3, 1, stop - start)).astype(np.int64),
            "attention_mask": np.ones((1, stop), np.int64),
            **cache,
        }

    zeros = {name: np.zeros(shape, np.float32) for name in past}
    first = older.run(feeds(0, 3, zeros))
    assert not any(value.any() for value in zeros.values())  # past untouched
    cache = {name: first[name.replace("past_key_values.", "present.")] for name in past}
    key = cache[past[0]]
    assert np.abs(key[:, :, :3]).min() > 0 and not key[:, :, 3:].any()
    second = older.run(feeds(3, 4, cache))
    after = second["present.0.key"]
    np.testing.assert_array_equal(after[:, :, :3], key[:, :, :3])
    assert np.abs(after[:, :, 3]).min() > 0 and not after[:, :, 4:].any()
    whole = default.run(feeds(0, 4, {name: np.zeros(shape, np.float32) for name in past}))
    np.testing.assert_allclose(second["logits"], whole["logits"], atol=1e-5)
    np.testing.assert_allclose(after, whole["present.0.key"], atol=1e-5)
