"""Values shared by the families' image and video processor configs (transformers' own constants and parsing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vlm_export.errors import ManifestError

T = TypeVar("T")

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (image_utils.py), the default of the Qwen and LLaVA processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def three_floats(value: Any) -> tuple[float, float, float]:
    """Per-channel mean/std; a scalar applies to all three channels, as in transformers' normalize."""
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {len(values)}")
    return values  # type: ignore[return-value]


def config_from_manifest(
    cls: type[T], data: Mapping[str, Any], kind: str, convert: Mapping[str, Callable[[Any], Any]]
) -> T:
    """Build the processor-config dataclass `cls` from its manifest entry; one-line `ManifestError`s otherwise.

    A missing field without a default is refused rather than guessed; `convert` turns the JSON values of the named
    fields back into their types (tuples, ints); `kind` ("image", "video") names the config in messages.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    missing = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise ManifestError(f"{kind} config in manifest lacks {', '.join(missing)}; re-export the model")
    values = {f.name: data[f.name] for f in fields if f.name in data}
    try:
        for name, to_type in convert.items():
            if name in values:
                values[name] = to_type(values[name])
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"bad {kind} config in manifest: {e}; re-export the model") from e
