"""The one small interface every backend implements; the generation loop never knows which one runs.

Values passed between calls are backend-native: a backend that keeps buffers on the device returns device values
from `run` and accepts them back as inputs, and only `to_numpy` copies to the host. The KV cache goes further:
the caller allocates it once (`allocate`) and passes the same buffer as a `past` input and, in `into`, as the
buffer its `present` output is written to, so the graph updates it in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlm_export.manifest import GraphInfo


class GraphSession(Protocol):
    """A loaded graph."""

    info: GraphInfo

    def run(self, feeds: Mapping[str, Any], into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run with named inputs (numpy arrays, values this backend returned earlier, or `allocate`d buffers);
        all outputs by name. An output named in `into` is written to that `allocate`d buffer, which may also be
        one of the inputs (an in-place update)."""
        ...

    def allocate(self, name: str, shape: tuple[int, ...]) -> Any:
        """A zero-filled buffer of the graph input `name`'s element type, on this backend's device. A backend
        whose engine fixes an axis may return a larger buffer along it (the graph reads shapes from its inputs)."""
        ...

    def grow(self, buffer: Any, shape: tuple[int, ...]) -> Any:
        """An `allocate`d buffer, or a `present` output `run` returned (a decoder whose cache is not updated in
        place), enlarged to `shape`: its contents at the same indices, zeros after. A buffer that
        is already at least that large (an engine's fixed cache capacity) comes back as it is."""
        ...

    def upload(self, name: str, array: np.ndarray) -> Any:
        """A buffer for graph input `name`, as `allocate` makes it, holding the host `array` (cast to the input's
        element type; a fixed axis larger than the array's is zero-filled beyond it). For a cache assembled on the
        host: sequences joining or leaving a running batch. A backend may reuse the buffer `allocate` or `upload`
        gave earlier for the same name: copy what is still needed to the host first."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray:
        """Copy one value to a host numpy array."""
        ...


class Backend(Protocol):
    """Backends that load ONNX files with onnxruntime also have `onnxruntime_version` (the installed release):
    it picks which file of a graph they get when the export has several (runtime/graph_forms.py)."""

    name: str

    def load(self, path: Path, info: GraphInfo) -> GraphSession: ...
