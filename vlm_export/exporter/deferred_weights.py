"""Graph weights as recipes, evaluated one at a time while the graph file is written: memory holds one tensor.

A graph is traced on FakeTensor parameters (`weightless.py`), so its large initializers have shapes but no values.
Each gets a recipe instead: read the parameter from the checkpoint (`checkpoint.CheckpointWeights`), cast, take
its rows (the vocabulary-sliced lm_head), transpose (what the graph optimizer folds into a MatMul weight). Graph
passes that rewrite weights (`fuse_matmuls`, quantization) read them through `load` and hand their results to the
`WeightSink`, which appends each to `<graph>.onnx.data` at once; what is left is written at the end. No step
holds more than one weight group (a layer's q/k/v, one expert tensor) in memory.

The proto a pass sees marks a not-yet-written weight as external data at the location `DEFERRED`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: External-data location of a weight whose recipe has not been evaluated yet.
DEFERRED = "vlm_export:deferred"
#: Offsets in the data file are multiples of this, so ONNX Runtime can memory-map every weight.
ALIGNMENT = 4096

Recipe = Callable[[], np.ndarray]


class WeightReader:
    """What `export_graph` needs from a checkpoint: a model parameter by name, as a torch tensor of `dtype`."""

    def read(self, name: str, dtype: Any, rows: tuple[int, int] | None = None) -> Any:  # pragma: no cover
        """Parameter `name` (only rows `start:stop` when given) as a torch tensor of `dtype`."""
        raise NotImplementedError


def _external_field(tensor: onnx.TensorProto, key: str) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == key), None)


def is_deferred(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and _external_field(tensor, "location") == DEFERRED


class WeightSink:
    """Appends weights to one external-data file and points their TensorProtos at them."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("wb")
        self.bytes_written = 0
        self.written: set[str] = set()  # names of the tensors in this file

    def write(self, tensor: onnx.TensorProto, raw: bytes | np.ndarray) -> onnx.TensorProto:
        self._file.seek(-self._file.tell() % ALIGNMENT, os.SEEK_CUR)
        offset = self._file.tell()
        self._file.write(raw)
        self.bytes_written += len(raw)
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.written.add(tensor.name)
        return tensor

    def store(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A new initializer `name` holding `array`, written now (the `store` of graph passes)."""
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return self.write(tensor, tensor.raw_data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DeferredWeights:
    """Recipes of a graph proto's deferred initializers, and the `load` graph passes read weights with."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.recipes: dict[str, Recipe] = {}

    def placeholder(self, name: str, dims: list[int], data_type: int, recipe: Recipe) -> onnx.TensorProto:
        """A TensorProto with no data whose values `recipe` computes on demand."""
        tensor = onnx.TensorProto(name=name, dims=dims, data_type=data_type)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", DEFERRED
        self.recipes[name] = recipe
        return tensor

    def join(self, tensors: list[onnx.TensorProto], axis: int, name: str) -> onnx.TensorProto:
        """A deferred initializer `name`: the concatenation of `tensors` along `axis`, computed when written (or
        when a later pass loads it), so a fused weight that is then quantized is never written in float."""
        members = [copy_tensor(t) for t in tensors]
        dims = list(members[0].dims)
        dims[axis] = sum(int(t.dims[axis]) for t in members)
        return self.placeholder(
            name, dims, members[0].data_type, lambda: np.concatenate([self.load(t) for t in members], axis=axis)
        )

    def load(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A weight's values, whether deferred, written to a data file already, or inline."""
        if is_deferred(tensor):
            return self.recipes[tensor.name]()
        return numpy_helper.to_array(tensor, base_dir=str(self.folder))

    def write_all(
        self,
        graph: onnx.GraphProto,
        sink: WeightSink,
        inline_limit: int = 1024,
        on_write: Callable[[str], object] | None = None,
    ) -> None:
        """Evaluate and write every deferred weight still in `graph`, and move inline ones above `inline_limit`
        bytes out to the sink; recipes of weights a pass removed are dropped unevaluated."""
        for tensor in graph.initializer:
            if is_deferred(tensor):
                array = np.ascontiguousarray(self.recipes.pop(tensor.name)())
                expected = (tuple(tensor.dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                if (array.shape, array.dtype) != expected:
                    raise ValueError(f"{tensor.name}: recipe gave {array.shape} {array.dtype}, expected {expected}")
                sink.write(tensor, array.reshape(-1).view(np.uint8))  # no bytes copy of a multi-GB table
                del array
                if on_write is not None:
                    on_write(tensor.name)
            elif tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() > inline_limit:
                array = np.ascontiguousarray(numpy_helper.to_array(tensor))
                sink.write(tensor, array.reshape(-1).view(np.uint8))
        self.recipes.clear()


def copy_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copied = onnx.TensorProto()
    copied.CopyFrom(tensor)
    return copied


def transposed(recipe: Recipe, perm: list[int] | None) -> Recipe:
    """`recipe` followed by ONNX Transpose(perm) (reversed axes when perm is None), as a contiguous array."""

    def run() -> np.ndarray:
        return np.ascontiguousarray(np.transpose(recipe(), perm))

    return run


def parameter_recipe(
    weights: WeightReader,
    source: str,
    dtype: Any,
    rows: tuple[int, int] | None = None,
    derive: Callable[[Any], Any] | None = None,
) -> Recipe:
    """Read model parameter `source` (rows `start:stop` of it, or `derive` of it, when given) as a numpy array of
    `dtype`."""

    def run() -> np.ndarray:
        tensor = weights.read(source, dtype, rows=rows)
        if derive is not None:
            tensor = derive(tensor)
        return tensor.contiguous().numpy()

    return run
