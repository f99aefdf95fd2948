"""Exporter refusals and the no-half-written-output guarantee."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_export.errors import ExportError, UnsupportedModelError

pytest.importorskip("torch")


def _fake_model(folder, model_type="bert"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_unsupported_model_type_is_named(tmp_path, capsys):
    from vlm_export.exporter.cli import main

    model = _fake_model(tmp_path / "m")
    assert main(["--model", str(model), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "model_type 'bert' is not supported" in err and "qwen2_5_vl" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_and_weights(tmp_path):
    from vlm_export.exporter.export import export_model

    with pytest.raises(ExportError, match="no such folder"):
        export_model(str(tmp_path / "missing"), tmp_path / "out", progress=False)
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="safetensors"):
        export_model(str(folder), tmp_path / "out", progress=False)
    with pytest.raises(UnsupportedModelError):
        export_model(str(_fake_model(tmp_path / "llama", "llama")), tmp_path / "out", progress=False)


def test_existing_output_needs_overwrite(tmp_path, tiny_qwen2_5_vl_dir):
    from vlm_export.exporter.export import export_model

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_model(str(tiny_qwen2_5_vl_dir), out, progress=False)


def test_interrupted_export_leaves_nothing(tmp_path, tiny_qwen2_5_vl_dir, monkeypatch):
    """A Ctrl-C in the middle of the export removes the staging folder and writes no output."""
    import vlm_export.exporter.export as export_module

    real_export = export_module.export_graph
    calls = []

    def interrupt_on_second_graph(spec, folder, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_export(spec, folder, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_graph", interrupt_on_second_graph)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_module.export_model(str(tiny_qwen2_5_vl_dir), out, progress=False)
    assert calls == ["vision_encoder", "embedding"]
    assert list(tmp_path.iterdir()) == [], "staging or output folder left behind"


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_weights_are_external_and_the_embedding_table_is_mapped(tmp_path, tiny_qwen2_5_vl_dir):
    """Weights go to `<graph>.onnx.data` (no 2 GiB protobuf limit), which ONNX Runtime memory-maps: the embedding
    table (151,936 x 64 float32, 39 MB) is not read into memory, only the rows a request looks up."""
    import onnxruntime as ort
    import torch

    import vlm_export.exporter.onnx_export as onnx_export
    from vlm_export.graphs.registry import graph_family_for

    family = graph_family_for("qwen2_5_vl")
    model = family.load_model(tiny_qwen2_5_vl_dir, torch.float32)
    spec = next(s for s in family.graph_specs(model, torch.float32) if s.name == "embedding")
    info = onnx_export.export_graph(spec, tmp_path)
    table_mb = model.model.language_model.embed_tokens.weight.numel() * 4 / 2**20
    assert (tmp_path / "embedding.onnx").stat().st_size < 1_000_000
    assert (tmp_path / "embedding.onnx.data").stat().st_size / 2**20 >= table_mb
    del model
    before = _resident_mb()
    session = ort.InferenceSession(str(tmp_path / info.file), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in spec.verify_feeds[0].items()}
    assert session.run(None, feeds)[0].shape == (3, 6, 64)
    assert _resident_mb() - before < table_mb / 2


def test_exporter_on_python_3_10_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """The runtime supports Python 3.10 (JetPack 6), the exporter 3.11+: vlm-export says so before doing anything."""
    from vlm_export.exporter import cli

    monkeypatch.setattr(cli.sys, "version_info", (3, 10, 12, "final", 0))
    monkeypatch.setattr(cli.platform, "python_version", lambda: "3.10.12")
    assert cli.main(["--model", "x", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs Python 3.11+ to export (this is Python 3.10.12)" in err and "vlm-run" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
