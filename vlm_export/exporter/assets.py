"""Tokenizer, chat template, processor and generation configs: found in either config layout, copied out.

Hub repos today ship `preprocessor_config.json` + `chat_template.json`; transformers v5's `save_pretrained`
writes `processor_config.json` (image processor nested) + `chat_template.jinja`. The output folder always gets
`tokenizer.json`, `chat_template.jinja` and `generation_config.json`, plus the original configs verbatim.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from vlm_export.errors import ExportError

logger = logging.getLogger(__name__)

VERBATIM = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "config.json",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None


def find_chat_template(model_dir: Path) -> str | None:
    """The chat template, by transformers 5.24's precedence: .jinja file, then chat_template.json, then the
    processor config, then the tokenizer config."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            template = _read_json(path).get("chat_template")
            if isinstance(template, str):
                return template
            if isinstance(template, list):  # named templates: take "default"
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                if named.get("default"):
                    return named["default"]
    return None


def find_image_processor_config(model_dir: Path) -> dict[str, Any]:
    """The image processor's parameters from `preprocessor_config.json` or `processor_config.json`."""
    processor = model_dir / "processor_config.json"
    if processor.is_file():
        nested = _read_json(processor).get("image_processor")
        if isinstance(nested, dict):
            return nested
    legacy = model_dir / "preprocessor_config.json"
    if legacy.is_file():
        return _read_json(legacy)
    raise ExportError(
        f"{model_dir} has no image processor config (preprocessor_config.json or processor_config.json); "
        "download the full model repository, not only the weights"
    )


def copy_assets(model_dir: Path, output: Path, generation_config: dict[str, Any]) -> dict[str, str]:
    """Copy everything the runtime reads; return the manifest's `files` section."""
    files: dict[str, str] = {}
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, output / "tokenizer.json")
    else:
        _convert_tokenizer(model_dir, output)
    files["tokenizer"] = "tokenizer.json"
    for name in VERBATIM:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, output / name)
    template = find_chat_template(model_dir)
    if template is None:
        raise ExportError(
            f"{model_dir} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json); "
            "instruct models ship one — add it to the folder"
        )
    (output / "chat_template.jinja").write_text(template, encoding="utf-8")
    files["chat_template"] = "chat_template.jinja"
    (output / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
    files["generation_config"] = "generation_config.json"
    return files


def _convert_tokenizer(model_dir: Path, output: Path) -> None:
    """Models shipping only a slow tokenizer (vocab + merges): let transformers build tokenizer.json once."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("vocab.json", "tokenizer.model", "tokenizer_config.json")):
        raise ExportError(
            f"{model_dir} has no tokenizer (tokenizer.json, or vocab.json/merges.txt/tokenizer.model); "
            "download the full model repository"
        )
    logger.info("no tokenizer.json in %s; converting the slow tokenizer with transformers", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError(f"cannot build tokenizer.json for {model_dir}: transformers loaded no fast tokenizer")
    backend.save(str(output / "tokenizer.json"))
