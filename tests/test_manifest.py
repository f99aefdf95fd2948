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


# -- confinement: nothing a manifest names may lie outside the export folder -----------------------------------


def _write(tmp_path, data) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(data))


def _valid(tmp_path) -> dict:
    """A loadable manifest in tmp_path (its graph file exists), as a dict to tamper with."""
    _manifest().save(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"")
    return json.loads((tmp_path / "manifest.json").read_text())


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "name",
    [
        "../outside.onnx",
        "sub/../../outside.onnx",
        "sub/../x.onnx",  # '..' is refused even where it would come back inside
        "/etc/passwd",
        "C:/Windows/win.ini",
        "C:relative.onnx",
        "\\\\server\\share\\x.onnx",
        "..\\outside.onnx",
        "x.onnx\x00.txt",
        "",
    ],
)
def test_graph_paths_outside_the_folder_are_refused(tmp_path, name):
    data = _valid(tmp_path)
    data["graphs"]["decoder"]["file"] = name
    _write(tmp_path, data)
    with pytest.raises(ManifestError) as error:
        Manifest.load(tmp_path)
    assert "export folder" in _one_line(error) or "file name" in _one_line(error)


@pytest.mark.parametrize("key", ["tokenizer", "chat_template", "generation_config", "anything_else"])
def test_files_entries_outside_the_folder_are_refused(tmp_path, key):
    data = _valid(tmp_path)
    data["files"][key] = "/etc/passwd"
    _write(tmp_path, data)
    with pytest.raises(ManifestError, match="not a plain file name inside the export folder"):
        Manifest.load(tmp_path)
    data["files"][key] = 42
    _write(tmp_path, data)
    with pytest.raises(ManifestError, match="files entries must be file names"):
        Manifest.load(tmp_path)


def test_symbolic_links_leaving_the_folder_are_refused(tmp_path):
    export, outside = tmp_path / "export", tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    (outside / "secret.onnx").write_bytes(b"")
    data = _valid(export)
    (export / "link.onnx").symlink_to(outside / "secret.onnx")
    (export / "linked_dir").symlink_to(outside, target_is_directory=True)
    for name in ("link.onnx", "linked_dir/secret.onnx", "LINKED_DIR/../link.onnx"):
        data["graphs"]["decoder"]["file"] = name
        _write(export, data)
        with pytest.raises(ManifestError):
            Manifest.load(export)
    # a link that stays inside the folder is fine, and so is an export folder reached through a link
    (export / "inside.onnx").symlink_to(export / "x.onnx")
    data["graphs"]["decoder"]["file"] = "inside.onnx"
    _write(export, data)
    (tmp_path / "via_link").symlink_to(export, target_is_directory=True)
    assert Manifest.load(tmp_path / "via_link").graphs["decoder"].file == "inside.onnx"


def test_symbolic_link_loops_are_refused(tmp_path):
    data = _valid(tmp_path)
    (tmp_path / "loop.onnx").symlink_to(tmp_path / "loop.onnx")
    data["graphs"]["decoder"]["file"] = "loop.onnx"
    _write(tmp_path, data)
    with pytest.raises(ManifestError):
        Manifest.load(tmp_path)


def _onnx_with_external_data(path, location: str) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    # one external tensor in the initializers, one in an If branch's Constant: both are found
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=weight)],
        "branch",
        [],
        [helper.make_tensor_value_info("c", 1, [4])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", 1, [4])],
        [weight],
    )
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "data/../../outside.bin", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    export = tmp_path / "export"
    export.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    (export / "link.bin").symlink_to(tmp_path / "outside.bin")
    data = _valid(export)
    _onnx_with_external_data(export / "x.onnx", location)
    with pytest.raises(ManifestError, match=r"external data of the \w+ graph"):
        Manifest.load(export)
    _onnx_with_external_data(export / "x.onnx", "x.onnx.data")  # inside: loads once the data file exists
    with pytest.raises(ManifestError, match=r"x.onnx.data is missing"):
        Manifest.load(export)
    (export / "x.onnx.data").write_bytes(b"\0" * 16)
    assert Manifest.load(export).graphs == Manifest.from_dict(data).graphs


