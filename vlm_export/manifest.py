"""manifest.json: the only contract between exporter and runtime (no torch here).

Written by the exporter, read by the runtime. The runtime refuses a manifest whose schema version it does not
know, or that lacks what it needs, with a message that says why and what to do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm_export.errors import ManifestError

SCHEMA_VERSION = 2  # 2: fixed-capacity KV cache updated in place (decoder opset 24, TensorScatter)
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("vision_encoder", "embedding", "decoder")


@dataclass
class TensorInfo:
    """Name, element type and shape of a graph input/output; symbolic axes are strings."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphInfo:
    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    # Max abs difference against transformers measured at export time, per verification input set.
    max_abs_diff: float | None = None

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Limits:
    """Limits the runtime enforces before running a graph (None = only memory bounds it)."""

    max_batch: int | None = None
    max_seq_len: int | None = None
    max_image_pixels: int | None = None


@dataclass
class Manifest:
    family: str
    dtype: str
    graphs: dict[str, GraphInfo]
    tokens: dict[str, Any]
    text: dict[str, Any]
    vision: dict[str, Any]
    preprocessing: dict[str, Any]
    files: dict[str, str]
    limits: Limits = field(default_factory=Limits)
    producer: dict[str, str] = field(default_factory=dict)
    source_model: str = ""
    schema_version: int = SCHEMA_VERSION
    # Anything a later stage (engine build) adds, e.g. TensorRT engine metadata.
    engines: dict[str, Any] = field(default_factory=dict)
    # Weight-only quantization applied after export (scheme, bits, block size, accuracy level, graphs, agreement
    # with fp32); empty = the graphs hold the exported dtype's weights.
    quantization: dict[str, Any] = field(default_factory=dict)
    # What the exporter compared with transformers: depth ("full", or "reduced" with the layers kept), and per graph
    # the largest difference, its tolerance and the number of input sets.
    verification: dict[str, Any] = field(default_factory=dict)
    # Files of a graph for other runtimes, preferred first, by graph name: each {file, opset, min_onnxruntime,
    # in_place_cache}, same IO as `graphs[name]` (e.g. the decoder at opset 23 for onnxruntime < 1.25). Absent:
    # only `graphs[name].file`. Picked by vlm_export/runtime/graph_forms.py.
    graph_forms: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Golden cases (`vlm_export.verification.golden`): the files holding inputs the exporter made and transformers'
    # outputs on them (relative to the export folder), and the versions that made them; empty = none.
    golden: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: schema version {version!r} is not supported by this runtime (it reads version "
                f"{SCHEMA_VERSION}); re-export the model with this vlm-export version or upgrade vlm-export"
            )
        required = ("family", "dtype", "graphs", "tokens", "text", "vision", "preprocessing", "files")
        missing = [key for key in required if key not in data]
        if missing:
            raise ManifestError(f"{source}: missing fields {missing}; the export is incomplete, re-export it")
        try:
            graphs = {
                name: GraphInfo(
                    file=g["file"],
                    inputs=[TensorInfo(**t) for t in g["inputs"]],
                    outputs=[TensorInfo(**t) for t in g["outputs"]],
                    max_abs_diff=g.get("max_abs_diff"),
                )
                for name, g in data["graphs"].items()
            }
        except (KeyError, TypeError) as error:
            raise ManifestError(f"{source}: malformed graph entry ({error}); re-export the model") from None
        absent = [name for name in GRAPH_NAMES if name not in graphs]
        if absent:
            raise ManifestError(f"{source}: graphs {absent} are missing; re-export the model")
        fields = {k: v for k, v in data.items() if k not in ("graphs", "limits")}
        return cls(graphs=graphs, limits=Limits(**data.get("limits", {})), **fields)

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"{folder} is not a folder; pass the output folder of `vlm-export`")
        if not path.is_file():
            raise ManifestError(f"{path} not found: {folder} is not a vlm-export output (run `vlm-export` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} is not valid JSON ({error}); re-export the model") from None
        manifest = cls.from_dict(data, source=str(path))
        for name, graph in manifest.graphs.items():
            if not (folder / graph.file).is_file():
                raise ManifestError(f"{name} graph file {folder / graph.file} is missing; re-export the model")
        return manifest
