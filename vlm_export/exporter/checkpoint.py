"""A model folder's safetensors weights: which files, checked before anything is written.

Only safetensors are read (never a pickled `.bin`, whatever else the folder holds): `model.safetensors`, or the
shards `model.safetensors.index.json` lists. Every shard is opened up front, so a truncated or damaged download
fails in one line before the export starts instead of in a traceback minutes into it.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

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


class CheckpointWeights:
    """The model's parameters by name, each read on demand from the memory-mapped safetensors and cast.

    Checkpoint keys are mapped to the model's parameter names by transformers' own loading rules (its key
    renamings and conversion ops, e.g. the hub layout's `model.layers.*` -> `model.language_model.layers.*` or
    Qwen3-VL-MoE's transposed expert tensors), so every layout `from_pretrained` loads is read the same way here.
    Only one parameter (or one conversion group) is in memory at a time: nothing holds the model.
    """

    def __init__(self, files: list[Path], model: Any):
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        self._file_of: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                self._file_of.update(dict.fromkeys(handle.keys(), path))
        state = model.state_dict(keep_vars=True)
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        prefix = model.base_model_prefix
        self._groups: dict[str, Any] = {}
        self.unexpected: list[str] = []
        for key in sorted(self._file_of, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)
            if renamed not in state and key in state:  # as transformers does: only the base prefix may differ
                renamed, pattern = rename_source_key(key, [], [], prefix, state)
            if renamed not in state:
                self.unexpected.append(key)
                continue
            if pattern is None:
                group = self._groups.setdefault(renamed, WeightRenaming(key, renamed))
                pattern = key
            else:
                group = self._groups.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
            group.add_tensor(renamed, key, pattern, functools.partial(self._read_raw, key))
        # Tied parameters (lm_head <- embed_tokens) are one tensor under several names; the checkpoint has one.
        self._aliases: dict[str, str] = {}
        names_by_tensor: dict[int, list[str]] = {}
        for name, tensor in state.items():
            names_by_tensor.setdefault(id(tensor), []).append(name)
        for names in names_by_tensor.values():
            stored = next((n for n in names if n in self._groups), None)
            for name in names:
                if stored is not None:
                    self._aliases[name] = stored
        self._buffers = {name for name, _ in model.named_buffers()}

    def _read_raw(self, key: str):
        # Opened per read: safetensors memory-maps the file, and the pages a read touched stay resident (and count
        # in the process's RSS) while the mapping lives; closing it after each tensor keeps the export at one.
        from safetensors import safe_open

        with safe_open(str(self._file_of[key]), framework="pt") as handle:
            return handle.get_slice(key)[...]

    def __contains__(self, name: object) -> bool:
        return name in self._aliases

    def missing(self) -> list[str]:
        """Parameters of the model the checkpoint does not provide (buffers are computed, not stored)."""
        return [name for name, _ in self.model.named_parameters(remove_duplicate=False) if name not in self._aliases]

    def read(self, name: str, dtype: Any = None, rows: tuple[int, int] | None = None):
        """Parameter `name` as a torch tensor (cast to `dtype` when given), read from disk now; with `rows`, only
        rows `start:stop` (a vocabulary slice of an lm_head is read without the rest of the table)."""
        from transformers.core_model_loading import WeightRenaming

        stored = self._aliases.get(name)
        if stored is None:
            raise ExportError(f"the checkpoint has no tensor for the model's {name}; is the download complete?")
        group = self._groups[stored]
        if rows is not None and type(group) is WeightRenaming:  # a plain rename: slice the stored tensor itself
            key = group.source_patterns[0]
            from safetensors import safe_open

            with safe_open(str(self._file_of[key]), framework="pt") as handle:
                tensor = handle.get_slice(key)[rows[0] : rows[1]]
            return tensor if dtype is None else tensor.to(dtype)
        fresh = copy.copy(group)
        fresh.collected_tensors = defaultdict(list, {k: list(v) for k, v in group.collected_tensors.items()})
        fresh.layer_targets = group.layer_targets
        realized = fresh.convert(stored, model=self.model, config=self.model.config)
        tensor = realized[stored]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        if rows is not None:
            tensor = tensor[rows[0] : rows[1]]
        return tensor if dtype is None else tensor.to(dtype)

    def nbytes(self) -> int:
        """Bytes of every tensor the checkpoint stores, in its own dtype."""
        from safetensors import safe_open

        total = 0
        for path in sorted(set(self._file_of.values())):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (not iterable)
                    piece = handle.get_slice(key)
                    total += math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 4)
        return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
