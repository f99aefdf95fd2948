"""CUDA memory for the TensorRT backend, through polygraphy's CUDA wrapper (ctypes over libcudart, never torch).

polygraphy's wrapper allocates, frees and copies; the few calls it lacks (memset, strided device copies, pinned host
memory, events) are made here on the same libcudart handle. `load_cuda_runtime` finds libcudart also where
polygraphy does not look (the CUDA 13 `nvidia-cuda-runtime` wheel's `nvidia/cu13/lib`) and turns "not found" into
one line instead of an OSError. `ScratchMemory` is the one device block every execution context of the backend
takes its activation memory from.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

from vlm_export.errors import VLMExportError

#: Where pip's CUDA runtime wheels put libcudart: CUDA 13 (`nvidia-cuda-runtime` 13.x), CUDA 12
#: (`nvidia-cuda-runtime-cu12`). polygraphy 0.53 looks only in the second.
CUDART_WHEEL_DIRS = (("nvidia", "cu13", "lib"), ("nvidia", "cuda_runtime", "lib"), ("nvidia", "cu12", "lib"))
CUDART_HINT = (
    "pip install 'vlm-export[trt]' (it brings the CUDA runtime wheel nvidia-cuda-runtime), or put the folder "
    "holding libcudart.so of your CUDA toolkit on LD_LIBRARY_PATH"
)
# cudaMemcpyKind / flags
DEVICE_TO_DEVICE = 3
EVENT_DISABLE_TIMING = 2
HOST_ALLOC_DEFAULT = 0

_loaded = False


class CudaError(VLMExportError):
    """A CUDA runtime call failed (out of memory, no device, a missing library)."""


def cudart_search_dirs() -> list[Path]:
    """Folders searched for libcudart, in order: LD_LIBRARY_PATH, the toolkit and system folders polygraphy
    searches, the Debian/Ubuntu multiarch folder, then pip's CUDA runtime wheels on sys.path."""
    env = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    system = ["/usr/local/cuda/lib64", "/usr/lib", "/lib", f"/usr/lib/{platform.machine()}-linux-gnu"]
    wheels = [
        Path(entry, *parts) for entry in sys.path if entry and os.path.isdir(entry) for parts in CUDART_WHEEL_DIRS
    ]
    return [Path(p) for p in [*env, *system]] + wheels


def find_cudart(dirs: list[Path]) -> Path | None:
    """The first libcudart.so* in `dirs` (polygraphy's own rule: first folder with a match wins)."""
    for folder in dirs:
        if folder.is_dir():
            hits = sorted(folder.glob("libcudart.so*"))
            if hits:
                return hits[0]
    return None


def load_cuda_runtime() -> Any:
    """polygraphy's `cuda` module with its wrapper loaded on a libcudart found by `find_cudart`, or a one-line
    `CudaError`. polygraphy searches LD_LIBRARY_PATH first, so the folder found is put there while it loads."""
    global _loaded
    from polygraphy import cuda

    if _loaded:
        return cuda
    found = find_cudart(cudart_search_dirs())
    if found is None:
        raise CudaError(f"the CUDA runtime library libcudart.so was not found; {CUDART_HINT}")
    saved = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(found.parent), *([saved] if saved else [])])
    try:
        cuda.wrapper()
    except Exception as error:  # OSError from ctypes, PolygraphyException from polygraphy's checks
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CudaError(f"cannot load the CUDA runtime {found} ({first}); {CUDART_HINT}") from None
    finally:
        if saved is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = saved
    _loaded = True
    return cuda


