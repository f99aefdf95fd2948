"""A CPU stand-in for TensorRT's Python runtime and polygraphy's CUDA wrapper, to test the trt backend's own logic
(profile choice, bindings, cache buffers, shared activation memory, pinned staging) and build-engines' orchestration
without a GPU. Real engines: tests/test_gpu.py.

"Device" memory is host memory; an engine is the ONNX graph build-engines would have handed TensorRT, run by ONNX
Runtime on the CPU, within the profiles build-engines gave it. Only what vlm_export calls exists, with TensorRT 10's
Python names and failure conventions (False / None), and it checks what TensorRT checks: input shapes inside the
context's profile and static dimensions at their size, a USER_MANAGED context given enough device memory before it
runs, an aliased (KVCacheUpdate) output bound to its input's address, every address inside a live allocation.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np

_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 9: "BOOL"}


def _value(arg: Any) -> Any:
    return arg.value if hasattr(arg, "value") else arg


@dataclass
class FakeDevice:
    """The fake GPU: allocations by address, and a log of what was asked of it."""

    allocations: dict[int, Any] = field(default_factory=dict)  # device address -> ctypes buffer
    pinned: dict[int, Any] = field(default_factory=dict)  # page-locked host address -> ctypes buffer
    copies: list[tuple[str, int, bool]] = field(default_factory=list)  # (kind, bytes, from pinned memory)
    memsets: list[int] = field(default_factory=list)
    row_copies: list[int] = field(default_factory=list)  # bytes per cudaMemcpy2DAsync
    mallocs: list[int] = field(default_factory=list)
    contexts: list[FakeContext] = field(default_factory=list)
    synchronizations: int = 0

    def malloc(self, nbytes: int) -> int:
        buffer = (ctypes.c_char * max(int(nbytes), 1))()
        address = ctypes.addressof(buffer)
        self.allocations[address] = buffer
        self.mallocs.append(int(nbytes))
        return address

    def free(self, address: int) -> None:
        assert address in self.allocations, f"cudaFree of an address never allocated: {address:#x}"
        del self.allocations[address]

    def check(self, address: int, nbytes: int, what: str) -> None:
        """`nbytes` from `address` lie inside one live device allocation (TensorRT would fault otherwise)."""
        for start, buffer in self.allocations.items():
            if start <= address and address + nbytes <= start + ctypes.sizeof(buffer):
                return
        raise AssertionError(f"{what}: {nbytes} bytes at {address:#x} are outside every live device allocation")

    def is_pinned(self, address: int) -> bool:
        return any(s <= address < s + ctypes.sizeof(b) for s, b in self.pinned.items())


class FakeHandle:
    """libcudart's functions the backend calls through ctypes (under their C names)."""

    def __init__(self, device: FakeDevice):
        self.device = device
        self.events = 0

    def cudaSetDevice(self, device_id):
        return 0 if _value(device_id) == 0 else 101

    def cudaDeviceGetAttribute(self, out, attribute, device_id):
        out._obj.value = {75: 9, 76: 0}[_value(attribute)]
        return 0

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self.device.check(_value(ptr), _value(nbytes), "cudaMemsetAsync")
        ctypes.memset(_value(ptr), _value(value), _value(nbytes))
        self.device.memsets.append(_value(nbytes))
        return 0

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        dst, dpitch, src, spitch = _value(dst), _value(dpitch), _value(src), _value(spitch)
        width, height = _value(width), _value(height)
        self.device.check(dst, dpitch * (height - 1) + width, "cudaMemcpy2DAsync destination")
        self.device.check(src, spitch * (height - 1) + width, "cudaMemcpy2DAsync source")
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.device.row_copies.append(width * height)
        return 0

    def cudaHostAlloc(self, out, nbytes, flags):
        buffer = (ctypes.c_char * _value(nbytes))()
        out._obj.value = ctypes.addressof(buffer)
        self.device.pinned[ctypes.addressof(buffer)] = buffer
        return 0

    def cudaFreeHost(self, ptr):
        del self.device.pinned[_value(ptr)]
        return 0

    def cudaEventCreateWithFlags(self, out, flags):
        self.events += 1
        out._obj.value = self.events
        return 0

    def cudaEventRecord(self, event, stream):
        return 0

    def cudaEventSynchronize(self, event):
        return 0

    def cudaEventDestroy(self, event):
        return 0


