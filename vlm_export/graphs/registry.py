"""Export-side family registry: a family declares its graphs as data; the exporter never names a family.

A family module registers a `GraphFamily` for the `model_type` values it handles. The exporter asks it to
load the model, to describe each graph (`GraphSpec`: the torch module, IO names, dynamic axes, example inputs
for tracing, differently-shaped inputs for verification and a transformers reference to verify against), and
for the family's section of the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vlm_export.errors import UnsupportedModelError

#: Domain of ops from a newer opset than the one torch's exporter traces at. Tracing at opset 24 outright loses
#: its RMSNormalization fusion (~5 primitive ops per norm instead of one), so the decoder is traced at 23 with
#: TensorScatter here, then the default-domain opset is raised: no op our graphs use changed meaning in 24.
PROMOTED_DOMAIN = "vlm_export.promoted"

#: Attributes of a weightless model's FakeTensor parameters (exporter/weightless.py): the model parameter a graph
#: weight is read from, and, for a parameter a graph wrapper slices out of another (VocabSlicedLinear), its rows.
SOURCE_ATTRIBUTE = "vlm_export_source"
ROWS_ATTRIBUTE = "vlm_export_rows"
#: ... and for a tensor a graph form derives from a parameter (a view: MoE's interleaved or stacked experts), the
#: function that derives it from the source's values.
DERIVE_ATTRIBUTE = "vlm_export_derive"


def derived_from(tensor: Any, source: Any, derive: Callable[[Any], Any]) -> Any:
    """Mark `tensor` (= `derive(source)`) as derived from a weightless model's parameter `source`, so the exporter
    writes it from the checkpoint; a no-op for real parameters."""
    name = getattr(source, SOURCE_ATTRIBUTE, None)
    if name is not None:
        setattr(tensor, SOURCE_ATTRIBUTE, name)
        setattr(tensor, DERIVE_ATTRIBUTE, derive)
    return tensor


@dataclass
class GraphSpec:
    """One ONNX graph: what to trace, how its axes vary, and how to check it."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_args: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...]
    # Input sets (by ONNX input name) with other shapes than the example: the exporter runs the ONNX
    # graph on each and compares with `reference`, transformers' own forward on the same inputs.
    verify_feeds: list[dict[str, torch.Tensor]]
    reference: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    tolerance: float = 1e-4
    # Default-domain opset of the saved graph when it needs ops newer than the exporter's opset (the decoder's
    # TensorScatter, opset 24): traced in PROMOTED_DOMAIN, moved to the default domain after export.
    opset: int | None = None
    # Which output axes are dynamic, by output name, for the manifest (axis -> symbolic name).
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    input_axes: dict[str, dict[int, str]] = field(default_factory=dict)


class GraphFamily(Protocol):
    """What a family provides to the exporter."""

    name: str
    model_types: Sequence[str]

    def load_model(self, model_dir: Path, dtype: torch.dtype, **options: str) -> nn.Module:
        """Load for export; `options` are the export options the family lists in its `options` attribute."""
        ...

    def graph_specs(self, model: nn.Module, dtype: torch.dtype) -> list[GraphSpec]: ...

    def manifest_section(self, model: nn.Module, image_processor: dict[str, Any]) -> dict[str, Any]:
        """Sections `preprocessing`, `tokens`, `text`, `vision` of the manifest."""
        ...

    # Optional: `write_assets(model, folder) -> dict[str, str]` writes host-side tensors the runtime needs
    # (e.g. LLaVA-OneVision's image_newline) and returns them for the manifest's `files`.


_FAMILIES: dict[str, GraphFamily] = {}


def register_graph_family(family: GraphFamily) -> GraphFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> list[str]:
    _load_builtin_families()
    return sorted(_FAMILIES)


def graph_family_for(model_type: str) -> GraphFamily:
    _load_builtin_families()
    try:
        return _FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES))
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported by vlm-export (supported: {known})"
        ) from None


def _load_builtin_families() -> None:
    # Importing a family module registers it.
    from vlm_export.graphs import llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: F401
