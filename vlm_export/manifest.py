"""manifest.json: the only contract between exporter and runtime (no torch here).

Written by the exporter, read by the runtime. The runtime refuses a manifest whose schema version it does not
know, or that lacks what it needs, with a message that says why and what to do; fields it does not know are
ignored, so a newer exporter can add some within a schema version. Every file a manifest names must lie inside
the export folder (`confined_path`): an export from someone else must not make the runtime read other files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from vlm_export.errors import ManifestError
from vlm_export.onnx_external import OnnxFormatError, external_data_locations

logger = logging.getLogger(__name__)

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
        # top-level fields this version does not know (a newer exporter's) are written back as they were read
        return json.dumps({**getattr(self, "_unknown", {}), **asdict(self)}, indent=2, sort_keys=False) + "\n"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        """A manifest from its JSON object, checked field by field (one-line `ManifestError`s).

        Fields this runtime does not know are ignored (logged at debug level): a newer exporter may add fields
        within a schema version, and older runtimes must keep loading its exports.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"{source} must hold a JSON object, not {_json_type(data)}; re-export the model")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: schema version {_short(version)} is not supported by this runtime (it reads version "
                f"{SCHEMA_VERSION}); re-export the model with this vlm-export version or upgrade vlm-export"
            )
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ManifestError(f"{source}: missing fields {missing}; the export is incomplete, re-export it")
        _ignore_unknown(data, {f.name for f in fields(cls)}, source, "top level")
        values: dict[str, Any] = {}
        for key, kind in _FIELD_TYPES.items():
            if key not in data or (data[key] is None and key not in _REQUIRED):
                continue
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ManifestError(
                    f"{source}: {key} must be {_TYPE_NAMES[kind]}, not {_json_type(value)}; re-export the model"
                )
            values[key] = value
        if values["dtype"] not in DTYPES:
            raise ManifestError(
                f"{source}: dtype {_short(values['dtype'])} is not one this runtime computes in "
                f"({', '.join(DTYPES)}); re-export with --dtype float32 or float16, or upgrade vlm-export"
            )
        values["graphs"] = {name: _graph_info(name, g, source) for name, g in values["graphs"].items()}
        absent = [name for name in GRAPH_NAMES if name not in values["graphs"]]
        if absent:
            raise ManifestError(f"{source}: graphs {absent} are missing; re-export the model")
        values["limits"] = _limits(values.get("limits", {}), source)
        bad_files = {key: value for key, value in values["files"].items() if not isinstance(value, str)}
        if bad_files:
            raise ManifestError(f"{source}: files entries must be file names, got {_short(bad_files)}")
        _check_section(
            values["tokens"], [k for k in values["tokens"] if k.endswith("_id")], source, "tokens", _token_id
        )
        manifest = cls(**values)
        manifest._unknown = {key: data[key] for key in data if key not in _FIELD_TYPES}  # not a field: kept apart
        return manifest

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """The manifest of an export folder, after checking that every file it names lies inside the folder."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"{folder} is not a folder; pass the output folder of `vlm-export`")
        if not path.is_file():
            raise ManifestError(f"{path} not found: {folder} is not a vlm-export output (run `vlm-export` first)")
        try:
            size = path.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{path} is {size} bytes, more than any manifest needs; re-export the model")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ManifestError(f"{path} is not valid JSON ({_one_line(error)}); re-export the model") from None
        except OSError as error:
            raise ManifestError(f"cannot read {path}: {error.strerror or error}") from None
        manifest = cls.from_dict(data, source=str(path))
        manifest.check_files(folder)
        return manifest

    # -- files ----------------------------------------------------------------------------------------
    def check_files(self, folder: str | Path) -> None:
        """Every graph (with its external data) and every `files` entry must lie inside `folder`; graphs must exist."""
        for name in self.graphs:
            self.graph_path(folder, name)
        for key, value in self.files.items():
            confined_path(folder, value, f"files.{key}", must_exist=False)
        for name, forms in self.graph_forms.items():  # the runtime picks one by onnxruntime version
            for form in forms if isinstance(forms, list) else [forms]:
                file = form.get("file") if isinstance(form, dict) else form
                confined_path(folder, file, f"a graph_forms file of {name}", must_exist=False)

    def graph_path(self, folder: str | Path, name: str, file: str | None = None) -> Path:
        """The resolved path of graph `name` (or of `file`, another form of it: `graph_forms`), after checking that
        it and the external data it names lie inside `folder` (ONNX Runtime and TensorRT's parser open those files
        when they load the graph)."""
        path = confined_path(folder, file or self.graphs[name].file, f"the {name} graph file")
        try:
            locations = external_data_locations(path)
        except OnnxFormatError as error:
            raise ManifestError(
                f"the {name} graph file {path} is not an ONNX model ({error}); re-export the model"
            ) from None
        except OSError as error:
            raise ManifestError(f"cannot read the {name} graph file {path}: {error.strerror or error}") from None
        for location in locations:
            confined_path(folder, location, f"the external data of the {name} graph", base=path.parent)
        return path

    def file_path(self, folder: str | Path, key: str, *, required: bool = True) -> Path | None:
        """The resolved path of `files[key]` inside `folder`; None for an optional file the export lacks."""
        name = self.files.get(key)
        if name is None:
            if required:
                raise ManifestError(f"{MANIFEST_NAME} in {folder} names no {key} file; re-export the model")
            return None
        path = confined_path(folder, name, f"files.{key}", must_exist=False)
        if path.is_file():
            return path
        if required or path.exists():
            raise ManifestError(f"{key} file {path} is missing or not a regular file; re-export the model")
        return None


# -- checks ---------------------------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 16 << 20
DTYPES = ("float32", "float16")  # the float type the graphs compute in (`--dtype`)
_REQUIRED = ("family", "dtype", "graphs", "tokens", "text", "vision", "preprocessing", "files")
_FIELD_TYPES: dict[str, type] = {
    "family": str,
    "dtype": str,
    "graphs": dict,
    "tokens": dict,
    "text": dict,
    "vision": dict,
    "preprocessing": dict,
    "files": dict,
    "limits": dict,
    "producer": dict,
    "source_model": str,
    "schema_version": int,
    "engines": dict,
    "quantization": dict,
    "verification": dict,
    "graph_forms": dict,
    "golden": dict,
}
_TYPE_NAMES = {str: "a string", dict: "an object", int: "an integer", list: "a list"}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _ignore_unknown(data: dict[str, Any], known: set[str], source: str, where: str) -> None:
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        logger.debug("%s: ignoring %s fields this runtime does not know: %s", source, where, ", ".join(unknown))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _token_id(value: Any) -> bool:
    if isinstance(value, list):
        return all(_token_id(v) for v in value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _check_section(section: dict[str, Any], keys, source: str, where: str, valid) -> None:
    for key in keys:
        if key not in section:
            raise ManifestError(f"{source}: {where}.{key} is missing; re-export the model")
        if not valid(section[key]):
            raise ManifestError(f"{source}: {where}.{key} has the invalid value {_short(section[key])}; re-export")


def _tensor_info(entry: Any, source: str, where: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ManifestError(f"{source}: {where} must be an object, not {_json_type(entry)}; re-export the model")
    _ignore_unknown(entry, {"name", "dtype", "shape"}, source, where)
    name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
        raise ManifestError(f"{source}: {where} needs a name, a dtype and a shape list; re-export the model")
    if not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or isinstance(d, str) for d in shape):
        raise ManifestError(f"{source}: {where} shape {_short(shape)} has a dimension that is not a size or name")
    return TensorInfo(name=name, dtype=dtype, shape=shape)


def _graph_info(name: str, entry: Any, source: str) -> GraphInfo:
    where = f"graphs.{name}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{source}: {where} must be an object, not {_json_type(entry)}; re-export the model")
    _ignore_unknown(entry, {f.name for f in fields(GraphInfo)}, source, where)
    if not isinstance(entry.get("file"), str):
        raise ManifestError(f"{source}: {where}.file must be a file name; re-export the model")
    tensors = {}
    for side in ("inputs", "outputs"):
        if not isinstance(entry.get(side), list):
            raise ManifestError(f"{source}: {where}.{side} must be a list; re-export the model")
        tensors[side] = [_tensor_info(t, source, f"{where}.{side}[{i}]") for i, t in enumerate(entry[side])]
    diff = entry.get("max_abs_diff")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, int | float)):
        raise ManifestError(f"{source}: {where}.max_abs_diff must be a number; re-export the model")
    return GraphInfo(file=entry["file"], max_abs_diff=diff, **tensors)


def _limits(entry: dict[str, Any], source: str) -> Limits:
    known = {f.name for f in fields(Limits)}
    _ignore_unknown(entry, known, source, "limits")
    values = {key: entry[key] for key in known if key in entry}
    for key, value in values.items():
        if value is not None and not _positive_int(value):
            raise ManifestError(
                f"{source}: limits.{key} must be a positive integer or null, got {_short(value)}; re-export the "
                "model with a valid limit"
            )
    return Limits(**values)


def confined_path(
    folder: str | Path, relative: Any, what: str, *, base: Path | None = None, must_exist: bool = True
) -> Path:
    """`relative` resolved inside `folder` (symbolic links followed), or a one-line `ManifestError`.

    An export folder may come from someone else: a manifest must not make the runtime (or `build-engines`) read
    any other file the user can read. Refused: non-strings, empty names, NUL bytes, absolute paths (POSIX or
    Windows, drive letters included), any `..` component (even one that would come back inside), and names that
    resolve outside the folder through a symbolic link. `base` (a folder inside `folder`) is where a relative name
    starts, e.g. the graph's folder for its external data; `must_exist` also asks for a regular file.
    """
    root = Path(folder).resolve()
    shown = _short(relative)
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{what} must be a file name inside the export folder, got {shown}; re-export the model")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if "\x00" in relative or posix.anchor or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise ManifestError(
            f"{what} {shown} is not a plain file name inside the export folder {root} (absolute, '..' or NUL); "
            "refusing to read it: the export may have been tampered with, re-export the model"
        )
    start = (base or root).resolve()
    try:
        resolved = (start / relative).resolve()
    except (OSError, RuntimeError) as error:  # symbolic link loops: RuntimeError before Python 3.13
        raise ManifestError(f"{what} {shown} cannot be resolved in {root} ({_one_line(error)})") from None
    if not resolved.is_relative_to(root) or not start.is_relative_to(root):
        raise ManifestError(
            f"{what} {shown} resolves to {resolved}, outside the export folder {root} (through a symbolic link); "
            "refusing to read it: copy the file into the folder or re-export the model"
        )
    if must_exist and not resolved.is_file():
        raise ManifestError(f"{what} {resolved} is missing or not a regular file; re-export the model")
    return resolved
