"""The golden cases inside an export: their inputs, transformers' outputs on them, and how both are stored.

Everything lives in the export's `golden/` folder and is named in `manifest.golden` (paths relative to the export
folder): `cases.json` (conversations, prompt ids, greedy tokens, the versions that made them), `arrays.npz`
(sampled pixels and embeddings, positions, each step's top logits; read with `allow_pickle=False`) and the media
files the conversations name. A `Reference` holds the same fields whether it comes from these files (sampled) or
from a live transformers run in `vlm-export verify` (complete arrays), so one comparison serves both commands.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.errors import ManifestError
from vlm_export.manifest import confined_path

GOLDEN_DIR = "golden"
CASES_FILE = f"{GOLDEN_DIR}/cases.json"
ARRAYS_FILE = f"{GOLDEN_DIR}/arrays.npz"
FORMAT = 1
#: Elements of a float array kept in the golden files (evenly spaced over the flattened array) beside its statistics.
SAMPLE_BUDGET = 4096
#: Highest logits kept per step and row.
TOP_K = 10
#: Greedy tokens generated per case.
NEW_TOKENS = 16
REPORT_DIR = "verification"
#: Reports the verify commands write into an export: `golden-<backend>.json` (`vlm-run verify`) and
#: `transformers-<backend>.json` (`vlm-export verify`); an export folder holding them is still only an export.
REPORT_FILES = tuple(
    f"{REPORT_DIR}/{source}-{backend}.json"
    for source in ("golden", "transformers")
    for backend in ("ort-cpu", "ort-cuda", "trt")
)

Conversation = list[dict[str, Any]]


@dataclass
class Sampled:
    """A float array as a reference: its shape, statistics and some (or all) of its elements."""

    shape: tuple[int, ...]
    values: np.ndarray  # float32, 1-D: the elements at `indices` of the flattened array (all when indices is None)
    indices: np.ndarray | None = None
    absmax: float = 0.0
    rms: float = 0.0

    @classmethod
    def of(cls, array: np.ndarray, budget: int | None = SAMPLE_BUDGET) -> Sampled:
        flat = np.asarray(array, dtype=np.float32).reshape(-1)
        indices = None
        if budget is not None and flat.size > budget:
            indices = np.unique(np.linspace(0, flat.size - 1, budget).astype(np.int64))
        values = flat if indices is None else flat[indices]
        return cls(
            shape=tuple(int(d) for d in np.shape(array)),
            values=values,
            indices=indices,
            absmax=float(np.abs(flat).max()) if flat.size else 0.0,
            rms=float(np.sqrt(np.mean(np.square(flat, dtype=np.float64)))) if flat.size else 0.0,
        )

    def take(self, ours: np.ndarray) -> np.ndarray:
        """`ours` (same shape as the reference) at the reference's sampled elements, as float32."""
        flat = np.asarray(ours).reshape(-1).astype(np.float32)
        return flat if self.indices is None else flat[self.indices]


@dataclass
class TopLogits:
    """Each step's highest logits per row (ids and values, best first) and the mean / std over the vocabulary."""

    ids: np.ndarray  # [B, T, K] int64
    values: np.ndarray  # [B, T, K] float32
    mean: np.ndarray  # [B, T] float32
    std: np.ndarray  # [B, T] float32

    @classmethod
    def of(cls, logits: np.ndarray, k: int | None = TOP_K) -> TopLogits:
        """From full logits [B, T, V]; `k=None` keeps the whole vocabulary (a live run): its first TOP_K ids in
        order, the rest unordered (sorting the whole vocabulary would cost more than the rest of the comparison)."""
        logits = np.asarray(logits, dtype=np.float32)
        vocab = logits.shape[-1]
        ordered = min(TOP_K if k is None else k, vocab - 1)
        ids = np.argpartition(-logits, np.arange(ordered), axis=-1)  # the first `ordered` sorted, best first
        if k is not None and k < vocab:
            ids = ids[..., :k]
        return cls(
            ids=ids.astype(np.int64),
            values=np.take_along_axis(logits, ids, -1),
            mean=logits.mean(-1),
            std=logits.std(-1),
        )

    @property
    def steps(self) -> int:
        return int(self.ids.shape[1])


