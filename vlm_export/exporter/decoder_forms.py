"""A second decoder file for the onnxruntime releases that cannot load the default one, and the manifest's record
of both (`Manifest.graph_forms`; the runtime picks one in `vlm_export/runtime/graph_forms.py`).

The default decoder is opset 24: `TensorScatter` writes each step's keys/values into the cache in place. Only
onnxruntime >= 1.25 runs it (1.23.2 refuses opset 24, 1.24.x has no `TensorScatter` kernel), while 1.23.2 is
the newest release with Python 3.10 wheels (JetPack 6).
The older form is the same graph at opset 23 with `TensorScatter` rewritten as `ScatterElements`
(`trt_ops.decompose`, also used for TensorRT < 10.15): same inputs, outputs and math, but `present` is a new
buffer (the cache is copied each step). It references the default form's weights file, so it costs ~100 KB of
graph and no weights on disk; quantized decoders (MatMulNBits, GatherBlockQuantized: com.microsoft, unaffected by
the opset) get it the same way, from the quantized graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from vlm_export.errors import ExportError
from vlm_export.exporter.trt_ops import decompose
from vlm_export.manifest import Manifest

logger = logging.getLogger(__name__)

#: Default-domain opset of the older form: what onnxruntime 1.23 supports ("official support ... till opset 23").
OLDER_OPSET = 23
#: Ops of the default decoder newer than OLDER_OPSET, rewritten in the older form.
NEWER_OPS = ("TensorScatter",)
#: First onnxruntime release that runs a default-domain opset (CPU kernels of every op our graphs use): 1.22
#: refuses opset 23; 1.24 loads opset 24 but has no TensorScatter(24) kernel; 1.25.0 added it.
ONNXRUNTIME_FOR_OPSET = {23: "1.23", 24: "1.25"}


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _form(file: str, model: onnx.ModelProto) -> dict[str, Any]:
    """The manifest's record of one decoder file: what it needs, and whether its cache is updated in place
    (`TensorScatter` with `present` bound to `past`) or `present` is a new buffer each step."""
    opset = _default_opset(model)
    if opset not in ONNXRUNTIME_FOR_OPSET:
        raise ExportError(f"the decoder is opset {opset}, which vlm-export does not know onnxruntime support for")
    return {
        "file": file,
        "opset": opset,
        "min_onnxruntime": ONNXRUNTIME_FOR_OPSET[opset],
        "in_place_cache": any(node.op_type == "TensorScatter" for node in model.graph.node),
    }


def older_file_name(file: str) -> str:
    """decoder.onnx -> decoder.opset23.onnx (beside it: ONNX resolves the weights file relative to the graph)."""
    path = Path(file)
    return str(path.with_name(f"{path.stem}.opset{OLDER_OPSET}{path.suffix}"))


def write_older_decoder(source: Path, target: Path) -> list[str]:
    """`source` at opset OLDER_OPSET with NEWER_OPS rewritten, into `target` in the same folder (same weights file);
    returns the ops rewritten. Fails if an op remains that opset OLDER_OPSET does not define."""
    if source.parent != target.parent:
        raise ValueError("the older form must sit beside the default one: both reference the same weights file")
    newer = ONNXRUNTIME_FOR_OPSET.get(_default_opset(onnx.load(str(source), load_external_data=False)), "?")
    rewritten = decompose(source, target, list(NEWER_OPS))
    model = onnx.load(str(target), load_external_data=False)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OLDER_OPSET
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            try:
                onnx.defs.get_schema(node.op_type, OLDER_OPSET, "")
            except onnx.defs.SchemaError:
                target.unlink()
                raise ExportError(
                    f"the decoder uses {node.op_type}, which opset {OLDER_OPSET} lacks and vlm-export cannot "
                    f"rewrite; onnxruntime < {newer} could not run this export. Please report the model"
                ) from None
    onnx.save(model, str(target))
    return rewritten


def add_decoder_forms(folder: Path, manifest: Manifest) -> None:
    """Give the finished export in `folder` its older decoder form (when the default needs a newer opset) and record
    the decoder's forms, preferred first, in `manifest.graph_forms`."""
    info = manifest.graphs["decoder"]
    source = folder / info.file
    default = onnx.load(str(source), load_external_data=False)
    forms = [_form(info.file, default)]
    if _default_opset(default) > OLDER_OPSET:
        older = older_file_name(info.file)
        rewritten = write_older_decoder(source, folder / older)
        forms.append(_form(older, onnx.load(str(folder / older), load_external_data=False)))
        logger.info("decoder: %s for onnxruntime < %s (%s rewritten)", older, forms[0]["min_onnxruntime"], rewritten)
    manifest.graph_forms = {"decoder": forms}
