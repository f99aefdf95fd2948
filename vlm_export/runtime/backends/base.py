"""The one small interface every backend implements; the generation loop never knows which one runs.

Values passed between calls (the KV cache above all) are backend-native: a backend that keeps buffers on the
device returns device values from `run` and accepts them back as inputs, and only `to_numpy` copies to the host.
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

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run with named inputs (numpy arrays or values this backend returned earlier); all outputs by name."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray:
        """Copy one value to a host numpy array."""
        ...


class Backend(Protocol):
    name: str

    def load(self, path: Path, info: GraphInfo) -> GraphSession: ...
