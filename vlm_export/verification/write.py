"""Golden cases written into an export: the media, transformers' outputs on every case, the manifest section
(torch). Called once by the exporter when verification is done, and by `vlm-export verify --write-golden`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import vlm_export
from vlm_export.manifest import Manifest
from vlm_export.verification.cases import CaseSpec, golden_cases, write_media
from vlm_export.verification.golden import GOLDEN_DIR, NEW_TOKENS, TOP_K, GoldenCase, GoldenSet, Reference

logger = logging.getLogger(__name__)


def with_media_paths(conversations: list[Any], folder: Path) -> list[Any]:
    """Conversations whose media parts name files in `folder`, with those names made absolute paths."""
    out = []
    for conversation in conversations:
        messages = []
        for message in conversation:
            content = message["content"]
            if isinstance(content, list):
                content = [
                    {**part, "path": str(folder / part["path"])} if part.get("type") in ("image", "video") else part
                    for part in content
                ]
            messages.append({**message, "content": content})
        out.append(messages)
    return out


def golden_specs(manifest: Manifest, video: bool = True) -> list[CaseSpec]:
    """The export's golden cases (a video case where the export has video settings and `video`)."""
    has_video = video and isinstance(manifest.preprocessing.get("video"), dict)
    return golden_cases(has_video, manifest.limits.max_batch)


def producer(reference_description: dict[str, Any]) -> dict[str, Any]:
    return {
        "vlm_export": vlm_export.__version__,
        **reference_description,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_golden(
    export_dir: Path, specs: list[CaseSpec], references: list[Reference], media: list[str], made_by: dict[str, Any]
) -> dict[str, Any]:
    """Store the cases' compacted references in `export_dir`/golden (media already there); returns the section."""
    cases = [
        GoldenCase(spec.name, spec.description, spec.conversations, reference.compact())
        for spec, reference in zip(specs, references, strict=True)
    ]
    return GoldenSet(cases, media, NEW_TOKENS, TOP_K, producer(made_by)).save(export_dir)


def write_golden(export_dir: Path, model_dir: Path, manifest: Manifest, weights: str = "auto") -> dict[str, Any]:
    """Make the golden media in `export_dir`/golden, run transformers (float32, full depth) on every case and store
    its outputs; returns the manifest's `golden` section."""
    from vlm_export.verification.reference import TransformersReference

    reference = TransformersReference(model_dir, weights)
    try:
        video = reference.video_processor_error is None
        if not video and isinstance(manifest.preprocessing.get("video"), dict):
            logger.warning("golden cases without a video: %s", reference.video_processor_error)
        folder = Path(export_dir) / GOLDEN_DIR
        folder.mkdir(exist_ok=True)
        specs = golden_specs(manifest, video)
        media = write_media(folder, video=any(spec.name == "video" for spec in specs))
        references = []
        for index, spec in enumerate(specs, 1):
            start = time.perf_counter()
            references.append(reference.run(with_media_paths(spec.conversations, folder), NEW_TOKENS))
            seconds = time.perf_counter() - start
            logger.info("golden case %d of %d, %s: %.1f s", index, len(specs), spec.name, seconds)
        made_by = reference.describe()
    finally:
        reference.close()
    return save_golden(export_dir, specs, references, media, made_by)
