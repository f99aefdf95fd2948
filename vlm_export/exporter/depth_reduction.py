"""A depth-reduced copy of a checkpoint: the same model with only a few of its layers, real weights.

When a model is too large to hold next to its ONNX graphs (transformers' float32 forward needs the whole model;
so does ONNX Runtime), the exporter verifies the same graph code with the real weights on a copy that keeps,
say, the first and last text layers and a window-attention and a full-attention vision block. Every other tensor
(embeddings, lm_head, norms, mergers) is the model's own. Which layers to keep, and the config fields that index
layers, are family knowledge (each graph family's `reduce_depth`); this module writes the copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from vlm_export.graphs.depth import LayerSelection

#: Files of a model folder the reduced copy takes along (configs, tokenizer, templates), besides the weights.
SIDE_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
SHARD_BYTES = 1 << 30


def write_reduced_checkpoint(
    model_dir: Path, files: list[Path], target: Path, config: Any, selections: list[LayerSelection]
) -> Path:
    """Write `config` and the kept tensors (renumbered, in their stored dtype) to `target`, with `model_dir`'s
    tokenizer and processor files; returns `target`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        skip = path.name in ("config.json", "model.safetensors.index.json")
        if path.is_file() and path.suffix in SIDE_FILE_SUFFIXES and not skip:
            shutil.copyfile(path, target / path.name)
    config.save_pretrained(target)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(target / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (not iterable)
                renamed: str | None = key
                for selection in selections:
                    renamed = selection.rename(renamed)
                    if renamed is None:
                        break
                if renamed is None:
                    continue
                tensor = handle.get_tensor(key)
                shard[renamed] = tensor
                shard_bytes += tensor.numel() * tensor.element_size()
                if shard_bytes >= SHARD_BYTES:
                    flush()
    flush()
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return target
