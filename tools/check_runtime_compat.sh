#!/usr/bin/env bash
# The runtime on what the field installs (JetPack 6: Python 3.10, onnxruntime 1.23.2), proved without a Python 3.10:
#   1. vermin: no syntax or standard library newer than 3.10 in any vlm_export module the runtime imports;
#   2. pip resolves the runtime's dependencies to binary wheels for CPython 3.10 on manylinux (glibc 2.35, Ubuntu
#      22.04 as on JetPack 6) x86_64 and aarch64, onnxruntime 1.23.2 included;
#   3. a venv with only the runtime's dependencies (constraints-field.txt: the declared lowest versions,
#      onnxruntime 1.23.2) runs tests/test_runtime_compat.py on the exports and transformers tokens that a test run
#      with torch wrote into CASES (VLM_EXPORT_FIELD_CASES=CASES python -m pytest ...).
# Usage: bash tools/check_runtime_compat.sh CASES   (needs .venv from tools/setup.sh; CASES may be omitted to run
# steps 1-2 only). Takes about a minute, most of it installing the venv.
set -euo pipefail
export PIP_NO_CACHE_DIR=1
cd "$(dirname "$0")/.."
cases=${1:-}
python=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "runtime modules: no syntax or stdlib newer than Python 3.10 (vermin)"
# every vlm_export module loaded by importing every runtime module (backends with their optional libraries lazily)
mapfile -t files < <($python - <<'EOF'
import importlib, pkgutil, sys
import vlm_export.runtime
for module in pkgutil.walk_packages(vlm_export.runtime.__path__, "vlm_export.runtime."):
    importlib.import_module(module.name)
for name in ("run_cli", "report", "cases"):  # `vlm-run verify` (imported when the subcommand runs)
    importlib.import_module(f"vlm_export.verification.{name}")
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] == "vlm_export" and getattr(module, "__file__", None):
        print(module.__file__)
EOF
)
if printf '%s\n' "${files[@]}" | grep -E '/vlm_export/(exporter|graphs)/'; then
    echo "the runtime imports exporter modules (above): they need Python 3.11+ and torch" >&2
    exit 1
fi
.venv/bin/vermin --quiet --no-tips --violations --eval-annotations --target=3.10- "${files[@]}"

requirements=$work/requirements.txt
$python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > "$requirements"
for arch in x86_64 aarch64; do
    echo "runtime dependencies: binary wheels for CPython 3.10, manylinux $arch, onnxruntime 1.23.2"
    platforms=(--platform "manylinux2014_$arch")
    for minor in $(seq 35 -1 17); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
    $python -m pip install --dry-run --quiet --ignore-installed --only-binary=:all: --python-version 3.10 \
        --implementation cp "${platforms[@]}" --target "$work/target" --report "$work/$arch.json" \
        -r "$requirements" "onnxruntime==1.23.2"
    $python -c "import json, sys; print('  ' + ', '.join(f\"{i['metadata']['name']} {i['metadata']['version']}\"
        for i in json.load(open(sys.argv[1]))['install']))" "$work/$arch.json"
done

if [ -z "$cases" ]; then
    exit 0
fi
echo "runtime-only venv (constraints-field.txt): tests/test_runtime_compat.py on $cases"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet -c constraints-field.txt -r "$requirements" pytest
"$work/venv/bin/python" -c "import onnxruntime, numpy; print(f'  onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}')"
VLM_EXPORT_FIELD_CASES=$cases "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -m field \
    tests/test_runtime_compat.py