def test_external_data_scanner_finds_every_location(tmp_path):
    from vlm_export.onnx_external import OnnxFormatError, external_data_locations

    _onnx_with_external_data(tmp_path / "m.onnx", "w.bin")
    assert external_data_locations(tmp_path / "m.onnx") == ["w.bin"]
    blob = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(OnnxFormatError):
        external_data_locations(tmp_path / "cut.onnx")
    (tmp_path / "text.onnx").write_text("this is not a protobuf message at all")
    with pytest.raises(OnnxFormatError):
        external_data_locations(tmp_path / "text.onnx")


def test_scanner_field_numbers_match_onnx_proto():
    onnx = pytest.importorskip("onnx")
    from vlm_export import onnx_external as scan

    def number(message, name):
        return message.DESCRIPTOR.fields_by_name[name].number

    assert (
        number(onnx.ModelProto, "graph"),
        number(onnx.ModelProto, "functions"),
    ) == (scan._MODEL_GRAPH, scan._MODEL_FUNCTIONS)
    assert number(onnx.GraphProto, "node") == scan._GRAPH_NODE
    assert number(onnx.GraphProto, "initializer") == scan._GRAPH_INITIALIZER
    assert number(onnx.GraphProto, "sparse_initializer") == scan._GRAPH_SPARSE_INITIALIZER
    assert number(onnx.NodeProto, "attribute") == scan._NODE_ATTRIBUTE
    assert number(onnx.FunctionProto, "node") == scan._FUNCTION_NODE
    attribute = onnx.AttributeProto
    assert tuple(number(attribute, n) for n in ("t", "g", "tensors", "graphs")) == (
        scan._ATTR_T,
        scan._ATTR_G,
        scan._ATTR_TENSORS,
        scan._ATTR_GRAPHS,
    )
    assert (
        number(attribute, "sparse_tensor"),
        number(attribute, "sparse_tensors"),
    ) == (scan._ATTR_SPARSE, scan._ATTR_SPARSES)
    assert (
        number(onnx.SparseTensorProto, "values"),
        number(onnx.SparseTensorProto, "indices"),
    ) == (scan._SPARSE_VALUES, scan._SPARSE_INDICES)
    assert number(onnx.TensorProto, "external_data") == scan._TENSOR_EXTERNAL_DATA
    assert (scan._ENTRY_KEY, scan._ENTRY_VALUE) == (1, 2)


# -- schema: additive fields are tolerated, malformed ones are one-line errors --------------------------------


def test_unknown_fields_are_tolerated(tmp_path, caplog):
    data = _valid(tmp_path)
    data["a_field_from_a_newer_exporter"] = {"x": 1}
    data["limits"]["max_video_seconds"] = 30
    data["graphs"]["decoder"]["sha256"] = "abc"
    data["graphs"]["decoder"]["inputs"][0]["dynamic"] = True
    _write(tmp_path, data)
    with caplog.at_level("DEBUG", logger="vlm_export.manifest"):
        loaded = Manifest.load(tmp_path)
    assert loaded == _manifest()
    assert "a_field_from_a_newer_exporter" in caplog.text and "max_video_seconds" in caplog.text


