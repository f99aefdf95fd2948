# syntax=docker/dockerfile:1
# vlm-export images. Not built on the development machine (it has no Docker engine): written against the bases'
# documented contents; the RUN lines end with checks that fail the build where a fact below does not hold.
#
#   x86_64 + NVIDIA GPU (export, TensorRT engines, ONNX Runtime CUDA), NVIDIA driver 580+ (CUDA 13):
#     docker build -t vlm-export:gpu .
#     docker run --gpus all -v "$PWD/out:/out" vlm-export:gpu \
#       vlm-export --model Qwen/Qwen2.5-VL-3B-Instruct --output /out/q3 --engine trt --dtype float16 --max-batch 2
#
#   Jetson (JetPack 6 / L4T r36: Ubuntu 22.04, Python 3.10, TensorRT 10.3): runtime only, no torch; builds
#   engines on the device from ONNX exported elsewhere (TensorRT 10.3 gets the rewritten graphs):
#     docker build -t vlm-export:jetson --build-arg TARGET=jetson .
#     docker run --runtime nvidia -v /data/q3:/model vlm-export:jetson \
#       sh -c 'vlm-export build-engines /model && vlm-run /model --backend trt --prompt "Hello"'
#
#   Both images serve by default: mount an export at /model and publish port 8000 (OpenAI-compatible API; /health
#   is the readiness probe: 503 until the model is loaded; the Jetson image serves with --backend trt, so build the
#   engines once first, as above). Pass vlm-serve flags after the image name to override:
#     docker run --gpus all -p 8000:8000 -v "$PWD/out/q3:/model" vlm-export:gpu
#     docker run --gpus all -p 8000:8000 -v "$PWD/out/q3:/model" vlm-export:gpu \
#       vlm-serve /model --host 0.0.0.0 --backend trt --api-key "$KEY"
#
# TARGET selects the final stage (BuildKit, the default builder since Docker 23, builds only that stage;
# `--target image-gpu|image-jetson` does the same).
ARG TARGET=gpu
ARG GPU_BASE=python:3.12-slim-bookworm
ARG JETSON_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# -- x86_64 GPU: everything from pip wheels, CUDA 13 throughout. The `trt` extra brings TensorRT 10.15+ (its ONNX
# parser imports Attention, RMSNormalization, RotaryEmbedding and TensorScatter: the in-place KV cache), the CUDA
# runtime (nvidia-cuda-runtime) and onnxruntime-gpu with its CUDA/cuDNN wheels; the driver comes from the host
# (NVIDIA Container Toolkit, `--gpus`). No CUDA base image: a pinned TensorRT wheel instead of whatever TensorRT a
# monthly NGC image carries, and the same pip-only layout users get. CPU torch is enough to export (tracing runs
# on the CPU).
FROM ${GPU_BASE} AS image-gpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/vlm-export
COPY pyproject.toml constraints.txt README.md ./
COPY vlm_export ./vlm_export
# onnxruntime-gpu replaces the CPU onnxruntime (both install the same `onnxruntime` package): install both, remove
# both, put the GPU one back. The last command checks TensorRT >= 10.15, that onnxruntime is the CUDA build and that
# libcudart is found where the trt backend looks (polygraphy misses the CUDA 13 wheel's folder).
RUN python3 -m pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && python3 -m pip install -c constraints.txt ".[export,serve,trt]" \
 && python3 -m pip uninstall -y onnxruntime onnxruntime-gpu \
 && python3 -m pip install -c constraints.txt "onnxruntime-gpu[cuda,cudnn]" \
 && python3 -c "import tensorrt, onnxruntime; \
from vlm_export.exporter.trt_ops import parse_version; \
from vlm_export.runtime.backends.cuda_memory import cudart_search_dirs, find_cudart; \
assert parse_version(tensorrt.__version__) >= (10, 15), tensorrt.__version__; \
assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers(); \
assert find_cudart(cudart_search_dirs()), 'libcudart not found'; \
print('TensorRT', tensorrt.__version__, 'onnxruntime-gpu', onnxruntime.__version__)"
EXPOSE 8000
CMD ["vlm-serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--backend", "ort-cuda"]

# -- Jetson: the torch-free runtime, TensorRT from JetPack (python3-libnvinfer: `import tensorrt` for the system
# Python 3.10, which the runtime supports), engines built on the device. onnxruntime is the CPU fallback (the newest
# with Python 3.10 wheels is 1.23.2; exports carry a decoder it loads); onnx for the op check and the rewrites
# TensorRT 10.3 needs; polygraphy for the engine build and CUDA buffers (libcudart from JetPack's CUDA).
FROM ${JETSON_BASE} AS image-jetson
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vlm-export
COPY pyproject.toml constraints.txt README.md ./
COPY vlm_export ./vlm_export
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install ".[serve]" "onnx>=1.20" "polygraphy>=0.53" \
 && python3 -c "import tensorrt, polygraphy, onnxruntime; \
from vlm_export.runtime.backends.cuda_memory import cudart_search_dirs, find_cudart; \
assert find_cudart(cudart_search_dirs()), 'libcudart not found'; \
print('TensorRT', tensorrt.__version__, 'onnxruntime', onnxruntime.__version__)"
EXPOSE 8000
CMD ["vlm-serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--backend", "trt"]

FROM image-${TARGET}
