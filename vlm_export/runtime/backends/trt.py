"""TensorRT backend: engines built by `vlm-export build-engines`, run with execution contexts on one CUDA stream.

Device memory goes through polygraphy's CUDA wrapper (ctypes over libcudart, `cuda_memory`), never torch. Outputs
are `GpuTensor`s that stay on the GPU and are accepted back as inputs; only `to_numpy` copies (the last-position
logits, once per step). Each output name has two device buffers used in turn, so an output stays valid until the
session has run twice more. Host inputs go to the GPU through pinned buffers. Every execution context (one per
optimization profile, created on first use) takes its activation memory from the backend's one shared block.

The KV cache: `allocate` gives one zeroed buffer per cache input and `run(..., into=...)` writes the matching
`present` output into it. An engine that imported TensorScatter as KVCacheUpdate (TensorRT 10.15+) updates it in
place: `present` is bound to the `past` address (the engine names the pair, `get_aliased_input_tensor`), and the
cache has the engine's fixed capacity (max-seq-len) whatever the caller asked for. An engine built from the
rewritten graph (TensorRT < 10.15: an out-of-place scatter) writes `present` to the cache's second buffer, and the
two swap after the run (no copy back); its capacity is dynamic, and `grow` enlarges it as the request goes on.

tensorrt and polygraphy are imported when the backend is created, never at module import, so the runtime imports
and runs on machines without them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import InputError, VLMExportError
from vlm_export.manifest import GraphInfo, Manifest, confined_path
from vlm_export.runtime.backends.cuda_memory import CudaCalls, PinnedStaging, ScratchMemory, load_cuda_runtime

logger = logging.getLogger(__name__)

ENGINE_KEY = "tensorrt"  # manifest.engines[ENGINE_KEY] holds what `build-engines` wrote
INSTALL_HINT = (
    "install it with `pip install 'vlm-export[trt]'` on a machine with an NVIDIA GPU, or use the Docker image "
    "(see the README)"
)
# Which export/build flag raises the limit behind each symbolic axis (any other axis is a vision axis).
AXIS_FLAGS = {
    "batch": "--max-batch",
    "sequence": "--max-seq-len",
    "cache_capacity": "--max-seq-len",
    "total_sequence": "--max-seq-len",
}
VISION_FLAGS = "--max-images or --max-image-pixels"


class BackendError(VLMExportError):
    """A TensorRT engine is missing, stale or failed to run; the message says how to fix it."""


def rebuild_command(folder: Path | str) -> str:
    return f"vlm-export build-engines {folder}"


def engine_mismatch(meta: Mapping[str, Any], trt_version: str, compute_capability: str | None) -> str | None:
    """Why engines described by `meta` cannot run here (None if they can): TensorRT engines run only with the
    TensorRT version that built them and on GPUs of the same compute capability."""

    def release(version: str) -> tuple[str, ...]:
        return tuple(str(version).split(".")[:3])

    built_version = meta.get("tensorrt_version")
    built_cc = meta.get("compute_capability")
    reasons = []
    if built_version and release(built_version) != release(trt_version):
        reasons.append(f"TensorRT {built_version} built them, this machine has TensorRT {trt_version}")
    if built_cc and compute_capability and str(built_cc) != str(compute_capability):
        reasons.append(f"they were built for compute capability {built_cc}, this GPU is {compute_capability}")
    return "; ".join(reasons) or None


def check_engines(folder: Path, manifest: Manifest, trt_version: str, compute_capability: str | None) -> dict:
    """The manifest's TensorRT section, after checking it exists and matches this machine."""
    meta = manifest.engines.get(ENGINE_KEY)
    if not meta or not meta.get("graphs"):
        raise BackendError(
            f"{folder} has no TensorRT engines; build them on this machine with `{rebuild_command(folder)}` "
            "(or export with --engine trt)"
        )
    reason = engine_mismatch(meta, trt_version, compute_capability)
    if reason:
        raise BackendError(
            f"the TensorRT engines in {folder} cannot run here: {reason}; rebuild them with `{rebuild_command(folder)}`"
        )
    return meta


