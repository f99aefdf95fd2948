"""A model folder's safetensors weights: which files, checked before anything is written.

Only safetensors are read (never a pickled `.bin`, whatever else the folder holds): `model.safetensors`, or the
shards `model.safetensors.index.json` lists. Every shard is opened up front, so a truncated or damaged download
fails in one line before the export starts instead of in a traceback minutes into it.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_export.errors import ExportError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers would load from `model_dir`, in index order."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ExportError(f"cannot read {index} ({error}); download the model again") from None
        for name in names:
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ExportError(f"{index} names {name!r}, not a .safetensors file in the model folder")
        files = [model_dir / name for name in names]
    elif (model_dir / SINGLE_NAME).is_file():
        files = [model_dir / SINGLE_NAME]
    else:
        raise ExportError(f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME}; vlm-export loads safetensors only")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{model_dir} lacks the weight files {', '.join(missing)}; the download is incomplete")
    return files


def validate_checkpoint(model_dir: Path) -> list[Path]:
    """Open every shard (header and size are checked by safetensors) and return the files."""
    from safetensors import SafetensorError, safe_open

    files = checkpoint_files(model_dir)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{path} is damaged ({reason}); download it again") from None
    return files
