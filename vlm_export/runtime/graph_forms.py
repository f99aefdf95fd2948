"""Which file of each graph to load: the manifest's `graph_forms` against the installed onnxruntime.

An export carries the decoder in more than one form when the default needs a newer onnxruntime than the field
has (vlm_export/exporter/decoder_forms.py): opset 24 with an in-place cache for onnxruntime >= 1.25, opset 23
with a cache copied each step for 1.23-1.24 (1.23.2 is the newest with Python 3.10 wheels). The first form the
installed version meets is loaded; the check runs before onnxruntime sees a file, so an export that needs a
newer onnxruntime fails with one line that says which, not deep inside onnxruntime. Backends that do not run ONNX
files with onnxruntime (TensorRT engines) always get the default file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from vlm_export.errors import ManifestError
from vlm_export.manifest import Manifest

#: Exports made before `graph_forms` existed: the decoder's opset (manifest producer "decoder_opset") -> the first
#: onnxruntime release that runs it (see vlm_export/exporter/decoder_forms.py).
ONNXRUNTIME_FOR_OPSET = {23: "1.23", 24: "1.25"}


@dataclass(frozen=True)
class GraphForm:
    """One file of a graph: what onnxruntime it needs, and whether the decoder's cache is updated in place (the
    `present` outputs written into the `past` buffers) or `present` comes back as new buffers each step."""

    file: str
    min_onnxruntime: str | None = None
    in_place_cache: bool = True
    opset: int | None = None


def parse_version(version: str) -> tuple[int, ...]:
    """'1.23.2' -> (1, 23, 2); suffixes such as '.dev2026' or '+cu126' are ignored."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def _meets(installed: str, needed: str | None) -> bool:
    return needed is None or parse_version(installed) >= parse_version(needed)


def _form(entry: Any, graph: str) -> GraphForm:
    message = f"manifest.json: malformed graph_forms entry of {graph} ({entry!r}); re-export the model"
    try:
        form = GraphForm(
            file=str(entry["file"]),
            min_onnxruntime=entry.get("min_onnxruntime"),
            in_place_cache=bool(entry.get("in_place_cache", True)),
            opset=entry.get("opset"),
        )
        if form.min_onnxruntime is not None:
            parse_version(str(form.min_onnxruntime))
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ManifestError(message) from None
    path = PurePosixPath(form.file.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:  # nothing is read outside the export folder
        raise ManifestError(message)
    return form


def graph_forms(manifest: Manifest, graph: str) -> list[GraphForm]:
    """The forms of `graph`, preferred first; the default file alone for a graph the manifest lists no forms for."""
    entries = manifest.graph_forms.get(graph)
    if entries:
        return [_form(entry, graph) for entry in entries]
    needed = None
    if graph == "decoder":  # exports from before graph_forms: the producer recorded the decoder's opset
        opset = manifest.producer.get("decoder_opset")
        needed = ONNXRUNTIME_FOR_OPSET.get(int(opset)) if str(opset).isdigit() else None
    return [GraphForm(file=manifest.graphs[graph].file, min_onnxruntime=needed)]


def select_forms(manifest: Manifest, onnxruntime_version: str | None) -> dict[str, GraphForm]:
    """The form of every graph to load with `onnxruntime_version` (None: a backend that does not load ONNX files
    with onnxruntime, which gets the default files)."""
    chosen = {}
    for graph in manifest.graphs:
        forms = graph_forms(manifest, graph)
        if onnxruntime_version is None:
            chosen[graph] = forms[0]
            continue
        usable = [form for form in forms if _meets(onnxruntime_version, form.min_onnxruntime)]
        if not usable:
            oldest = min((f.min_onnxruntime for f in forms if f.min_onnxruntime), key=parse_version)
            hint = (
                "re-export it with this vlm-export, which adds a decoder form for onnxruntime 1.23+, or upgrade"
                if len(forms) == 1 and not manifest.graph_forms
                else "upgrade"
            )
            raise ManifestError(
                f"this export's {graph} graph needs onnxruntime >= {oldest}, but {onnxruntime_version} is installed; "
                f"{hint} onnxruntime (pip install -U 'onnxruntime>={oldest}')"
            )
        chosen[graph] = usable[0]
    return chosen
