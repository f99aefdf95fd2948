"""Resolve `--model`: a local folder, or a Hugging Face hub id downloaded (safetensors only, no remote code)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlm_export.errors import ExportError
from vlm_export.exporter.checkpoint import INDEX_NAME, SINGLE_NAME

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"--model {model} is a file; pass the model folder (with config.json) or a hub id")
        return _check_folder(path)
    if model.count("/") != 1 or model.startswith((".", "/", "~")) or model.endswith("/"):
        raise ExportError(f"--model {model}: no such folder, and it is not a hub id of the form owner/name")
    if Path(model.split("/")[0]).expanduser().is_dir():  # "models/qwen" beside a local models/ folder
        raise ExportError(
            f"--model {model}: no such folder (./{model.split('/')[0]} exists here, so this is taken for a local "
            f"path, not a hub id; write ./{model} or the full hub id)"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ExportError("huggingface_hub is needed to download hub models: pip install huggingface_hub") from None
    logger.info("downloading %s from the Hugging Face hub", model)
    try:
        local = snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS)
    except HfHubHTTPError as error:
        raise ExportError(f"cannot download {model}: {str(error).splitlines()[0]}") from None
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"cannot download {model} ({reason}); there is no local folder {model} either: check the path, "
            "the network, or pass a local folder with --model"
        ) from None
    return _check_folder(Path(local))


def _check_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json; pass a Hugging Face model folder")
    if not any((path / name).is_file() for name in (SINGLE_NAME, INDEX_NAME)):
        raise ExportError(
            f"{path} has no {SINGLE_NAME} or {INDEX_NAME}; vlm-export loads safetensors weights only "
            "(never pickled .bin files: convert them with transformers' save_pretrained first)"
        )
    return path


def read_model_type(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ExportError(f"cannot read {path / 'config.json'} ({error}); is the download complete?") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path / 'config.json'} is not a JSON object; is this a transformers model folder?")
    model_type = config.get("model_type")
    if not model_type:
        raise ExportError(f"{path / 'config.json'} has no model_type; is this a transformers model?")
    return str(model_type)
