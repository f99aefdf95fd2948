"""Runtime-only parity cases: exports and transformers' greedy tokens, written by the main test run (torch), read
where only the runtime's dependencies are installed (tools/check_runtime_compat.sh: onnxruntime 1.23.2).

Layout of a cases folder: ``cases.json`` ({export name: {"export": relative folder, "family": ..., "cases":
{case: {"conversations": [...], "token_ids": [[...], ...]}}}}), the media the conversations name (paths relative
to the folder), and a copy of each export.
Writing needs torch and transformers; reading and checking (`check_cases`) only the runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

CASES_FILE = "cases.json"
MAX_NEW_TOKENS = 10


def _user(*parts: str) -> list[dict[str, Any]]:
    content = [
        {"type": "image", "path": part.removeprefix("image:")}
        if part.startswith("image:")
        else {"type": "text", "text": part}
        for part in parts
    ]
    return [{"role": "user", "content": content}]


#: case name -> batch of conversations; "image:NAME" is a media file in the cases folder
CASES = {
    "text_only": [_user("Write a haiku about rivers.")],
    "one_image": [_user("image:wide.png", "Describe the image.")],
    "batch_padded": [_user("image:small.png", "image:wide.png", "Compare them."), _user("Hi!")],
}
#: media file -> (width, height, seed)
MEDIA = {"small.png": (97, 131, 1), "wide.png": (300, 118, 2)}


def resolve(conversations: list[Any], folder: Path) -> list[Any]:
    """`conversations` with media paths made absolute under `folder`."""
    resolved = json.loads(json.dumps(conversations))
    for conversation in resolved:
        for message in conversation:
            for part in message["content"]:
                if "path" in part:
                    part["path"] = str(folder / part["path"])
    return resolved


def _write_media(folder: Path) -> None:
    from PIL import Image

    for name, (width, height, seed) in MEDIA.items():
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((width, height), Image.BILINEAR).save(folder / name)


def transformers_tokens(model_dir: Path, family: str, conversations: list[Any]) -> list[list[int]]:
    """transformers' greedy tokens for a batch (left padding), each row cut after its first EOS."""
    import torch
    from PIL import Image

    from vlm_export.graphs.registry import graph_family_for
    from vlm_export.testing.reference import processor_class_for, vl_processor

    model = graph_family_for(family).model_class.from_pretrained(model_dir).eval()
    processor = vl_processor(model_dir, processor_class_for(family))
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [[Image.open(p["path"]) for m in c for p in m["content"] if p["type"] == "image"] for c in conversations]
    inputs = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), len(row) - 1)
        rows.append(row[: stop + 1])
    return rows


def write_cases(folder: Path, exports: dict[str, tuple[str, Path, Path | None]]) -> Path:
    """Write the cases of `exports` ({name: (family, export folder, transformers model folder)}) into `folder`.

    Without a model folder (a quantized export, which is not transformers-exact) the reference is our runtime on
    the default decoder form in this interpreter's onnxruntime instead."""
    from vlm_export.runtime import VLMPipeline

    folder.mkdir(parents=True, exist_ok=True)
    _write_media(folder)
    record: dict[str, Any] = {}
    for name, (family, export, model_dir) in exports.items():
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(export, target)  # not hard links: onnx refuses to load weights files that have several
        pipe = None if model_dir is not None else VLMPipeline.from_pretrained(target)
        cases = {}
        for case, conversations in CASES.items():
            if pipe is None:
                tokens = transformers_tokens(model_dir, family, resolve(conversations, folder))
            else:
                tokens = run_case(pipe, folder, conversations)
            cases[case] = {"conversations": conversations, "token_ids": tokens}
        reference = "transformers" if pipe is None else f"onnxruntime {pipe.backend.onnxruntime_version}, default form"
        record[name] = {"family": family, "export": name, "reference": reference, "cases": cases}
    (folder / CASES_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return folder


def read_cases(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CASES_FILE).read_text(encoding="utf-8"))


def run_case(pipe: Any, folder: Path, conversations: list[Any]) -> list[list[int]]:
    """Our greedy tokens for one case (the batch as one request, as transformers ran it)."""
    results = pipe.generate(resolve(conversations, folder), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return [result.token_ids for result in (results if isinstance(results, list) else [results])]
