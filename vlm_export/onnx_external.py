"""The external-data file names an ONNX model refers to, read from its protobuf without the `onnx` package.

An ONNX graph keeps large tensors in other files named by each tensor's `external_data` "location" entry; whoever
loads the graph (ONNX Runtime, TensorRT's parser) opens those files. An export folder from someone else could name
any file there, so the runtime checks every location before a graph is loaded (recent ONNX Runtime versions check
too; older ones and TensorRT's parser may not). The runtime does not depend on `onnx`, so this walks the protobuf
wire format itself, descending only into the messages that can hold tensors: the graph, its initializers and sparse
initializers, node attributes (tensors and subgraphs, e.g. `If`/`Loop` bodies) and model-local functions.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OnnxFormatError", "external_data_locations"]

# Field numbers from onnx.proto (checked against onnx's descriptors in tests/test_manifest.py).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64  # nested subgraphs; deeper is not a model anyone exports
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFormatError("field number 0")
        if wire == _VARINT:
            _, pos = _varint(data, pos, end)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise OnnxFormatError("a field runs past the end of its message")
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) are not used by onnx.proto
            raise OnnxFormatError(f"unsupported wire type {wire}")
        if pos > end:
            raise OnnxFormatError("a field runs past the end of its message")


def _tensor(data, start: int, end: int, out: list[str]) -> None:
    for number, lo, hi in _fields(data, start, end):
        if number != _TENSOR_EXTERNAL_DATA:
            continue
        key = value = None
        for entry, a, b in _fields(data, lo, hi):
            if entry == _ENTRY_KEY:
                key = bytes(data[a:b])
            elif entry == _ENTRY_VALUE:
                value = bytes(data[a:b])
        if key == b"location":
            try:
                out.append((value or b"").decode("utf-8"))
            except UnicodeDecodeError:
                raise OnnxFormatError("an external data location is not UTF-8") from None


def _sparse(data, start: int, end: int, out: list[str]) -> None:
    for number, lo, hi in _fields(data, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(data, lo, hi, out)


def _attribute(data, start: int, end: int, out: list[str], depth: int) -> None:
    for number, lo, hi in _fields(data, start, end):
        if number in (_ATTR_T, _ATTR_TENSORS):
            _tensor(data, lo, hi, out)
        elif number in (_ATTR_G, _ATTR_GRAPHS):
            _graph(data, lo, hi, out, depth + 1)
        elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
            _sparse(data, lo, hi, out)


def _nodes_of(data, start: int, end: int, node_field: int, out: list[str], depth: int) -> None:
    for number, lo, hi in _fields(data, start, end):
        if number == node_field:
            for attr_number, a, b in _fields(data, lo, hi):
                if attr_number == _NODE_ATTRIBUTE:
                    _attribute(data, a, b, out, depth)


def _graph(data, start: int, end: int, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    for number, lo, hi in _fields(data, start, end):
        if number == _GRAPH_INITIALIZER:
            _tensor(data, lo, hi, out)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _sparse(data, lo, hi, out)
    _nodes_of(data, start, end, _GRAPH_NODE, out, depth)


def external_data_locations(path: str | Path) -> list[str]:
    """Every distinct external-data location the ONNX model at `path` names, in order of appearance.

    Raises :class:`OnnxFormatError` when the file is not a well-formed protobuf message (whether it is a valid
    ONNX model beyond that is for the loader to say) and `OSError` when it cannot be read.
    """
    out: list[str] = []
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size == 0:
            return out
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:  # weights inline: no copy
            for number, lo, hi in _fields(data, 0, size):
                if number == _MODEL_GRAPH:
                    _graph(data, lo, hi, out, 0)
                elif number == _MODEL_FUNCTIONS:
                    _nodes_of(data, lo, hi, _FUNCTION_NODE, out, 0)
    return list(dict.fromkeys(out))