class CudaCalls:
    """Device memory and copies on one libcudart: polygraphy's wrapper plus the calls it lacks, each failing with a
    one-line `CudaError`."""

    def __init__(self, cuda: Any):
        self.cuda = cuda
        self.wrapper = cuda.wrapper()
        self.handle = self.wrapper.handle

    def _check(self, status: int, call: str) -> None:
        if status:
            raise CudaError(f"CUDA call {call} failed with error {status} (see cudaError_t); check `nvidia-smi`")

    def device_array(self, nbytes: int, what: str) -> Any:
        """A polygraphy DeviceArray of at least `nbytes` (at least 256: empty tensors still need an address)."""
        return self.resize(self.cuda.DeviceArray.raw((0,)), nbytes, what)

    def resize(self, array: Any, nbytes: int, what: str) -> Any:
        """`array` holding at least `nbytes` (reallocated, contents lost, when smaller)."""
        nbytes = max(int(nbytes), 256)
        if array.allocated_nbytes < nbytes:
            try:
                array.resize((nbytes,))
            except Exception:  # polygraphy raises PolygraphyException after logging the CUDA error
                raise CudaError(
                    f"cannot allocate {nbytes / 2**20:.1f} MiB of GPU memory for {what}: out of GPU memory? Lower "
                    "--max-batch / --max-seq-len or free the GPU"
                ) from None
        return array

    def to_device(self, dst: int, src: int, nbytes: int, stream: int | None) -> None:
        try:
            self.wrapper.memcpy(dst, src, nbytes, self.cuda.MemcpyKind.HostToDevice, stream)
        except Exception:
            raise CudaError(f"copying {nbytes} bytes to the GPU failed; check `nvidia-smi`") from None

    def to_host(self, dst: int, src: int, nbytes: int) -> None:
        try:
            self.wrapper.memcpy(dst, src, nbytes, self.cuda.MemcpyKind.DeviceToHost)
        except Exception:
            raise CudaError(f"copying {nbytes} bytes from the GPU failed (an earlier kernel may have failed)") from None

    def memset(self, ptr: int, nbytes: int, stream: int) -> None:
        """Zero `nbytes` at `ptr`, in stream order (no host array, no host-to-device copy)."""
        status = self.handle.cudaMemsetAsync(
            ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes), ctypes.c_void_p(stream)
        )
        self._check(status, "cudaMemsetAsync")

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int, stream: int) -> None:
        """Device-to-device copy of `rows` rows of `width` bytes between buffers of different row pitches."""
        status = self.handle.cudaMemcpy2DAsync(
            ctypes.c_void_p(dst),
            ctypes.c_size_t(dst_pitch),
            ctypes.c_void_p(src),
            ctypes.c_size_t(src_pitch),
            ctypes.c_size_t(width),
            ctypes.c_size_t(rows),
            ctypes.c_int(DEVICE_TO_DEVICE),
            ctypes.c_void_p(stream),
        )
        self._check(status, "cudaMemcpy2DAsync")

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it to the GPU are truly asynchronous (pageable ones stage
        through a driver buffer and may synchronize)."""
        ptr = ctypes.c_void_p()
        self._check(
            self.handle.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(HOST_ALLOC_DEFAULT)),
            "cudaHostAlloc",
        )
        return int(ptr.value)

    def free_host(self, ptr: int) -> None:
        self._check(self.handle.cudaFreeHost(ctypes.c_void_p(ptr)), "cudaFreeHost")

    def event(self) -> int:
        event = ctypes.c_void_p()
        self._check(
            self.handle.cudaEventCreateWithFlags(ctypes.byref(event), ctypes.c_uint(EVENT_DISABLE_TIMING)),
            "cudaEventCreateWithFlags",
        )
        return int(event.value)

    def record(self, event: int, stream: int) -> None:
        self._check(self.handle.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def wait(self, event: int) -> None:
        """Block the host until the work recorded before `event` is done."""
        self._check(self.handle.cudaEventSynchronize(ctypes.c_void_p(event)), "cudaEventSynchronize")

    def destroy(self, event: int) -> None:
        self._check(self.handle.cudaEventDestroy(ctypes.c_void_p(event)), "cudaEventDestroy")


class ScratchMemory:
    """The one device block every execution context takes its activation memory from (TensorRT's
    USER_MANAGED allocation). All contexts of a backend run one at a time on its stream, so none needs the block
    while another has it; TensorRT's default (STATIC) gives each context its own block sized for the engine's
    largest profile, one per decoder profile and per graph."""

    def __init__(self, calls: CudaCalls, stream: Any):
        self.calls = calls
        self.stream = stream
        self.array: Any = None

    @property
    def nbytes(self) -> int:
        return 0 if self.array is None else int(self.array.allocated_nbytes)

    def reserve(self, nbytes: int) -> int:
        """The block's address, grown to `nbytes` first when smaller (after the stream has drained: queued work
        may still use the old block). 0 when nothing was ever needed (TensorRT accepts null for size 0)."""
        if nbytes > self.nbytes:
            self.stream.synchronize()
            if self.array is None:
                self.array = self.calls.device_array(nbytes, "TensorRT activations")
            else:
                self.calls.resize(self.array, nbytes, "TensorRT activations")
        return 0 if self.array is None else int(self.array.ptr)

    def free(self) -> None:
        if self.array is not None:
            self.stream.synchronize()
            self.array.free()
            self.array = None


class PinnedStaging:
    """Page-locked host buffers that per-call host inputs are copied through to the GPU, one per input name.

    A buffer is rewritten only after the copies of the previous call have finished (an event recorded after them):
    the host may run ahead of the GPU by one call, never overwrite what the GPU is still reading."""

    LIMIT = 64 << 20  # larger inputs (rare: pixels of many images) are copied from pageable memory

    def __init__(self, calls: CudaCalls):
        self.calls = calls
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.copied = calls.event()
        self.pending = False

    def copy(self, name: str, array: Any, device_ptr: int, stream: int) -> None:
        """Copy the contiguous numpy `array` to `device_ptr`, through this input's pinned buffer."""
        nbytes = int(array.nbytes)
        if nbytes > self.LIMIT:
            self.calls.to_device(device_ptr, array.ctypes.data, nbytes, stream)
            return
        if self.pending:  # the previous call's copies may still read the pinned buffers
            self.calls.wait(self.copied)
            self.pending = False
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.calls.free_host(ptr)
            size = max(nbytes, 2 * size, 4096)
            ptr = self.calls.host_alloc(size)
            self.buffers[name] = (ptr, size)
        ctypes.memmove(ptr, array.ctypes.data, nbytes)
        self.calls.to_device(device_ptr, ptr, nbytes, stream)

    def done(self, stream: int) -> None:
        """Mark the end of one call's copies."""
        self.calls.record(self.copied, stream)
        self.pending = True

    def free(self) -> None:
        if self.pending:
            self.calls.wait(self.copied)
            self.pending = False
        for ptr, _ in self.buffers.values():
            self.calls.free_host(ptr)
        self.buffers.clear()
        self.calls.destroy(self.copied)
