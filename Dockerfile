# syntax=docker/dockerfile:1
# vlm-export images. Not built on the development machine (it has no Docker engine): written against the
# NGC base images' documented contents; check the base tags against your driver / JetPack before building.
#
#   x86_64 + NVIDIA GPU (export, TensorRT engines, ONNX Runtime CUDA):
#     docker build -t vlm-export:gpu .
#     docker run --gpus all -v "$PWD/out:/out" vlm-export:gpu \
#       vlm-export --model Qwen/Qwen2.5-VL-3B-Instruct --output /out/q3 --engine trt --dtype float16 --max-batch 2
#
#   Jetson (JetPack 6 / L4T r36, TensorRT 10.3): runtime only, no torch; builds engines on the device from ONNX
#   exported elsewhere:
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
ARG GPU_BASE=nvcr.io/nvidia/tensorrt:25.10-py3
ARG JETSON_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# -- x86_64 GPU: TensorRT + CUDA from the NGC TensorRT image; CPU torch is enough to export (tracing runs on CPU)
FROM ${GPU_BASE} AS image-gpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/vlm-export
COPY pyproject.toml constraints.txt README.md ./
COPY vlm_export ./vlm_export
# onnxruntime-gpu replaces the CPU onnxruntime (both install the same `onnxruntime` package).
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && python3 -m pip install -c constraints.txt ".[export,serve]" "polygraphy>=0.49" \
 && python3 -m pip uninstall -y onnxruntime \
 && python3 -m pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.22" \
 && python3 -c "import tensorrt, polygraphy, onnxruntime; print('TensorRT', tensorrt.__version__, onnxruntime.get_available_providers())"
EXPOSE 8000
CMD ["vlm-serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--backend", "ort-cuda"]

# -- Jetson: the torch-free runtime, TensorRT from JetPack, engines built on the device
FROM ${JETSON_BASE} AS image-jetson
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vlm-export
COPY pyproject.toml constraints.txt README.md ./
COPY vlm_export ./vlm_export
# No torch, no transformers: numpy, pillow, av, tokenizers, jinja2, onnxruntime (CPU fallback), onnx (op check and
# rewrites for TensorRT 10.3), polygraphy (engine build + CUDA buffers). tensorrt comes from python3-libnvinfer,
# built for JetPack 6's system Python 3.10; the package declares 3.11+ (what its tests run on), hence
# --ignore-requires-python: the runtime code has no 3.11-only syntax, but it is not tested on 3.10.
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install --ignore-requires-python ".[serve]" "onnx>=1.20" "polygraphy>=0.49" \
 && python3 -c "import tensorrt, polygraphy; print('TensorRT', tensorrt.__version__)"
EXPOSE 8000
CMD ["vlm-serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--backend", "trt"]

FROM image-${TARGET}
