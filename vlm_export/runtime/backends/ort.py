"""ONNX Runtime backends: CPU (the fallback that must always work) and CUDA (onnxruntime-gpu).

Both share one session class. With IO binding (always on CUDA, optional on CPU so the tests exercise the same
code) outputs stay `OrtValue`s on the session's device and are fed back as inputs unchanged; only `to_numpy`
copies (the last-position logits, once per step). The KV cache is an `allocate`d `OrtValue` bound both as the
`past` input and as the `present` output (`into`): ONNX Runtime's TensorScatter then writes only the new
positions, in place, on either device (on the CPU the `OrtValue` wraps a numpy array, no copy).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vlm_export.errors import ManifestError, VLMExportError
from vlm_export.manifest import GraphInfo

logger = logging.getLogger(__name__)

INSTALL_GPU_HINT = (
    "install onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime && pip install 'vlm-export[trt]'), "
    "or use --backend ort-cpu"
)


# ONNX Runtime's exceptions for a file that is not a model it can read (by name: the classes live in its private
# pybind module). Other load failures (an opset too new, out of memory) stay BackendErrors.
_BAD_FILE_ERRORS = frozenset({"InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "Fail", "NoModel"})


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class BackendError(VLMExportError):
    """A graph failed to load or run; the message names the graph and the likely fix."""


class OrtSession:
    def __init__(
        self,
        path: Path,
        info: GraphInfo,
        providers: list[Any],
        threads: int | None,
        *,
        device: str = "cpu",
        device_id: int = 0,
        io_binding: bool = False,
    ):
        self.info = info
        self.name = path.stem
        self.device = device
        self.device_id = device_id
        self.io_binding = io_binding
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types
            reason = " ".join(str(error).split())[:300]
            if type(error).__name__ in _BAD_FILE_ERRORS:
                raise ManifestError(
                    f"ONNX Runtime cannot load the graph file {path}: it is not a valid ONNX model ({reason}); the "
                    "file may be truncated or replaced: re-export the model"
                ) from None
            raise BackendError(
                f"ONNX Runtime cannot load {path} ({reason}); the file may be truncated: re-export the model, or "
                "upgrade onnxruntime"
            ) from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        missing = sorted(set(info.input_names()) ^ set(self._input_types)) + sorted(
            set(info.output_names()) - set(self.output_names)
        )
        if missing:
            raise ManifestError(
                f"{path} is not the graph manifest.json describes for it (inputs/outputs that differ: "
                f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); re-export the model"
            )

    def _fail(self, error: Exception, feeds: Mapping[str, Any]) -> BackendError:
        shapes = {name: _shape(value) for name, value in feeds.items()}
        return BackendError(
            f"ONNX Runtime failed running the {self.name} graph ({str(error).splitlines()[0]}); input shapes {shapes}"
        )

    def run(self, feeds: Mapping[str, Any], into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if self.io_binding or into:
            return self._run_bound(feeds, into or {})
        try:
            outputs = self.session.run(self.output_names, dict(feeds))
        except Exception as error:
            raise self._fail(error, feeds) from None
        return dict(zip(self.output_names, outputs, strict=True))

    def _run_bound(self, feeds: Mapping[str, Any], into: Mapping[str, Any]) -> dict[str, ort.OrtValue]:
        """Inputs already on the device (`OrtValue`s from an earlier call) are bound as they are, host arrays are
        copied once (on the CPU: wrapped); outputs named in `into` are written to those `OrtValue`s, the others
        are allocated by ONNX Runtime on the device; all are returned as `OrtValue`s."""
        binding = self.session.io_binding()
        try:
            for name, value in feeds.items():
                if not isinstance(value, ort.OrtValue):
                    value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
                binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                if name in into:
                    binding.bind_ortvalue_output(name, into[name])
                else:
                    binding.bind_output(name, self.device, self.device_id)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
        except Exception as error:
            raise self._fail(error, feeds) from None
        return dict(zip(self.output_names, outputs, strict=True))

    def allocate(self, name: str, shape: tuple[int, ...]) -> ort.OrtValue:
        dtype = _NUMPY_TYPES[self._input_types[name]]
        zeros = np.zeros(shape, dtype=dtype)  # finite: masked slots still enter attention's weighted sum as 0 * x
        return ort.OrtValue.ortvalue_from_numpy(zeros, self.device, self.device_id)

    def upload(self, name: str, array: np.ndarray) -> ort.OrtValue:
        dtype = _NUMPY_TYPES[self._input_types[name]]
        host = np.ascontiguousarray(array, dtype=dtype)  # on the CPU the OrtValue wraps it: a new array, not a view
        if host is array:
            host = array.copy()
        return ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)

    def grow(self, buffer: Any, shape: tuple[int, ...]) -> ort.OrtValue:
        """An `allocate`d buffer, or a `present` output (an `OrtValue`, or numpy from a plain run), enlarged."""
        if all(have >= want for have, want in zip(_shape(buffer), shape, strict=True)):
            return buffer
        old = self.to_numpy(buffer)  # a host copy also on CUDA: growing is rare (the room doubles), small beside a step
        grown = np.zeros(shape, dtype=old.dtype)
        grown[tuple(slice(0, n) for n in old.shape)] = old
        return ort.OrtValue.ortvalue_from_numpy(grown, self.device, self.device_id)

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, ort.OrtValue):
            return value.numpy()
        return np.asarray(value)


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, ort.OrtValue):
        return tuple(value.shape())
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def _threads(threads: int | None) -> int | None:
    env_threads = os.environ.get("VLM_EXPORT_THREADS")
    return threads or (int(env_threads) if env_threads else None)


class OrtCpuBackend:
    """ONNX Runtime on the CPU. Plain numpy in/out by default (nothing to keep on a device); `io_binding=True`
    runs the same IO-binding path as the CUDA backend, with the CPU as the device."""

    name = "ort-cpu"
    onnxruntime_version = ort.__version__  # picks the graph files this backend loads (runtime/graph_forms.py)

    def __init__(self, threads: int | None = None, io_binding: bool = False):
        self.threads = _threads(threads)
        self.io_binding = io_binding

    def load(self, path: Path, info: GraphInfo) -> OrtSession:
        return OrtSession(path, info, ["CPUExecutionProvider"], self.threads, device="cpu", io_binding=self.io_binding)


class OrtCudaBackend:
    """ONNX Runtime with the CUDA execution provider (onnxruntime-gpu), outputs kept on the GPU via IO binding."""

    name = "ort-cuda"
    onnxruntime_version = ort.__version__

    def __init__(self, device_id: int = 0, threads: int | None = None):
        available = ort.get_available_providers()  # compiled in; whether CUDA loads is checked per session
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"the ort-cuda backend needs onnxruntime-gpu, but the installed onnxruntime {ort.__version__} has "
                f"only {', '.join(available)}; {INSTALL_GPU_HINT}"
            )
        preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu 1.21+
        if preload is not None:
            # CUDA / cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn] (or torch's), which the CUDA
            # provider's library does not find by itself; a failure shows as the provider check in `load`
            try:
                preload()
            except Exception as error:  # best effort: reported when a session cannot use CUDA
                logger.debug("onnxruntime.preload_dlls failed: %s", error)
        self.device_id = device_id
        self.threads = _threads(threads)

    def load(self, path: Path, info: GraphInfo) -> OrtSession:
        # TF32 off (ONNX Runtime's CUDA default is on): float32 exports compute in float32, as on the CPU and in
        # the TensorRT engines (polygraphy clears TF32), which is what the parity with transformers is proven for
        cuda = {"device_id": self.device_id, "use_tf32": 0}
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        session = OrtSession(
            path, info, providers, self.threads, device="cuda", device_id=self.device_id, io_binding=True
        )
        if "CUDAExecutionProvider" not in session.session.get_providers():
            raise BackendError(
                f"ONNX Runtime could not start CUDA for the {session.name} graph (CUDA/cuDNN libraries missing or no "
                f"GPU visible); check `nvidia-smi` and the CUDA version onnxruntime-gpu {ort.__version__} needs"
            )
        return session


#: Floating-point element types as ONNX Runtime's profiler names them.
_FLOAT_TYPES = {"float", "float16", "bfloat16", "double"}


def cpu_fallbacks(profile_file: str | Path) -> list[str]:
    """Nodes of an ONNX Runtime profile (SessionOptions.enable_profiling) that computed on floating-point data on
    the CPU, or copied it between devices: on the ort-cuda backend, nodes that had no CUDA kernel. ONNX Runtime
    puts shape arithmetic on the CPU on purpose; that is int64 and not listed."""
    found = []
    for event in json.loads(Path(profile_file).read_text()):
        args = event.get("args", {})
        if event.get("cat") != "Node" or "op_name" not in args:
            continue
        types = {
            kind for entry in args.get("input_type_shape", []) + args.get("output_type_shape", []) for kind in entry
        }
        on_cpu = args.get("provider") == "CPUExecutionProvider"
        copy = args["op_name"].startswith("Memcpy")
        if (on_cpu or copy) and types & _FLOAT_TYPES:
            found.append(f"{event['name'].removesuffix('_kernel_time')} ({args['op_name']}, {args.get('provider')})")
    return sorted(set(found))