class FakeWrapper:
    """polygraphy.cuda.wrapper(): malloc / free / memcpy and the raw libcudart handle."""

    def __init__(self, device: FakeDevice):
        self.device = device
        self.handle = FakeHandle(device)

    def malloc(self, nbytes: int) -> int:
        return self.device.malloc(nbytes)

    def free(self, ptr: int) -> None:
        self.device.free(ptr)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream_ptr: int | None = None) -> None:
        kind = {1: "HostToDevice", 2: "DeviceToHost", 3: "DeviceToDevice"}[_value(kind)]
        if kind != "HostToDevice":
            self.device.check(src, nbytes, f"memcpy {kind} source")
        if kind != "DeviceToHost":
            self.device.check(dst, nbytes, f"memcpy {kind} destination")
        ctypes.memmove(dst, src, nbytes)
        self.device.copies.append((kind, int(nbytes), self.device.is_pinned(src)))


def fake_cuda(device: FakeDevice) -> Any:
    """A stand-in for the `polygraphy.cuda` module."""
    wrapper = FakeWrapper(device)

    class DeviceArray:
        def __init__(self):
            self.ptr, self.allocated_nbytes, self.shape = None, 0, (0,)

        @staticmethod
        def raw(shape):
            return DeviceArray().resize(shape)

        def resize(self, shape):
            nbytes = int(np.prod(shape))
            if nbytes > self.allocated_nbytes:
                self.free()
                self.ptr, self.allocated_nbytes = wrapper.malloc(nbytes), nbytes
            self.shape = shape
            return self

        def free(self):
            if self.ptr is not None:
                wrapper.free(self.ptr)
            self.ptr, self.allocated_nbytes = None, 0

    class Stream:
        ptr = 0x5

        def synchronize(self):
            device.synchronizations += 1

    kinds = SimpleNamespace(HostToHost=0, HostToDevice=1, DeviceToHost=2, DeviceToDevice=3)
    return SimpleNamespace(DeviceArray=DeviceArray, Stream=Stream, MemcpyKind=kinds, wrapper=lambda: wrapper)


# -- TensorRT -------------------------------------------------------------------------------------------------
class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: str):
        self.engine = engine
        self.strategy = strategy
        self.profile: int | None = None
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profiles_run: list[int] = []
        self.memory_run: list[int] = []  # the activation memory address of each run
        self.results: dict[str, np.ndarray] | None = None  # this call's outputs, computed once
        engine.device.contexts.append(self)

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (int(address), int(size))

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
        static = self.engine.static[name]
        if len(shape) != len(low) or any(s not in (-1, v) for s, v in zip(static, shape, strict=True)):
            return False
        if any(v < lo or v > hi for v, lo, hi in zip(shape, low, high, strict=True)):
            return False
        self.shapes[name] = tuple(int(v) for v in shape)
        self.results = None
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        if name in self.engine.inputs:
            self.results = None
        return True

    def _run(self) -> dict[str, np.ndarray]:
        if self.results is not None:
            return self.results
        feeds = {}
        for name in self.engine.inputs:
            dtype = np.dtype(_NUMPY[self.engine.dtypes[name]])
            nbytes = int(np.prod(self.shapes[name], dtype=np.int64)) * dtype.itemsize
            address = self.addresses[name]
            self.engine.device.check(address, nbytes, f"input {name}")
            raw = (ctypes.c_char * nbytes).from_address(address) if nbytes else b""
            feeds[name] = np.frombuffer(bytes(raw), dtype=dtype).reshape(self.shapes[name])
        outputs = self.engine.session.run(self.engine.outputs, feeds)
        self.results = dict(zip(self.engine.outputs, outputs, strict=True))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._run()[name].shape)

    def execute_async_v3(self, stream: int) -> bool:
        if self.profile is None or set(self.shapes) != set(self.engine.inputs):
            return False
        if self.strategy == "USER_MANAGED":
            needed = self.engine.get_device_memory_size_for_profile_v2(self.profile)
            if self.memory is None or self.memory[1] < needed:
                return False
            if needed:
                self.engine.device.check(self.memory[0], needed, "activation memory")
        for output, source in self.engine.aliases.items():
            if self.addresses.get(output) != self.addresses[source]:
                return False  # TensorRT: "If different addresses are assigned, TensorRT reports an API error"
        outputs, self.results = self._run(), None
        for name, value in outputs.items():
            value = np.ascontiguousarray(value)
            self.engine.device.check(self.addresses[name], value.nbytes, f"output {name}")
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.profiles_run.append(self.profile)
        self.memory_run.append(self.memory[0] if self.memory else 0)
        return True


