"""The main job on a built-in default: make a tiny random-weight Qwen2.5-VL locally, export it with the
`vlm-export` CLI, run a prompt with an image on ONNX Runtime CPU through `vlm-run`'s pipeline, and print the
answer with a parity line against transformers' `generate()` on the same inputs.

    python tools/demo.py [--workdir DIR] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _demo_image(path: Path) -> Path:
    """A 333x250 picture with some structure (gradients and a disc), written locally."""
    y, x = np.mgrid[0:250, 0:333]
    red = (x * 255 / 332).astype(np.uint8)
    green = (y * 255 / 249).astype(np.uint8)
    blue = np.where((x - 200) ** 2 + (y - 120) ** 2 < 60**2, 230, 40).astype(np.uint8)
    Image.fromarray(np.stack([red, green, blue], axis=-1)).save(path)
    return path


def _transformers_tokens(model_dir: Path, messages: list[dict], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_export.testing.reference import qwen2_5_vl_processor

    processor = qwen2_5_vl_processor(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.open(messages[0]["content"][0]["path"])
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    generated = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = {151643, 151645}
    for index, token in enumerate(generated):
        if token in eos:
            return generated[: index + 1]
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to put the tiny model and the export (default: temp)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from vlm_export.exporter.cli import main as export_main
    from vlm_export.runtime import VLMPipeline
    from vlm_export.testing.tiny_models import build_tiny_qwen2_5_vl

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlm-export-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "tiny-qwen2_5_vl"
    output = workdir / "exported"
    print(f"1/4 building a tiny random-weight Qwen2.5-VL in {model_dir}")
    build_tiny_qwen2_5_vl(model_dir)

    print(f"2/4 vlm-export --model {model_dir} --output {output}")
    start = time.perf_counter()
    code = export_main(["--model", str(model_dir), "--output", str(output), "--overwrite", "--quiet"])
    if code != 0:
        return code
    print(f"    exported in {time.perf_counter() - start:.1f} s")

    image = _demo_image(workdir / "demo.png")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    print("3/4 generating on ONNX Runtime CPU (no torch in the runtime)")
    pipe = VLMPipeline.from_pretrained(output, backend="ort-cpu")
    result = pipe.generate(messages, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"    answer (random weights, so gibberish): {result.text!r}")
    print(
        f"    {result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
        f"TTFT {result.timings['ttft_s'] * 1000:.0f} ms, decode {result.timings['decode_tokens_per_s']:.1f} tok/s"
    )

    print("4/4 transformers generate() on the same inputs")
    reference = _transformers_tokens(model_dir, messages, args.max_new_tokens)
    same = sum(a == b for a, b in zip(result.token_ids, reference, strict=False))
    identical = result.token_ids == reference
    print(
        f"parity: {'IDENTICAL' if identical else 'DIFFERENT'} — {same}/{len(reference)} greedy tokens equal to "
        f"transformers; graph max |diff| vs transformers: "
        + ", ".join(f"{name} {g.max_abs_diff:.2g}" for name, g in pipe.manifest.graphs.items())
    )
    print(f'try it: vlm-run {output} --prompt "Describe this image." --image {image}')
    if args.workdir is None:
        size = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file()) / 2**20
        print(f"(the tiny model and its export stay in {workdir}, {size:.0f} MB: delete it when done)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
