"""LLaVA-OneVision on the host: anyres crops and video frames, feature packing and pooling between the vision graph
and the embedding merge, `<image>` / `<video>` expansion, and 1D positions as transformers' `generate()` feeds them.

Image crops and video frames share one vision-graph call (every crop is encoded on its own); their features are
then packed per image and pooled per video, and laid out in the order the placeholders appear in the prompt. The
chat template renders a message's images before its videos, whatever the content order, and transformers fills
`<image>` runs with image features and `<video>` runs with video features, each in their own order.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import InputError, ManifestError
from vlm_export.manifest import Manifest
from vlm_export.runtime.families import MediaItem, VisualBatch, register_runtime_family
from vlm_export.runtime.families.llava_onevision.packing import (
    LlavaPackingConfig,
    num_image_tokens,
    pack_image_features,
)
from vlm_export.runtime.families.llava_onevision.preprocess import LlavaOnevisionImageConfig, preprocess_images
from vlm_export.runtime.families.llava_onevision.video import (
    LlavaOnevisionVideoConfig,
    num_video_tokens,
    pool_video_features,
    preprocess_frames,
    sample_frame_indices,
)
from vlm_export.runtime.families.positions import text_positions
from vlm_export.runtime.families.video_budget import check_video_tokens, token_limit
from vlm_export.runtime.image_io import describe_source, load_image

logger = logging.getLogger(__name__)

#: Per-video request options (message part keys besides type/path): transformers' sampling arguments.
VIDEO_OPTIONS = ("num_frames", "fps")
#: Without num_frames / fps every frame is encoded (as in transformers); say so above this many frames.
ALL_FRAMES_WARNING = 64


@register_runtime_family("llava_onevision")
class LlavaOnevisionRuntime:
    def __init__(self, manifest: Manifest, folder: Path):
        self.manifest = manifest
        self.tokens = manifest.tokens
        self.image_config = LlavaOnevisionImageConfig.from_dict(manifest.preprocessing)
        self.packing = LlavaPackingConfig.from_dict(manifest.vision["packing"])
        video = manifest.preprocessing.get("video")
        # exports made before video support have no video settings: images keep working, videos are refused
        self.video_config = LlavaOnevisionVideoConfig.from_dict(video) if isinstance(video, dict) else None
        newline_file = manifest.file_path(folder, "image_newline", required=False)
        if newline_file is None:
            raise ManifestError(f"{folder} lacks the image_newline tensor; re-export the model")
        try:
            self.image_newline = np.load(newline_file, allow_pickle=False)
        except (OSError, ValueError) as error:  # not a .npy file, or one holding Python objects
            raise ManifestError(f"cannot read {newline_file} ({error}); re-export the model") from None

    def placeholder_token(self, kind: str) -> int:
        return int(self.tokens[f"{kind}_token_id"])

    def encode_media(self, items: list[MediaItem], per_conversation: list[int]) -> VisualBatch:
        if not items:
            return VisualBatch(feeds={}, token_counts=[], kinds=[])
        # transformers decides anyres vs one crop per image from the images of each conversation (videos aside)
        images_per_conversation, start = [], 0
        for count in per_conversation:
            images_per_conversation.append(sum(item.kind == "image" for item in items[start : start + count]))
            start += count
        image_items = [item for item in items if item.kind == "image"]
        image_inputs = None
        if image_items:
            images = [load_image(item.source) for item in image_items]
            image_inputs = preprocess_images(images, self.image_config, batch_num_images=images_per_conversation)
        pixels: list[np.ndarray] = []
        crops: list[int] = []
        counts: list[int] = []
        sizes: list[tuple[int, int] | None] = []
        frame_indices: list[np.ndarray | None] = []
        image_offsets = np.cumsum([0, *(image_inputs.crops_per_image if image_inputs else [])])
        image_index = 0
        for item in items:
            if item.kind == "image":
                assert image_inputs is not None
                n = image_inputs.crops_per_image[image_index]
                height, width = (int(v) for v in image_inputs.image_sizes[image_index])
                lo = image_offsets[image_index]
                pixels.append(image_inputs.pixel_values[lo : lo + n])
                counts.append(num_image_tokens((height, width), n, self.packing))
                sizes.append((height, width))
                frame_indices.append(None)
                image_index += 1
            else:
                frames, indices = self._video_frames(item)
                n = frames.shape[0]
                pixels.append(frames)
                counts.append(num_video_tokens(n, self.packing.patches_per_side))
                sizes.append(None)
                frame_indices.append(indices)
            crops.append(n)
        return VisualBatch(
            feeds={"pixel_values": np.concatenate(pixels, axis=0)},
            token_counts=counts,
            kinds=[item.kind for item in items],
            meta={
                "crops_per_item": crops,
                "image_sizes": sizes,
                "frame_indices": frame_indices,
                "per_conversation": list(per_conversation),
                "text_order": {},
            },
        )

    def _video_frames(self, item: MediaItem) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [frames, 3, S, S] pixel values, int64 frame indices) of one video item."""
        from vlm_export.runtime.video_io import load_video  # PyAV is only needed once a video is given

        cfg = self.video_config
        if cfg is None:
            raise InputError("this export predates video support for LLaVA-OneVision; re-export the model")
        crop = (self.packing.crop_size, self.packing.crop_size)
        if cfg.size != crop:
            raise InputError(
                f"the video processor resizes frames to {cfg.size[1]}x{cfg.size[0]} but the vision tower takes "
                f"{crop[1]}x{crop[0]}; fix size in the model's video processor config and re-export"
            )
        options = {k: v for k, v in item.options.items() if v is not None}
        unknown = sorted(set(options) - set(VIDEO_OPTIONS))
        if unknown:
            raise InputError(
                f"unsupported video option(s) {', '.join(unknown)} for LLaVA-OneVision; "
                f"use {' or '.join(VIDEO_OPTIONS)}"
            )

        every_frame = not options and not cfg.do_sample_frames
        name = f"video {describe_source(item.source)}"
        side = self.packing.patches_per_side

        def sample(meta: Any) -> np.ndarray:
            indices = sample_frame_indices(meta.total_frames, meta.fps, cfg, **options)
            sampling = "every frame: the model's default without fps or num_frames" if every_frame else "as asked"
            check_video_tokens(  # before any frame is decoded
                name,
                meta,
                len(indices),
                lambda n: num_video_tokens(n, side),
                token_limit(self.manifest),
                sampling=sampling,
            )
            if len(indices) > ALL_FRAMES_WARNING and every_frame:
                logger.warning(
                    "using all %d frames of the video (transformers' default for this model: no sampling); "
                    "pass num_frames or fps to sample fewer",
                    len(indices),
                )
            return indices

        # each frame is squashed to the tower's size as it is decoded: memory follows the frame count, not the video
        resize = (lambda *_: (*cfg.size, cfg.resize_mode)) if cfg.do_resize else None
        clip = load_video(item.source, sample, resize)
        return preprocess_frames(clip.frames, cfg), clip.indices

    def postprocess_vision(self, outputs: dict[str, np.ndarray], visual: VisualBatch) -> dict[str, np.ndarray]:
        features = outputs["crop_features"]
        newline = self.image_newline.astype(features.dtype)
        rows: list[np.ndarray] = []
        offset = 0
        for kind, n, size in zip(visual.kinds, visual.meta["crops_per_item"], visual.meta["image_sizes"], strict=True):
            item_features = features[offset : offset + n]
            offset += n
            if kind == "image":
                rows.append(pack_image_features(item_features, np.array([size]), [n], newline, self.packing))
            else:
                rows.append(pool_video_features(item_features, self.packing.patches_per_side, newline))
        order = self._row_order(visual)
        packed = np.concatenate([rows[i] for i in order], axis=0)
        return {**outputs, "visual_embeds": packed}

    @staticmethod
    def _row_order(visual: VisualBatch) -> list[int]:
        """Item indices in prompt order: per conversation, the order `expand_placeholders` met their runs in."""
        text_order = visual.meta.get("text_order", {})
        order: list[int] = []
        start = 0
        for count in visual.meta["per_conversation"]:
            if count:  # offsets are unique among conversations that hold media
                order.extend(text_order.get(start, range(start, start + count)))
            start += count
        return order

    def expand_placeholders(
        self, text: str, items: list[MediaItem], visual: VisualBatch, offset: int, token_text: dict[str, str]
    ) -> str:
        """The k-th `<image>` of the text becomes the k-th image's run, the k-th `<video>` the k-th video's (as
        transformers' processor replaces them); records the items' order in the text for the feature layout."""
        counts = visual.token_counts[offset : offset + len(items)]
        waiting = {kind: [i for i, item in enumerate(items) if item.kind == kind] for kind in ("image", "video")}
        kind_of = {token_text[kind]: kind for kind in waiting}
        pattern = re.compile("|".join(re.escape(token) for token in kind_of))
        pieces: list[str] = []
        order: list[int] = []
        position = 0
        for match in pattern.finditer(text):
            kind = kind_of[match.group()]
            if not waiting[kind]:
                raise InputError(f"the prompt has more {kind} placeholders than {kind}s given")
            index = waiting[kind].pop(0)
            pieces.append(text[position : match.start()] + match.group() * counts[index])
            order.append(offset + index)
            position = match.end()
        for kind, left in waiting.items():
            if left:
                raise InputError(
                    f"the prompt has fewer {kind} placeholders than {kind}s given; put each {kind} in the message "
                    f"content as {{'type': '{kind}', ...}}"
                )
        if items:
            visual.meta.setdefault("text_order", {})[offset] = order
        return "".join(pieces) + text[position:]

    def prefill_positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: VisualBatch
    ) -> tuple[np.ndarray, Any]:
        return text_positions(attention_mask), None

    def decode_positions(self, attention_mask: np.ndarray, state: Any, num_new: int) -> np.ndarray:
        return text_positions(attention_mask)[:, -num_new:]

    def decoder_feeds(self, input_ids: np.ndarray, vision_outputs: dict[str, np.ndarray] | None) -> dict[str, Any]:
        return {}