def _tamper(data: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("graphs", [], "graphs must be an object"),
        ("graphs.decoder", "decoder.onnx", "graphs.decoder must be an object"),
        ("graphs.decoder.file", None, "graphs.decoder.file must be a file name"),
        ("graphs.decoder.inputs", {}, "graphs.decoder.inputs must be a list"),
        ("graphs.decoder.inputs", [["input_ids"]], r"graphs.decoder.inputs\[0\] must be an object"),
        ("graphs.decoder.inputs", [{"name": "x"}], "needs a name, a dtype and a shape"),
        ("graphs.decoder.inputs", [{"name": "x", "dtype": "float32", "shape": [-1]}], "not a size or name"),
        ("graphs.decoder.max_abs_diff", "small", "max_abs_diff must be a number"),
        ("graphs.embedding", _DELETE, r"graphs \['embedding'\] are missing"),
        ("dtype", "float8", "dtype 'float8' is not one this runtime computes in"),
        ("dtype", 32, "dtype must be a string"),
        ("limits.max_seq_len", -5, "limits.max_seq_len must be a positive integer"),
        ("limits.max_batch", 0, "limits.max_batch must be a positive integer"),
        ("limits.max_image_pixels", True, "limits.max_image_pixels must be a positive integer"),
        ("limits.max_seq_len", "8192", "limits.max_seq_len must be a positive integer"),
        ("limits", [1, 2], "limits must be an object"),
        ("tokens", "none", "tokens must be an object"),
        ("tokens.image_token_id", -1, "tokens.image_token_id has the invalid value -1"),
        ("tokens.image_token_id", "<image>", "tokens.image_token_id has the invalid value"),
        ("text", None, "text must be an object"),
        ("files", _DELETE, r"missing fields \['files'\]"),
        ("family", ["qwen2_5_vl"], "family must be a string"),
        ("schema_version", "2", "schema version '2' is not supported"),
    ],
)
def test_malformed_manifests_are_one_line_errors(tmp_path, path, value, needle):
    _write(tmp_path, _tamper(_valid(tmp_path), path, value))
    with pytest.raises(ManifestError, match=needle) as error:
        Manifest.load(tmp_path)
    _one_line(error)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[1, 2, 3]", "must hold a JSON object, not a list"),
        ('"manifest"', "must hold a JSON object, not a string"),
        ("null", "must hold a JSON object, not null"),
        ("{not json", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),  # deeper than the parser recurses
        ("\udcff", "is not valid JSON"),
    ],
)
def test_manifest_that_is_not_a_json_object(tmp_path, text, needle):
    (tmp_path / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ManifestError, match=needle) as error:
        Manifest.load(tmp_path)
    _one_line(error)


def test_file_path_of_optional_and_required_files(tmp_path):
    data = _valid(tmp_path)
    manifest = Manifest.from_dict(data)
    with pytest.raises(ManifestError, match=r"tokenizer file .* is missing"):
        manifest.file_path(tmp_path, "tokenizer")
    with pytest.raises(ManifestError, match="names no chat_template file"):
        manifest.file_path(tmp_path, "chat_template")
    assert manifest.file_path(tmp_path, "chat_template", required=False) is None
    (tmp_path / "tokenizer.json").mkdir()  # a folder where a file should be
    with pytest.raises(ManifestError, match="not a regular file"):
        manifest.file_path(tmp_path, "tokenizer", required=False)


def test_every_field_is_checked_and_unknown_ones_survive_a_save(tmp_path):
    """A field added to Manifest must be added to the checks too (or the loader would drop it), and fields from a
    newer exporter are written back by a save (build-engines rewrites the manifest)."""
    from dataclasses import fields

    from vlm_export import manifest as module

    assert set(module._FIELD_TYPES) == {f.name for f in fields(Manifest)}
    data = _valid(tmp_path)
    data["signature"] = {"sha256": "0" * 64}
    _write(tmp_path, data)
    Manifest.load(tmp_path).save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["signature"] == {"sha256": "0" * 64}


def test_graph_forms_files_stay_inside_the_folder(tmp_path):
    """Other forms of a graph (e.g. the decoder for an older onnxruntime) are files the runtime may load too."""
    export, outside = tmp_path / "export", tmp_path / "outside.onnx"
    export.mkdir()
    outside.write_bytes(b"")
    data = _valid(export)
    (export / "old.onnx").symlink_to(outside)
    for file in ("old.onnx", str(outside), "../outside.onnx"):
        data["graph_forms"] = {"decoder": [{"file": "x.onnx"}, {"file": file, "min_onnxruntime": "1.23"}]}
        _write(export, data)
        with pytest.raises(ManifestError, match="graph_forms file of decoder"):
            Manifest.load(export)