def limit_message(graph: str, name: str, axis: str, value: int, low: int, high: int, folder: Path | str) -> str:
    """One line for an input outside every profile: which limit, and which flag raises it."""
    flag = AXIS_FLAGS.get(axis, VISION_FLAGS)
    what = "the images of one request" if axis not in AXIS_FLAGS else axis.replace("_", " ")
    return (
        f"{graph}: {name} needs {axis}={value} but the TensorRT engine was built for {low}..{high}; reduce "
        f"{what} or rebuild the engines with a larger {flag} (`{rebuild_command(folder)} {flag.split()[0]} N`)"
    )


@dataclass
class GpuTensor:
    """A tensor in device memory owned by a session: an output (valid until that session's second-next run) or
    an `allocate`d buffer (`owner`: the input it was allocated for; `spare`: its second buffer when the engine
    writes the cache out of place, swapped with `ptr` after each run)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: str | None = None
    spare: int | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            f"the trt backend needs TensorRT, which is not installed: {INSTALL_HINT}; or use --backend ort-cpu"
        ) from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise BackendError(
            f"the trt backend needs polygraphy, which is not installed: {INSTALL_HINT}; or use --backend ort-cpu"
        ) from None
    return trt, load_cuda_runtime()


def compute_capability(device_id: int = 0, cuda: Any = None) -> str:
    """ "major.minor" of a CUDA device, via the CUDA runtime polygraphy loads."""
    handle = (cuda or load_cuda_runtime()).wrapper().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    # cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76
    if handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, device_id) or handle.cudaDeviceGetAttribute(
        ctypes.byref(minor), 76, device_id
    ):
        raise BackendError(f"cannot query CUDA device {device_id}; check `nvidia-smi` and the CUDA driver")
    return f"{major.value}.{minor.value}"


def profile_memory(engine: Any, index: int) -> int:
    """Activation memory an execution context needs for profile `index` (TensorRT 10.1+; the engine-wide
    maximum before)."""
    query = getattr(engine, "get_device_memory_size_for_profile_v2", None)
    if query is not None:
        return int(query(index))
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def profile_distance(ranges: Mapping[str, tuple], shapes: Mapping[str, tuple[int, ...]]) -> float:
    """How far `shapes` are from a profile's opt shapes, each axis scaled by its range: the profile TensorRT tuned
    for shapes most like these has the smallest distance."""
    distance = 0.0
    for name, shape in shapes.items():
        low, opt, high = ranges[name]
        for value, lo, op, hi in zip(shape, low, opt, high, strict=True):
            if hi > lo:
                distance += abs(value - op) / (hi - lo)
    return distance


class TrtSession:
    """One engine; one execution context per optimization profile, created on first use."""

    def __init__(self, backend: TrtBackend, engine: Any, info: GraphInfo, name: str, meta: dict):
        trt = backend.trt
        self.backend = backend
        self.calls = backend.calls
        self.engine = engine
        self.info = info
        self.name = name
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.ranges = [
            {
                n: tuple(tuple(int(v) for v in dims) for dims in engine.get_tensor_profile_shape(n, index))
                for n in self.inputs
            }
            for index in range(engine.num_optimization_profiles)
        ]
        self.axes = {t.name: t.shape for t in info.inputs}
        self.aliases = self._aliases(meta)
        self.contexts: dict[int, Any] = {}
        self.memory_sizes: dict[int, int] = {}  # profile -> activation memory its context needs
        self.context_memory: dict[int, tuple[int, int]] = {}  # profile -> (address, size) set on its context
        self.staging: dict[str, Any] = {}
        self.pinned = PinnedStaging(self.calls)
        self.pools: dict[str, list[Any]] = {}
        self.turns: dict[str, int] = {}
        self.buffers: dict[str, list[Any]] = {}  # allocate()d input name -> its device arrays

    def _aliases(self, meta: dict) -> dict[str, str]:
        """Output -> the input whose memory it must share (KVCacheUpdate updates the cache in place)."""
        query = getattr(self.engine, "get_aliased_input_tensor", None)  # TensorRT 10.15+
        if query is not None:
            return {name: query(name) for name in self.outputs if query(name)}
        if "TensorScatter" in meta.get("rewritten_ops", []):
            return {}
        pairs = {name: name.replace("present.", "past_key_values.", 1) for name in self.outputs}
        return {out: inp for out, inp in pairs.items() if out.startswith("present.") and inp in self.inputs}

    # -- profiles ------------------------------------------------------------------------------------
    def _fits(self, index: int, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            low, _, high = self.ranges[index][name]
            if len(shape) != len(low) or any(v < lo or v > hi for v, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The profile that accepts `shapes` and was tuned for the most similar ones (decode steps fit the
        prefill profile too, but run the kernels tuned for one token)."""
        fitting = [index for index in range(len(self.ranges)) if self._fits(index, shapes)]
        if fitting:
            return min(fitting, key=lambda index: profile_distance(self.ranges[index], shapes))
        # Name the first axis outside the widest range any profile allows.
        for name, shape in shapes.items():
            for dim, value in enumerate(shape):
                low = min(int(r[name][0][dim]) for r in self.ranges)
                high = max(int(r[name][2][dim]) for r in self.ranges)
                if not low <= value <= high:
                    axis = self.axes.get(name, [])[dim] if dim < len(self.axes.get(name, [])) else f"dim{dim}"
                    raise InputError(limit_message(self.name, name, str(axis), value, low, high, self.backend.folder))
        raise InputError(
            f"{self.name}: no TensorRT profile accepts the input shapes {dict(shapes)} together "
            f"(profiles: {[r for r in self.ranges]}); rebuild with `{rebuild_command(self.backend.folder)}`"
        )

    def _context(self, index: int) -> Any:
        """The context of profile `index`, its activation memory in the backend's shared block."""
        context = self.contexts.get(index)
        created = context is None
        if created:
            strategy = self.backend.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise BackendError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
            self.contexts[index] = context
        size = self.memory_sizes.get(index)
        if size is None:
            size = self.memory_sizes[index] = profile_memory(self.engine, index)
        address = self.backend.scratch.reserve(size)
        if self.context_memory.get(index) != (address, size):
            context.set_device_memory(address, size)
            self.context_memory[index] = (address, size)
        if created and not context.set_optimization_profile_async(index, self.backend.stream.ptr):
            raise BackendError(f"{self.name}: TensorRT refused optimization profile {index}")
        return context

    # -- buffers -------------------------------------------------------------------------------------
    def _input_ptr(self, name: str, value: Any) -> tuple[int, tuple[int, ...]]:
        want = self.dtypes[name]
        if isinstance(value, GpuTensor):
            if value.dtype != want:
                raise BackendError(f"{self.name}: {name} is {value.dtype} on the GPU but the engine takes {want}")
            return value.ptr, value.shape
        array = np.ascontiguousarray(value, dtype=want)
        buffer = self.staging.get(name)
        if buffer is None:
            buffer = self.staging[name] = self.calls.device_array(array.nbytes, f"{self.name} input {name}")
        self.calls.resize(buffer, array.nbytes, f"{self.name} input {name}")
        if array.nbytes:
            self.pinned.copy(name, array, buffer.ptr, self.backend.stream.ptr)
        return buffer.ptr, tuple(array.shape)

    def _output_buffer(self, name: str, nbytes: int, busy: set[int]) -> Any:
        """The output's two buffers in turn (one that is not an input of this call)."""
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = [self.calls.device_array(nbytes, f"{self.name} output {name}") for _ in "ab"]
        turn = self.turns.get(name, 0)
        for index in (turn, 1 - turn):
            if pool[index].ptr not in busy:
                self.turns[name] = 1 - index
                return self.calls.resize(pool[index], nbytes, f"{self.name} output {name}")
        raise BackendError(f"{self.name}: both buffers of output {name} are inputs of this call")

    def _fixed_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`shape` with the axes every profile fixes set to that size (a KVCacheUpdate cache's capacity)."""
        if name not in self.inputs:
            raise BackendError(f"{self.name}: the engine has no input {name}")
        fixed = []
        for dim, wanted in enumerate(shape):
            lows = {int(r[name][0][dim]) for r in self.ranges}
            highs = {int(r[name][2][dim]) for r in self.ranges}
            fixed.append(lows.pop() if len(lows) == 1 and lows == highs else wanted)
        return tuple(fixed)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> GpuTensor:
        """This input's device buffers (reused from call to call) for `shape`, with the axes the engine fixes."""
        tensor = GpuTensor(0, self._fixed_shape(name, shape), self.dtypes[name], owner=name)
        arrays = self.buffers.setdefault(name, [])
        if not arrays:
            arrays.append(self.calls.device_array(tensor.nbytes, f"{self.name} {name}"))
        for array in arrays:  # the second buffer of an out-of-place cache, when there is one
            self.calls.resize(array, tensor.nbytes, f"{self.name} {name}")
        tensor.ptr = int(arrays[0].ptr)
        tensor.spare = int(arrays[1].ptr) if len(arrays) > 1 else None
        return tensor

    def allocate(self, name: str, shape: tuple[int, ...]) -> GpuTensor:
        """Zeros for input `name` (reusing this input's previous buffers), zeroed on the GPU; axes every profile
        fixes take that size."""
        tensor = self._buffer(name, shape)
        # finite: masked slots still enter attention's weighted sum as 0 * x
        self.calls.memset(tensor.ptr, tensor.nbytes, self.backend.stream.ptr)
        return tensor

    def upload(self, name: str, array: np.ndarray) -> GpuTensor:
        """`array` in this input's buffer (the one `allocate` gives), zero-padded along axes the engine fixes."""
        tensor = self._buffer(name, array.shape)
        host = np.zeros(tensor.shape, dtype=tensor.dtype)
        host[tuple(slice(0, n) for n in array.shape)] = array
        # from pageable memory: the call returns once `host` is staged, so it may go out of scope
        self.calls.to_device(tensor.ptr, host.ctypes.data, host.nbytes, self.backend.stream.ptr)
        return tensor

    def _spare(self, target: GpuTensor) -> int:
        """The second buffer of an `allocate`d cache, created on its first out-of-place write."""
        if target.spare is None:
            arrays = self.buffers.get(target.owner or "", [])
            if not any(int(a.ptr) == target.ptr for a in arrays):
                raise BackendError(f"{self.name}: an `into` buffer must come from this session's allocate")
            spare = self.calls.device_array(target.nbytes, f"{self.name} {target.owner}")
            arrays.append(spare)
            target.spare = int(spare.ptr)
        return target.spare

    # -- run -----------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any], into: Mapping[str, Any] | None = None) -> dict[str, GpuTensor]:
        into = into or {}
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise BackendError(f"{self.name}: inputs {missing} were not given")
        bound = {name: self._input_ptr(name, feeds[name]) for name in self.inputs}
        stream = self.backend.stream.ptr
        self.pinned.done(stream)
        index = self.select_profile({name: shape for name, (_, shape) in bound.items()})
        context = self._context(index)
        for name, (ptr, shape) in bound.items():
            if not context.set_input_shape(name, shape) or not context.set_tensor_address(name, ptr):
                raise BackendError(f"{self.name}: TensorRT rejected input {name} with shape {shape}")
        busy = {ptr for ptr, _ in bound.values()}
        outputs, swaps = {}, []
        for name in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.name}: output {name} has a data-dependent shape {shape}, not supported")
            dtype = self.dtypes[name]
            target = into.get(name)
            if target is not None:
                if target.shape != shape or target.dtype != dtype:
                    raise BackendError(
                        f"{self.name}: output {name} is {shape} {dtype} but the buffer given for it is "
                        f"{target.shape} {target.dtype}"
                    )
                aliased = self.aliases.get(name)
                if aliased is not None:  # in place: the very buffer of the input it aliases
                    if bound[aliased][0] != target.ptr:
                        raise BackendError(f"{self.name}: output {name} must be written into input {aliased}")
                    address = target.ptr
                else:
                    address = self._spare(target)
                    swaps.append(target)
                outputs[name] = target
            else:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                address = int(self._output_buffer(name, nbytes, busy).ptr)
                outputs[name] = GpuTensor(address, shape, dtype)
            if not context.set_tensor_address(name, address):
                raise BackendError(f"{self.name}: TensorRT rejected the address of output {name}")
        if not context.execute_async_v3(stream):
            raise BackendError(f"{self.name}: TensorRT execution failed (see the TensorRT log above)")
        for target in swaps:  # the new cache is in the spare buffer: it becomes the cache, the old one the spare
            target.ptr, target.spare = target.spare, target.ptr
        return outputs

    def grow(self, buffer: GpuTensor, shape: tuple[int, ...]) -> GpuTensor:
        """`buffer` enlarged to `shape` on the GPU (zeros, then its rows copied in). A buffer of an engine that
        fixes the axis is already at least that large (the engine's max-seq-len capacity)."""
        if all(have >= want for have, want in zip(buffer.shape, shape, strict=True)):
            return buffer
        grown = tuple(self._fixed_shape(buffer.owner, shape)) if buffer.owner in self.inputs else shape
        axes = [dim for dim, (have, want) in enumerate(zip(buffer.shape, grown, strict=True)) if have != want]
        if grown != tuple(shape) or len(axes) != 1 or buffer.owner not in self.buffers:
            raise BackendError(
                f"{self.name}: a {buffer.shape} buffer cannot grow to {shape}: the engine fixes its size; rebuild "
                "the engines with a larger --max-seq-len"
            )
        axis = axes[0]
        stream = self.backend.stream.ptr
        itemsize = buffer.dtype.itemsize
        tensor = GpuTensor(0, grown, buffer.dtype, owner=buffer.owner)
        array = self.calls.device_array(tensor.nbytes, f"{self.name} {buffer.owner}")
        tensor.ptr = int(array.ptr)
        self.calls.memset(tensor.ptr, tensor.nbytes, stream)
        rows = int(np.prod(buffer.shape[:axis], dtype=np.int64))
        src_pitch = int(np.prod(buffer.shape[axis:], dtype=np.int64)) * itemsize
        dst_pitch = int(np.prod(grown[axis:], dtype=np.int64)) * itemsize
        if rows and src_pitch:
            self.calls.copy_rows(tensor.ptr, dst_pitch, buffer.ptr, src_pitch, src_pitch, rows, stream)
        self.backend.stream.synchronize()  # the old buffers may still be read by queued work
        for old in self.buffers[buffer.owner]:
            old.free()
        self.buffers[buffer.owner] = [array]
        return tensor

    def to_numpy(self, value: Any) -> np.ndarray:
        if not isinstance(value, GpuTensor):
            return np.asarray(value)
        host = np.empty(value.shape, dtype=value.dtype)
        self.backend.stream.synchronize()
        if host.nbytes:
            self.calls.to_host(host.ctypes.data, value.ptr, host.nbytes)
        return host

    def free(self) -> None:
        self.backend.stream.synchronize()
        pooled = [b for pool in self.pools.values() for b in pool]
        owned = [b for arrays in self.buffers.values() for b in arrays]
        for buffer in [*self.staging.values(), *pooled, *owned]:
            buffer.free()
        self.pinned.free()
        self.staging.clear()
        self.pools.clear()
        self.buffers.clear()


