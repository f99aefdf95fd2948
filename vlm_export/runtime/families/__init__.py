"""Runtime-side family registry: host preprocessing, placeholder counts and positions per family.

Generic code (pipeline, generation loop) looks the family up by the manifest's `family` and never branches on
family names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from vlm_export.errors import InputError, ManifestError
from vlm_export.manifest import Manifest


@dataclass
class MediaItem:
    """One image or video from a message, not yet decoded."""

    kind: Literal["image", "video"]
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisualBatch:
    """Everything the vision graph and the position logic need for the media of one request (a whole batch)."""

    feeds: dict[str, np.ndarray]  # vision graph inputs; empty when there is no media
    token_counts: list[int]  # placeholder tokens per media item, in order
    kinds: list[str]  # "image"/"video" per media item, in order
    meta: dict[str, Any] = field(default_factory=dict)  # family-specific (grids, timing)

    @property
    def empty(self) -> bool:
        return not self.token_counts


class RuntimeFamily(Protocol):
    """What a family provides to the runtime."""

    def __init__(self, manifest: Manifest, folder: Path) -> None: ...

    def placeholder_token(self, kind: str) -> int:
        """Token id that stands for one visual embedding row of `kind` ('image' or 'video')."""
        ...

    def encode_media(self, items: list[MediaItem], per_conversation: list[int]) -> VisualBatch:
        """Preprocess all media of a batch; `per_conversation` says how many items each conversation holds
        (LLaVA-OneVision treats a conversation with several images differently from one with a single image)."""
        ...

    def expand_placeholders(
        self, text: str, items: list[MediaItem], visual: VisualBatch, offset: int, token_text: dict[str, str]
    ) -> str:
        """Expand the template's one-per-item placeholders of one conversation (its items start at `offset`
        in the batch; `token_text` maps 'image'/'video' to the placeholder token's text)."""
        ...

    def prefill_positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: VisualBatch
    ) -> tuple[np.ndarray, Any]:
        """Position ids for the prompt, plus state the decode steps need."""
        ...

    def decode_positions(self, attention_mask: np.ndarray, state: Any, num_new: int) -> np.ndarray: ...

    def postprocess_vision(self, outputs: dict[str, np.ndarray], visual: VisualBatch) -> dict[str, np.ndarray]:
        """Host-side work between the vision graph and the embedding merge; must leave `visual_embeds` with one
        row per placeholder token, in order (LLaVA-OneVision packs its crops here)."""
        ...

    def decoder_feeds(self, input_ids: np.ndarray, vision_outputs: dict[str, np.ndarray] | None) -> dict[str, Any]:
        """Decoder inputs beyond embeddings, positions, mask and cache (none for most families). `input_ids` are
        the tokens of this decoder call; `vision_outputs` is None on decode steps."""
        ...


_FAMILIES: dict[str, Callable[[Manifest, Path], RuntimeFamily]] = {}


def register_runtime_family(name: str):
    def decorate(cls):
        _FAMILIES[name] = cls
        return cls

    return decorate


def runtime_family_for(manifest: Manifest, folder: Path) -> RuntimeFamily:
    from vlm_export.runtime.families.llava_onevision import family as _llava  # noqa: F401  (registers)
    from vlm_export.runtime.families.qwen2_vl import family as _qwen2_vl  # noqa: F401  (registers)
    from vlm_export.runtime.families.qwen3_vl import family as _qwen3_vl  # noqa: F401  (registers)

    try:
        factory = _FAMILIES[manifest.family]
    except KeyError:
        raise ManifestError(
            f"family '{manifest.family}' is not supported by this runtime (supported: {', '.join(sorted(_FAMILIES))}); "
            "upgrade vlm-export"
        ) from None
    return factory(manifest, folder)


def require_positive(section: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Manifest values a family reads on every request, checked once at load (a `ManifestError` naming the key)."""
    for key in keys:
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ManifestError(f"manifest {where}.{key} must be a positive number, got {value!r}; re-export the model")


def expand_in_order(text: str, placeholder: dict[str, str], items: list[MediaItem], counts: list[int]) -> str:
    """Replace the k-th placeholder occurrence (of any kind) with the k-th item's token run, checking counts."""
    runs = [placeholder[item.kind] * count for item, count in zip(items, counts, strict=True)]
    return expand_with(text, placeholder, items, runs)


def expand_with(text: str, placeholder: dict[str, str], items: list[MediaItem], replacements: list[str]) -> str:
    """Replace the k-th item's placeholder with `replacements[k]` (any text, e.g. Qwen3-VL's timestamped frame
    runs), checking that placeholders and items match up."""
    pieces: list[str] = []
    rest = text
    for item, replacement in zip(items, replacements, strict=True):
        token = placeholder[item.kind]
        head, sep, tail = rest.partition(token)
        if not sep:
            raise InputError(
                f"the prompt has fewer {item.kind} placeholders than {item.kind}s given; put each "
                f"{item.kind} in the message content as {{'type': '{item.kind}', ...}}"
            )
        pieces.append(head + replacement)
        rest = tail
    for kind, token in placeholder.items():
        if token in rest:
            raise InputError(f"the prompt has more {kind} placeholders than {kind}s given")
    return "".join(pieces) + rest
