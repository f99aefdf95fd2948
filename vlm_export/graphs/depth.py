"""Depth reduction of a model's config: which layers a verification copy keeps (see exporter/depth_reduction.py).

Each graph family's `reduce_depth(config)` edits the config in place (layer counts, the per-layer lists, the
indices that name layers) and returns a `LayerSelection` per stack of layers, matched on checkpoint keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlm_export.errors import ExportError


@dataclass
class LayerSelection:
    """Checkpoint keys whose first group is a layer index (`pattern`), and the indices kept, in order."""

    label: str  # what the layers are, for the manifest ("text layers", "vision blocks")
    pattern: str
    keep: list[int]

    def rename(self, key: str) -> str | None:
        """`key` with its layer index renumbered, None when its layer is dropped, `key` when it is no layer's."""
        match = re.search(self.pattern, key)
        if match is None:
            return key
        index = int(match.group(1))
        if index not in self.keep:
            return None
        start, end = match.span(1)
        return f"{key[:start]}{self.keep.index(index)}{key[end:]}"


def ends(count: int) -> list[int]:
    """The first and the last of `count` layers."""
    return sorted({0, count - 1})


def reduce_text_config(text_config: Any, keep: list[int]) -> None:
    """Point a text config at the kept layers (per-layer lists are subset, layer lists renumbered)."""
    text_config.num_hidden_layers = len(keep)
    for name in ("layer_types",):
        values = getattr(text_config, name, None)
        if isinstance(values, list) and values:
            setattr(text_config, name, [values[i] for i in keep])
    only = getattr(text_config, "mlp_only_layers", None)
    if isinstance(only, list):
        text_config.mlp_only_layers = [keep.index(i) for i in only if i in keep]
    if getattr(text_config, "decoder_sparse_step", 1) not in (None, 1):
        raise ExportError("depth reduction of a model with decoder_sparse_step != 1 is not supported")
    if isinstance(getattr(text_config, "max_window_layers", None), int):
        text_config.max_window_layers = sum(1 for i in keep if i < text_config.max_window_layers)
