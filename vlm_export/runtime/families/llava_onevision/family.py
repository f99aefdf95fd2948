"""LLaVA-OneVision on the host: anyres crops, feature packing between the vision graph and the embedding merge,
`<image>` expansion, and 1D positions as transformers' `generate()` feeds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import InputError, ManifestError
from vlm_export.manifest import Manifest
from vlm_export.runtime.families import MediaItem, VisualBatch, expand_in_order, register_runtime_family
from vlm_export.runtime.families.llava_onevision.packing import (
    LlavaPackingConfig,
    num_image_tokens,
    pack_image_features,
)
from vlm_export.runtime.families.llava_onevision.preprocess import LlavaOnevisionImageConfig, preprocess_images
from vlm_export.runtime.families.positions import text_positions
from vlm_export.runtime.image_io import load_image


@register_runtime_family("llava_onevision")
class LlavaOnevisionRuntime:
    def __init__(self, manifest: Manifest, folder: Path):
        self.manifest = manifest
        self.tokens = manifest.tokens
        self.image_config = LlavaOnevisionImageConfig.from_dict(manifest.preprocessing)
        self.packing = LlavaPackingConfig.from_dict(manifest.vision["packing"])
        newline_file = manifest.files.get("image_newline")
        if not newline_file or not (folder / newline_file).is_file():
            raise ManifestError(f"{folder} lacks the image_newline tensor; re-export the model")
        self.image_newline = np.load(folder / newline_file)

    def placeholder_token(self, kind: str) -> int:
        return int(self.tokens[f"{kind}_token_id"])

    def encode_media(self, items: list[MediaItem], per_conversation: list[int]) -> VisualBatch:
        if not items:
            return VisualBatch(feeds={}, token_counts=[], kinds=[])
        if any(item.kind == "video" for item in items):
            raise InputError("video input is not supported by this version of vlm-export yet; pass images")
        images = [load_image(item.source) for item in items]
        # as apply_chat_template calls the processor: one image list per conversation
        inputs = preprocess_images(images, self.image_config, batch_num_images=per_conversation)
        counts = [
            num_image_tokens((int(h), int(w)), crops, self.packing)
            for (h, w), crops in zip(inputs.image_sizes, inputs.crops_per_image, strict=True)
        ]
        return VisualBatch(
            feeds={"pixel_values": inputs.pixel_values},
            token_counts=counts,
            kinds=[item.kind for item in items],
            meta={"image_sizes": inputs.image_sizes, "crops_per_image": inputs.crops_per_image},
        )

    def postprocess_vision(self, outputs: dict[str, np.ndarray], visual: VisualBatch) -> dict[str, np.ndarray]:
        packed = pack_image_features(
            outputs["crop_features"],
            visual.meta["image_sizes"],
            visual.meta["crops_per_image"],
            self.image_newline.astype(outputs["crop_features"].dtype),
            self.packing,
        )
        return {**outputs, "visual_embeds": packed}

    def expand_placeholders(
        self, text: str, items: list[MediaItem], visual: VisualBatch, offset: int, token_text: dict[str, str]
    ) -> str:
        counts = visual.token_counts[offset : offset + len(items)]
        return expand_in_order(text, token_text, items, counts)

    def prefill_positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: VisualBatch
    ) -> tuple[np.ndarray, Any]:
        return text_positions(attention_mask), None

    def decode_positions(self, attention_mask: np.ndarray, state: Any, num_new: int) -> np.ndarray:
        return text_positions(attention_mask)[:, -num_new:]

    def decoder_feeds(self, input_ids: np.ndarray, vision_outputs: dict[str, np.ndarray] | None) -> dict[str, Any]:
        return {}
