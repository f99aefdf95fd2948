"""CUDA for the TensorRT backend, through polygraphy's CUDA wrapper (ctypes over libcudart, never torch).

`load_cuda_runtime` finds libcudart also where polygraphy does not look (the CUDA 13 `nvidia-cuda-runtime` wheel's
`nvidia/cu13/lib`) and turns "not found" into one line instead of an OSError.
"""

from __future__ import annotations

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