class TrtBackend:
    """Loads `<graph>.engine` files listed in the manifest's `engines.tensorrt` section."""

    name = "trt"

    def __init__(self, device_id: int = 0):
        self.trt, self.cuda = _import_trt()
        self.device_id = device_id
        self.calls = CudaCalls(self.cuda)
        if self.calls.handle.cudaSetDevice(device_id):
            raise BackendError(f"CUDA device {device_id} is not available; check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
        self.compute_capability = compute_capability(device_id, self.cuda)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = self.cuda.Stream()
        self.scratch = ScratchMemory(self.calls, self.stream)
        self.folder: Path | None = None
        self._meta: dict | None = None

    def _engines(self, folder: Path) -> dict:
        if self._meta is None or self.folder != folder:
            manifest = Manifest.load(folder)
            self._meta = check_engines(folder, manifest, self.trt.__version__, self.compute_capability)
            self._manifest = manifest
            self.folder = folder
        return self._meta

    def load(self, path: Path, info: GraphInfo) -> TrtSession:
        folder = Path(path).parent
        meta = self._engines(folder)
        name = next((g for g, i in self._manifest.graphs.items() if i.file == info.file), Path(path).stem)
        entry = meta["graphs"].get(name)
        if entry is None:
            raise BackendError(f"no TensorRT engine for the {name} graph in {folder}; run `{rebuild_command(folder)}`")
        engine_path = confined_path(folder, entry.get("engine"), f"the {name} TensorRT engine", must_exist=False)
        if not engine_path.is_file():
            raise BackendError(f"{engine_path} is missing; rebuild the engines with `{rebuild_command(folder)}`")
        engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise BackendError(
                f"TensorRT {self.trt.__version__} cannot load {engine_path} (built by another TensorRT version or for "
                f"another GPU, or truncated); rebuild the engines with `{rebuild_command(folder)}`"
            )
        return TrtSession(self, engine, info, name, entry)