@dataclass
class Reference:
    """transformers' outputs on one case (a batch of conversations)."""

    prompt_ids: list[list[int]]
    tokens: np.ndarray  # [B, T] greedy tokens (finished rows continue with the pad token, as generate() does)
    logits: TopLogits
    text: Sampled  # the merged input embeddings at text positions (prompt order, padding excluded)
    vision: Sampled | None = None  # the merged input embeddings at image / video placeholder positions
    pixels: Sampled | None = None  # what the vision tower was fed (None: no media, or images and videos mixed)
    positions: np.ndarray | None = None  # the decoder's prefill position ids, as transformers passes them

    def compact(self, budget: int = SAMPLE_BUDGET, k: int = TOP_K) -> Reference:
        """What the golden files keep of a live run's complete reference."""

        def sample(array: Sampled | None) -> Sampled | None:
            if array is None or array.indices is not None:
                return array
            return Sampled.of(array.values.reshape(array.shape), budget)

        top = self.logits
        return Reference(
            prompt_ids=self.prompt_ids,
            tokens=self.tokens,
            logits=TopLogits(top.ids[..., :k], top.values[..., :k], top.mean, top.std),
            text=sample(self.text),
            vision=sample(self.vision),
            pixels=sample(self.pixels),
            positions=self.positions,
        )

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            "tokens": self.tokens.astype(np.int64),
            "top_ids": self.logits.ids,
            "top_values": self.logits.values,
            "logit_mean": self.logits.mean,
            "logit_std": self.logits.std,
        }
        if self.positions is not None:
            arrays["positions"] = self.positions.astype(np.int64)
        for name in ("text", "vision", "pixels"):
            sampled: Sampled | None = getattr(self, name)
            if sampled is not None:
                arrays[f"{name}.values"] = sampled.values
                if sampled.indices is not None:
                    arrays[f"{name}.indices"] = sampled.indices
        return {f"{prefix}/{key}": value for key, value in arrays.items()}

    def stats(self) -> dict[str, Any]:
        """What JSON holds beside the arrays: prompt ids and each sampled array's shape and statistics."""
        out: dict[str, Any] = {"prompt_ids": self.prompt_ids, "tokens": self.tokens.tolist()}
        for name in ("text", "vision", "pixels"):
            sampled: Sampled | None = getattr(self, name)
            if sampled is not None:
                out[name] = {"shape": list(sampled.shape), "absmax": sampled.absmax, "rms": sampled.rms}
        return out

    @classmethod
    def from_stored(cls, stats: dict[str, Any], arrays: Any, prefix: str) -> Reference:
        def array(key: str) -> np.ndarray | None:
            name = f"{prefix}/{key}"
            return arrays[name] if name in arrays.files else None

        def sampled(name: str) -> Sampled | None:
            info, values = stats.get(name), array(f"{name}.values")
            if info is None or values is None:
                return None
            return Sampled(
                shape=tuple(int(d) for d in info["shape"]),
                values=values.astype(np.float32),
                indices=array(f"{name}.indices"),
                absmax=float(info["absmax"]),
                rms=float(info["rms"]),
            )

        text = sampled("text")
        if text is None or array("tokens") is None or array("top_ids") is None:
            raise ManifestError(
                f"{ARRAYS_FILE} lacks the arrays of case {prefix}; re-export or rewrite the golden cases"
            )
        return cls(
            prompt_ids=[[int(t) for t in row] for row in stats["prompt_ids"]],
            tokens=array("tokens"),
            logits=TopLogits(array("top_ids"), array("top_values"), array("logit_mean"), array("logit_std")),
            text=text,
            vision=sampled("vision"),
            pixels=sampled("pixels"),
            positions=array("positions"),
        )


@dataclass
class GoldenCase:
    name: str
    description: str
    conversations: list[Conversation]  # media parts name files in golden/ ("path": "image_odd.png")
    reference: Reference | None = None


