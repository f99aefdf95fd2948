#!/usr/bin/env python
"""Greedy tokens of an export against transformers on one image prompt, each side in its own process (peak RSS,
wall time), for models too large to hold twice: the real-size check of issue 16.

    python tools/check_real_size.py /work/big/q3b /work/big/q3b-fp32 --tokens 16
    python tools/check_real_size.py /work/big/q7b /work/big/q7b-int4 --sides ours --tokens 16

The two sides run one after the other, never together: transformers (the checkpoint in float32 or bfloat16) and
our runtime (`VLMPipeline` on ONNX Runtime CPU), on the same conversation: a seeded 448x448 image and a prompt.
Prints each side's tokens, prompt length, time to first token, decode tokens/s and peak RSS, whether the tokens
are identical and how far each step's raw logits are apart (max abs difference, and relative to the spread of
transformers' logits: random weights often repeat one token, so the logits are the stronger check), and (with
--json) all of it as JSON. `--sides ours` skips transformers (a quantized export has no
exact reference; a 7B float32 transformers does not fit 24 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Describe this image in detail."


def conversation(size: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x, y, (x + y) // 2], axis=-1) * (255 / (2 * size))
    image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


class TokenTimes:
    """A `generate` streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run_transformers(model_dir: str, tokens: int, dtype: str, size: int, logits_file: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from vlm_export.graphs.registry import graph_family_for
    from vlm_export.testing.reference import processor_class_for, vl_processor

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    family = graph_family_for(config.model_type)
    processor = vl_processor(model_dir, processor_class_for(config.model_type))
    model = family.load_model(Path(model_dir), getattr(torch, dtype))
    load_s = time.perf_counter() - start
    messages = conversation(size)
    image = Image.fromarray(messages[0]["content"][0]["image"])
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    stamps = TokenTimes()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            streamer=stamps,
        )
    prompt = int(inputs["input_ids"].shape[1])
    ids = out.sequences[0, prompt:].tolist()
    ttft = stamps.times[0] - start
    np.save(logits_file, torch.stack(out.logits, dim=1)[0].float().numpy())
    return {
        "side": f"transformers {dtype}",
        "prompt_tokens": prompt,
        "token_ids": ids,
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_tok_s": (len(ids) - 1) / (stamps.times[-1] - stamps.times[0]) if len(ids) > 1 else None,
    }


def run_ours(export_dir: str, tokens: int, size: int, logits_file: str) -> dict[str, Any]:
    import numpy as np

    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.generation import GenerationOutput, StepEvent

    start = time.perf_counter()
    pipe = VLMPipeline.from_pretrained(export_dir, backend="ort-cpu")
    load_s = time.perf_counter() - start
    # What pipe.generate runs, keeping each step's raw logits.
    prompts, visual = pipe.prepare([conversation(size)])
    logits, output = [], None
    for event in pipe.generator.steps(prompts, visual, pipe.settings(max_new_tokens=tokens, do_sample=False)):
        if isinstance(event, StepEvent):
            logits.append(event.logits[0])
        elif isinstance(event, GenerationOutput):
            output = event
    assert output is not None
    np.save(logits_file, np.stack(logits))
    token_ids = output.token_ids[0]
    timings = output.timings
    decode = timings.get("decode_s", 0.0)
    quantization = pipe.manifest.quantization
    scheme = quantization["scheme"] if quantization else pipe.manifest.dtype
    return {
        "side": f"vlm-export ({scheme})",
        "prompt_tokens": output.prompt_tokens[0],
        "token_ids": token_ids,
        "text": pipe.tokenizer.decode(token_ids),
        "load_s": load_s + timings.get("load_s", 0.0),
        "ttft_s": timings.get("ttft_s"),
        "decode_tok_s": (len(token_ids) - 1) / decode if decode else None,
    }


def child(argv: list[str]) -> int:
    side, path, tokens, dtype, size, logits_file = argv[0], argv[1], int(argv[2]), argv[3], int(argv[4]), argv[5]
    if side == "transformers":
        result = run_transformers(path, tokens, dtype, size, logits_file)
    else:
        result = run_ours(path, tokens, size, logits_file)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the checkpoint folder the export came from")
    parser.add_argument("export", help="the vlm-export output folder")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate (default 16)")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square test image (default 448)")
    parser.add_argument("--transformers-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sides", default="both", choices=["both", "ours", "transformers"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    sides = ["transformers", "ours"] if args.sides == "both" else [args.sides]
    scratch = Path(tempfile.mkdtemp(prefix="check_real_size-"))
    for side in sides:
        path = args.model if side == "transformers" else args.export
        command = [sys.executable, __file__, "--child", side, path, str(args.tokens), args.transformers_dtype]
        command += [str(args.image_size), str(scratch / f"{side}.npy")]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print(
            f"{result['side']:<28} prompt {result['prompt_tokens']:>5}  ttft {result['ttft_s']:.2f} s  decode "
            f"{result['decode_tok_s'] or 0:.2f} tok/s  peak RSS {result['peak_rss_gb']:.2f} GB  "
            f"wall {result['wall_s']:.0f} s"
        )
        print(f"  tokens {result['token_ids']}")
    if len(results) == 2:
        same = results[0]["token_ids"] == results[1]["token_ids"]
        same_prompt = results[0]["prompt_tokens"] == results[1]["prompt_tokens"]
        print(f"prompt lengths equal: {same_prompt}; greedy tokens identical: {same}")
        results.append({"logits": compare_logits(scratch / "transformers.npy", scratch / "ours.npy")})
        print(
            "logits over {steps} steps: max abs diff {max_abs_diff:.3g}, relative to transformers' spread "
            "{relative_max_diff:.3g}; top-5 of the first step equal: {first_top5_equal}".format(**results[-1]["logits"])
        )
    for file in scratch.iterdir():
        file.unlink()
    scratch.rmdir()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if len(results) < 2 or results[0]["token_ids"] == results[1]["token_ids"] else 2


def compare_logits(reference_file: Path, candidate_file: Path) -> dict[str, Any]:
    """Each step's raw logits of both sides over the steps both made (identical tokens: the same contexts)."""
    import numpy as np

    reference, candidate = np.load(reference_file), np.load(candidate_file)
    steps = min(len(reference), len(candidate))
    reference, candidate = reference[:steps].astype(np.float64), candidate[:steps].astype(np.float64)
    spread = float(np.std(reference))
    difference = float(np.abs(reference - candidate).max())
    top5 = [np.argsort(-side[0], kind="stable")[:5].tolist() for side in (reference, candidate)]
    return {
        "steps": steps,
        "max_abs_diff": difference,
        "relative_max_diff": difference / spread if spread else float("inf"),
        "reference_std": spread,
        "first_top5_equal": top5[0] == top5[1],
        "first_top5": top5[0],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(child(sys.argv[2:]))
    raise SystemExit(main())