class FakeEngine:
    """An engine as build-engines leaves it: IO, profiles and static dims from the graph TensorRT would parse."""

    def __init__(self, spec: dict, device: FakeDevice, version: tuple[int, int]):
        import onnxruntime as ort

        self.device = device
        self.spec = spec
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = spec["dtypes"]
        self.static = {name: tuple(dims) for name, dims in spec["static"].items()}
        self.aliases = spec["aliases"]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.num_optimization_profiles = len(spec["profiles"])
        if version >= (10, 15):  # ICudaEngine::getAliasedInputTensor is new in 10.15
            self.get_aliased_input_tensor = lambda name: self.aliases.get(name)

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, *self.outputs][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[list[int]]:
        shapes = self.spec["profiles"][index]["shapes"][name]
        return [shapes["min"], shapes["opt"], shapes["max"]]

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return int(self.spec["memory"][index])

    def create_execution_context(self, strategy: str = "STATIC") -> FakeContext:
        return FakeContext(self, strategy)


def fake_trt(device: FakeDevice, version: str) -> Any:
    """A stand-in for the `tensorrt` module."""
    parsed = tuple(int(p) for p in version.split(".")[:2])

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                spec = json.loads(data)
            except ValueError:
                return None
            return FakeEngine(spec, device, parsed)

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level: str = "WARNING"):
            self.level = level

    return SimpleNamespace(
        __version__=version,
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        ExecutionContextAllocationStrategy=SimpleNamespace(
            STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"
        ),
        nptype=lambda dtype: _NUMPY[dtype],
        Logger=Logger,
        Runtime=Runtime,
    )


def _engine_spec(source: Path, engine_path: Path, specs: list, memory_unit: int) -> dict:
    """What the fake engine file holds: the graph TensorRT was given (kept beside the engine: build-engines deletes
    its TensorRT copy), profiles, static dims, aliases, activation memory per profile."""
    import onnx

    from vlm_export.exporter.trt_ops import TRT_DECOMPOSABLE

    model = onnx.load(str(source), load_external_data=False)
    for node in model.graph.node:  # TensorRT-private attribute, which ONNX Runtime refuses
        kept = [a for a in node.attribute if a.name != TRT_DECOMPOSABLE]
        del node.attribute[:]
        node.attribute.extend(kept)
    graph = engine_path.with_suffix(".fake.onnx")
    onnx.save(model, str(graph))
    values = [*model.graph.input, *model.graph.output]
    in_place = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "TensorScatter"}
    return {
        "onnx": str(graph),
        "profiles": [spec.to_json() for spec in specs],
        "dtypes": {v.name: _ONNX_TYPES[v.type.tensor_type.elem_type] for v in values},
        "static": {
            v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input
        },
        "aliases": {out: inp for out, inp in in_place.items() if out in {o.name for o in model.graph.output}},
        "memory": [memory_unit * (index + 1) for index in range(len(specs))],
    }


@contextlib.contextmanager
def fake_tensorrt(version: str = "10.16.1.11", memory_unit: int = 1 << 16) -> Iterator[FakeDevice]:
    """Within it, `tensorrt` is this fake for build-engines and the trt backend: engines are written as JSON
    specs (`_engine_spec`), the GPU is host memory. Yields the fake device to inspect."""
    from vlm_export.exporter import engines
    from vlm_export.runtime.backends import trt as trt_backend

    device = FakeDevice()
    cuda = fake_cuda(device)
    module = fake_trt(device, version)

    def build_one(source, engine_path, specs, precision, strongly_typed, timing_cache, *args):
        engine_path.write_text(json.dumps(_engine_spec(source, engine_path, specs, memory_unit)))
        timing_cache.write_bytes(b"fake timing cache")  # polygraphy's save_timing_cache

    with (
        mock.patch.object(engines, "require_tensorrt", lambda: module),
        mock.patch.object(engines, "_build_one", build_one),
        mock.patch.object(trt_backend, "_import_trt", lambda: (module, cuda)),
        mock.patch.object(trt_backend, "compute_capability", lambda device_id=0, cuda_module=None: "9.0"),
    ):
        yield device