@dataclass
class GoldenSet:
    """The golden cases of an export and how they were made."""

    cases: list[GoldenCase]
    media: list[str]  # file names in golden/
    new_tokens: int = NEW_TOKENS
    top_k: int = TOP_K
    producer: dict[str, Any] = field(default_factory=dict)

    def save(self, export_dir: Path) -> dict[str, Any]:
        """Write cases.json and arrays.npz into `export_dir`/golden (the media are already there); returns the
        manifest's `golden` section."""
        folder = Path(export_dir) / GOLDEN_DIR
        folder.mkdir(exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        cases = []
        for case in self.cases:
            assert case.reference is not None, case.name
            arrays.update(case.reference.to_arrays(case.name))
            cases.append(
                {
                    "name": case.name,
                    "description": case.description,
                    "conversations": case.conversations,
                    **case.reference.stats(),
                }
            )
        document = {
            "format": FORMAT,
            "new_tokens": self.new_tokens,
            "top_k": self.top_k,
            "producer": self.producer,
            "media": self.media,
            "cases": cases,
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        _write_atomic(Path(export_dir) / ARRAYS_FILE, buffer.getvalue())
        _write_atomic(Path(export_dir) / CASES_FILE, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
        return {
            "format": FORMAT,
            "cases_file": CASES_FILE,
            "arrays_file": ARRAYS_FILE,
            "media": [f"{GOLDEN_DIR}/{name}" for name in self.media],
            "cases": [case.name for case in self.cases],
            "new_tokens": self.new_tokens,
            "producer": self.producer,
        }

    @classmethod
    def load(cls, export_dir: Path, section: dict[str, Any] | None) -> GoldenSet:
        """The golden cases of an export whose manifest has the `golden` section `section`."""
        if not section:
            raise MissingGoldenError(export_dir)
        export_dir = Path(export_dir)
        try:
            if section.get("format") != FORMAT:
                raise ManifestError(
                    f"{export_dir}: golden cases of format {section.get('format')!r} are not readable by this version "
                    f"(it reads format {FORMAT}); upgrade vlm-export or rewrite them with `vlm-export verify "
                    f"--write-golden {export_dir}`"
                )
            cases_path = confined_path(export_dir, section["cases_file"], "golden cases file")
            arrays_path = confined_path(export_dir, section["arrays_file"], "golden arrays file")
            document = json.loads(cases_path.read_text(encoding="utf-8"))
            with np.load(arrays_path, allow_pickle=False) as arrays:
                cases = [
                    GoldenCase(
                        name=str(entry["name"]),
                        description=str(entry.get("description", "")),
                        conversations=[_resolve_media(c, export_dir) for c in entry["conversations"]],
                        reference=Reference.from_stored(entry, arrays, str(entry["name"])),
                    )
                    for entry in document["cases"]
                ]
        except ManifestError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ManifestError(
                f"{export_dir}'s golden cases cannot be read ({type(error).__name__}: {error}); rewrite them with "
                f"`vlm-export verify --write-golden {export_dir}` or re-export"
            ) from None
        return cls(
            cases=cases,
            media=list(document.get("media", [])),
            new_tokens=int(document["new_tokens"]),
            top_k=int(document["top_k"]),
            producer=dict(document.get("producer", {})),
        )


class MissingGoldenError(ManifestError):
    """An export made without golden cases (before they existed, or with --no-golden)."""

    def __init__(self, export_dir: Path):
        super().__init__(
            f"{export_dir} has no golden cases (exported before vlm-export wrote them, or with --no-golden); add them "
            f"with `vlm-export verify --write-golden {export_dir}` (needs torch, transformers and the source model) "
            "or re-export"
        )


def _resolve_media(conversation: Conversation, export_dir: Path) -> Conversation:
    """A stored conversation with its media file names made paths inside the export's golden folder."""
    resolved = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "video"):
                    path = confined_path(export_dir, f"{GOLDEN_DIR}/{part['path']}", "golden media file")
                    part = {**part, "path": str(path)}
                parts.append(part)
            message = {**message, "content": parts}
        resolved.append(message)
    return resolved


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
