#!/usr/bin/env python
"""Side-by-side CPU benchmark: vlm-export's ONNX Runtime pipeline vs transformers on the same inputs.

    python tools/make_model.py --preset qwen2_5_vl-small --output /tmp/bench/small
    python tools/bench.py /tmp/bench/small /tmp/bench/small-onnx --export --threads 2 --json small.json

Each side runs in its own child process (so peak RSS is per side, read from getrusage inside the child)
with the same thread count (torch.set_num_threads; ONNX Runtime intra-op threads via VLM_EXPORT_THREADS)
and the same inputs, written once by the parent: one seeded 448x448 image (four for the 4-image
vision row) and a text prompt of about --prompt-tokens tokens after the chat template.

What is measured (median of --repeats runs after one warm-up run):
  ttft image     first token for a prompt with one 448x448 image, preprocessing excluded on both sides.
                 ours: GenerationResult.timings["ttft_s"] (vision + embedding + prefill);
                 transformers: wall time of generate(max_new_tokens=1) (vision tower included).
  ttft text      the same for the text-only prompt (prefill of ~64 tokens).
  decode b1/b4   generated tokens/s over the decode steps only, the same prompt repeated in the batch.
                 Both sides are clocked per step: ours at every StepEvent of generator.steps(), transformers
                 with a streamer whose put() is called once per generated token; rate = (steps - 1) x batch /
                 (time of last step - time of first step), so prefill is excluded. Greedy, no repetition
                 penalty, no EOS (every run makes exactly --new-tokens tokens).
  vision 1/4     vision encoder alone on already preprocessed pixels: ours the vision_encoder session,
                 transformers model.model.get_image_features.
  peak RSS       peak resident memory of the child (VmHWM, model load included); "RSS after load" is the same
                 right after loading (transformers mmaps safetensors, so its pages count only once touched).
Every timed run also records "cores busy" (process CPU time / wall time): clearly below --threads means
another process took the cores during that run, so rerun that group (--measure decode, say) when quiet.

The decode roofline is measured memory bandwidth (a ~1 GB numpy copy split over --threads threads, best
of 5, read + write bytes) divided by the bytes one decode step must read: every decoder weight (the
full lm_head, or the tied embedding matrix used as lm_head; only the looked-up embedding rows otherwise)
plus the KV cache at the mean context length. ours/roofline is our fraction of that bound. A copy moves each
byte twice, while decode only reads, so the report also gives the best read-only stream measured: ONNX Runtime's
float32 GEMV over a 512 MB weight, the access pattern of a decode step at its most favourable, and each decode
rate as a fraction of that.

Quantized exports (`vlm-export --quantize int4`, or --export --quantize int4 here) are benchmarked like any
other: pass the float32 export as --baseline-onnx and add the sides ``baseline`` (our runtime on it, a third
column) and ``agreement`` (teacher-forced top-1 / top-5 agreement of onnx_dir with the baseline over
--new-tokens positions, text and 1-image prompts; see vlm_export/exporter/agreement.py). Its roofline counts
the decoder graph's bytes as stored (int4 at ~0.64 bytes per weight with block 32 scales and zero points).
With other processes on the machine, use --rounds N: the sides run interleaved N times and each measurement
is the median of the rounds' medians.

    python tools/bench.py m m-int4 --export --quantize int4 --baseline-onnx m-onnx \
        --sides ours,baseline,transformers,agreement --rounds 3 --json int4.json

Needs the ``export`` extra (torch, transformers) for the transformers side and --export.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: model_type -> transformers processor class name (the model class comes from AutoModelForImageTextToText).
PROCESSOR_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
}
#: Filler text for the prompt, split into words when the prompt is built.
FILLER = (
    "the quick brown fox jumps over a lazy dog while seven red birds sing near an old stone bridge "
    "under the bright morning sun and children play by the river"
)


# ----------------------------------------------------------------------------------------------- helpers
def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far: over wall time, how many cores a run kept busy."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median_runs(fn: Callable[[], float], repeats: int) -> dict[str, Any]:
    """One warm-up call, then ``repeats`` timed calls; medians hide a noisy neighbour better than means.

    ``cores_busy`` (process CPU time / wall time of each call) shows starvation: well below --threads means
    another process took the cores during the run.
    """
    fn()
    values, busy = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        values.append(fn())
        busy.append((cpu_seconds() - cpu) / (time.perf_counter() - wall))
    return {"median": statistics.median(values), "runs": values, "cores_busy": busy}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM from /proc/self/status on Linux.

    Not ``ru_maxrss``: Linux carries the parent's peak across fork + exec into the child's ``ru_maxrss``, so every
    child of a parent that once held a model (bench_peers converting a checkpoint: 2.4 GiB) reported at least
    that much. VmHWM belongs to the memory map exec makes fresh."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _conversation(text: str, images: list[str]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "path": p} for p in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _step_rate(times: list[float], batch: int) -> float:
    """Tokens/s between the first and the last generated step (prefill excluded)."""
    return (len(times) - 1) * batch / (times[-1] - times[0])


# ----------------------------------------------------------------------------------------------- inputs
def write_inputs(
    model_dir: Path, work: Path, prompt_tokens: int, image_size: int, num_images: int = 4
) -> dict[str, Any]:
    """Seeded images and a text prompt of ~prompt_tokens templated tokens, shared by both children."""
    from PIL import Image
    from tokenizers import Tokenizer

    from vlm_export.runtime.chat import render_chat

    rng = np.random.default_rng(0)
    images = []
    for i in range(num_images):
        # smooth gradient + noise: a photo-like image, not a constant one
        y, x = np.mgrid[0:image_size, 0:image_size]
        base = np.stack([x, y, (x + y) // 2], axis=-1) * (255 / (2 * image_size))
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        path = work / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        images.append(str(path))
    template = _chat_template(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pool = FILLER.split()
    words: list[str] = []
    count = 0
    while count < prompt_tokens:
        words.append(pool[len(words) % len(pool)])
        rendered = render_chat(template, _conversation(" ".join(words), []), add_generation_prompt=True)
        count = len(tokenizer.encode(rendered, add_special_tokens=False).ids)
    return {"text": " ".join(words), "text_tokens": count, "images": images}


def _chat_template(model_dir: Path) -> str:
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (model_dir / "chat_template.json").is_file():
        return json.loads((model_dir / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    return json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


# ----------------------------------------------------------------------------------------------- our side
def child_ours(onnx_dir: Path, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Our runtime (no torch imported): ONNX Runtime CPU, intra-op threads from VLM_EXPORT_THREADS."""
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.generation import GenerationOutput, Generator, StepEvent

    start = time.perf_counter()
    pipe = VLMPipeline.from_pretrained(onnx_dir, backend="ort-cpu")
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_mib": peak_rss_mib()}
    form = pipe.graph_forms["decoder"]
    result["runtime"] = f"onnxruntime {pipe.backend.onnxruntime_version}, {form.file}" + (
        " (in-place cache)" if form.in_place_cache else " (cache copied each step)"
    )
    text, images = inputs["text"], inputs["images"]
    greedy = {"do_sample": False, "repetition_penalty": 1.0, "eos_token_ids": []}

    def ttft(conversation: list[dict[str, Any]]) -> Callable[[], float]:
        return lambda: pipe.generate(conversation, max_new_tokens=1, **greedy).timings["ttft_s"]

    if "ttft" in args.measure:
        result["ttft_image_s"] = _median_runs(ttft(_conversation(text, images[:1])), args.repeats)
        result["ttft_text_s"] = _median_runs(ttft(_conversation(text, [])), args.repeats)

    session = pipe.generator.sessions["vision_encoder"]
    for n in _vision_counts(args) if "vision" in args.measure else ():
        _, visual = pipe.prepare([_conversation(text, images[:n])])
        feeds = Generator._conform(session, visual.feeds)

        def vision(feeds: dict[str, np.ndarray] = feeds) -> float:
            t0 = time.perf_counter()
            session.run(feeds)
            return time.perf_counter() - t0

        result[f"vision_{n}_s"] = _median_runs(vision, args.repeats)

    for batch in (1, 4) if "decode" in args.measure else ():
        prompts, visual = pipe.prepare([_conversation(text, [])] * batch)
        settings = pipe.settings(max_new_tokens=args.new_tokens, **greedy)
        tokens: list[int] = []

        def decode(
            prompts: list[list[int]] = prompts,
            visual: Any = visual,
            settings: Any = settings,
            tokens: list[int] = tokens,
            batch: int = batch,
        ) -> float:
            times: list[float] = []
            tokens.clear()
            for event in pipe.generator.steps(prompts, visual, settings):
                if isinstance(event, StepEvent):
                    times.append(time.perf_counter())
                    tokens.append(int(event.tokens[0]))
                elif isinstance(event, GenerationOutput):
                    assert len(event.token_ids[0]) == args.new_tokens, "generation stopped early"
            return _step_rate(times, batch)

        result[f"decode_b{batch}_tok_s"] = _median_runs(decode, args.repeats)
        if batch == 1:
            result["decode_tokens"] = list(tokens)
    result["prompt_tokens"] = len(pipe.prepare([_conversation(text, [])])[0][0])
    result["peak_rss_mib"] = peak_rss_mib()
    return result


# ----------------------------------------------------------------------------------------------- transformers
def child_transformers(model_dir: Path, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """transformers fp32 eager/sdpa on the CPU, with its own processor (PIL image processor)."""
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from transformers.generation.streamers import BaseStreamer

    from vlm_export.testing.reference import vl_processor

    torch.set_num_threads(args.threads)
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    processor = vl_processor(model_dir, getattr(transformers, PROCESSOR_CLASSES[model_type]))
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_mib": peak_rss_mib()}
    transformers.logging.set_verbosity_error()  # the deprecation notes about generation_config + kwargs
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    config.update(do_sample=False, repetition_penalty=1.0, eos_token_id=None, top_k=None, top_p=None)
    config.update(temperature=None)
    text, images = inputs["text"], inputs["images"]

    def encode(batch: int, n_images: int) -> Any:
        conversation = _conversation(text, images[:n_images])
        prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        pil = [[Image.open(p).convert("RGB") for p in images[:n_images]]] * batch if n_images else None
        return processor(text=[prompt] * batch, images=pil, padding=True, return_tensors="pt")

    class StepClock(BaseStreamer):
        """put() is called with the prompt first, then once per generated token (all rows at once)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def ttft(encoded: Any) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(**encoded, generation_config=config, max_new_tokens=1)
            return time.perf_counter() - t0

        return run

    if "ttft" in args.measure:
        result["ttft_image_s"] = _median_runs(ttft(encode(1, 1)), args.repeats)
        result["ttft_text_s"] = _median_runs(ttft(encode(1, 0)), args.repeats)

    for n in _vision_counts(args) if "vision" in args.measure else ():
        encoded = encode(1, n)

        def vision(encoded: Any = encoded) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.model.get_image_features(
                    pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"]
                )
            return time.perf_counter() - t0

        result[f"vision_{n}_s"] = _median_runs(vision, args.repeats)

    for batch in (1, 4) if "decode" in args.measure else ():
        encoded = encode(batch, 0)
        sequences: list[Any] = []

        def decode(encoded: Any = encoded, batch: int = batch, sequences: list[Any] = sequences) -> float:
            clock = StepClock()
            with torch.inference_mode():
                out = model.generate(
                    **encoded, generation_config=config, max_new_tokens=args.new_tokens, streamer=clock
                )
            generated = out[:, encoded["input_ids"].shape[1] :]
            assert generated.shape[1] == args.new_tokens, "generation stopped early"
            sequences[:] = [generated[0].tolist()]
            return _step_rate(clock.times[1:], batch)

        result[f"decode_b{batch}_tok_s"] = _median_runs(decode, args.repeats)
        if batch == 1:
            result["decode_tokens"] = sequences[0]
    result["prompt_tokens"] = int(encode(1, 0)["input_ids"].shape[1])
    result["peak_rss_mib"] = peak_rss_mib()
    return result


# ----------------------------------------------------------------------------------------------- roofline
def memory_bandwidth(threads: int, size_bytes: int = 1 << 30, tries: int = 5) -> float:
    """Bytes/s of a numpy copy (read + write) of a ~1 GB array split over ``threads`` threads, best of tries."""
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def read_bandwidth(threads: int, rows: int = 1024, cols: int = 1 << 17, tries: int = 7) -> float:
    """Bytes/s read by ONNX Runtime's float32 GEMV ``[1, rows] x [rows, cols]`` (512 MB weight), best of tries.

    The pure read stream a decode step is made of; numpy has no multi-threaded read-only kernel that gets close
    (two threads of ``np.dot`` read ~25% slower here)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((rows, cols), 0.5, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    del graph, weight
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    del model
    x = np.ones((1, rows), dtype=np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return rows * cols * 4 / best


def _safetensors_sizes(model_dir: Path) -> dict[str, int]:
    """Tensor name -> bytes, from the safetensors headers (no tensor data read)."""
    sizes: dict[str, int] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def decode_bytes(model_dir: Path, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step reads: decoder weights (lm_head in full) + KV cache at ``context`` tokens."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") or config
    text = {**config, **text}
    sizes = _safetensors_sizes(model_dir)
    vision_markers = ("visual", "vision_tower", "multi_modal_projector", "image_newline")
    decoder = {k: v for k, v in sizes.items() if not any(m in k for m in vision_markers)}
    embed = sum(v for k, v in decoder.items() if "embed_tokens" in k)
    lm_head = sum(v for k, v in decoder.items() if "lm_head" in k)
    hidden = int(text["hidden_size"])
    bytes_per_value = embed / (int(text["vocab_size"]) * hidden) if embed else 4
    weights = sum(decoder.values()) - embed
    # tied: the embedding matrix is read in full as the lm_head; untied: only `batch` rows are looked up
    weights += embed if not lm_head else batch * hidden * bytes_per_value
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = batch * int(text["num_hidden_layers"]) * 2 * int(text["num_key_value_heads"]) * head_dim * context
    kv_bytes = kv * bytes_per_value
    return {"weights_bytes": weights, "kv_bytes": kv_bytes, "total_bytes": weights + kv_bytes}


# ----------------------------------------------------------------------------------------------- driver
ROWS = (
    # key, label, unit, higher is better
    ("ttft_image_s", "TTFT, 1 image 448x448", "s", False),
    ("ttft_text_s", "TTFT, text prompt", "s", False),
    ("vision_1_s", "vision encoder, 1 image", "s", False),
    ("vision_4_s", "vision encoder, 4 images", "s", False),
    ("decode_b1_tok_s", "decode, batch 1", "tok/s", True),
    ("decode_b4_tok_s", "decode, batch 4", "tok/s", True),
    ("rss_after_load_mib", "RSS after load", "MiB", False),
    ("peak_rss_mib", "peak RSS", "MiB", False),
)


def _vision_counts(args: argparse.Namespace) -> list[int]:
    return sorted({int(n) for n in str(args.vision_images).split(",") if n.strip()})


def _rows(report: dict[str, Any], sides: list[str]) -> list[tuple[str, str, str, bool]]:
    """ROWS plus a row for every other vision image count the report holds (--vision-images)."""
    rows = list(ROWS)
    known = {key for key, *_ in rows}
    counts = sorted(
        {int(k.split("_")[1]) for s in sides for k in report[s] if k.startswith("vision_") and k.endswith("_s")}
    )
    at = next(i for i, row in enumerate(rows) if row[0] == "vision_4_s") + 1
    for n in counts:
        if f"vision_{n}_s" not in known:
            rows.insert(at, (f"vision_{n}_s", f"vision encoder, {n} images", "s", False))
            at += 1
    return rows


def _value(side: dict[str, Any], key: str) -> float | None:
    value = side.get(key)
    return value["median"] if isinstance(value, dict) else value


def export_decode_bytes(onnx_dir: Path, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step of an export reads: its decoder graph files (weights as stored, so int4/int8 count
    at their packed size; the lm_head is in the decoder) + the float32 KV cache at ``context`` tokens."""
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    file = manifest["graphs"]["decoder"]["file"]
    weights = sum(p.stat().st_size for p in onnx_dir.glob(file + "*"))
    text = manifest["text"]
    kv = batch * int(text["num_layers"]) * 2 * int(text["num_kv_heads"]) * int(text["head_dim"]) * context * 4
    return {"weights_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv}


def child_agreement(onnx_dir: Path, baseline: Path, inputs: dict[str, Any], args: argparse.Namespace) -> dict:
    """Teacher-forced agreement of onnx_dir with baseline (e.g. int4 vs fp32) on the text and 1-image prompts."""
    from vlm_export.exporter.agreement import top1_agreement
    from vlm_export.runtime import VLMPipeline

    reference = VLMPipeline.from_pretrained(baseline, backend="ort-cpu")
    candidate = VLMPipeline.from_pretrained(onnx_dir, backend="ort-cpu")
    result: dict[str, Any] = {}
    for name, images in (("text", []), ("image", inputs["images"][:1])):
        conversation = _conversation(inputs["text"], images)
        result[name] = top1_agreement(reference, candidate, [conversation], args.new_tokens).to_dict()
    return result


def run_child(side: str, args: argparse.Namespace, inputs_file: Path, work: Path, tag: str = "") -> dict[str, Any]:
    """Run one side in a fresh interpreter with the thread settings in its environment.

    Sides: ``ours`` (our runtime on onnx_dir), ``baseline`` (our runtime on --baseline-onnx), ``transformers``,
    ``agreement`` (onnx_dir vs --baseline-onnx, teacher forced).
    """
    out = work / f"{side}{tag}.json"
    env = {**os.environ, "VLM_EXPORT_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    onnx_dir = args.baseline_onnx if side == "baseline" else args.onnx_dir
    child = "ours" if side == "baseline" else side
    python = args.baseline_python if side == "baseline" and args.baseline_python else sys.executable
    command = [python, __file__, str(args.model_dir), str(onnx_dir), "--child", child]
    command += ["--inputs", str(inputs_file), "--child-out", str(out), "--threads", str(args.threads)]
    command += ["--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens), "--measure", args.measure]
    command += ["--vision-images", str(args.vision_images)]
    if args.baseline_onnx is not None:
        command += ["--baseline-onnx", str(args.baseline_onnx)]
    print(f"running {side}{tag} ...", flush=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    subprocess.run(command, env=env, check=True)
    print(f"  {side}{tag} done in {time.perf_counter() - start:.0f} s", flush=True)
    result = json.loads(out.read_text())
    # 1-minute load average around the run: above --threads means another process shared the cores
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return result


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's result over interleaved rounds: per measurement, the median of the rounds' medians."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[str, Any] = {"rounds": rounds}
    for key, value in rounds[0].items():
        if isinstance(value, dict) and "median" in value:
            medians = [r[key]["median"] for r in rounds]
            busy = [x for r in rounds for x in r[key]["cores_busy"]]
            merged[key] = {"median": statistics.median(medians), "runs": medians, "cores_busy": busy}
        elif key in ("peak_rss_mib", "rss_after_load_mib"):
            merged[key] = statistics.median(r[key] for r in rounds)
        elif key == "loadavg_1min":
            merged[key] = [min(r[key][0] for r in rounds), max(r[key][1] for r in rounds)]
        else:
            merged[key] = value
    return merged


SIDE_LABELS = {"ours": "ours", "baseline": "baseline", "transformers": "transformers"}


def print_report(report: dict[str, Any]) -> None:
    sides = [s for s in ("ours", "baseline", "transformers") if s in report]
    print(f"\n{report['model_dir']}  ({report['threads']} threads, {os.cpu_count()} CPUs)")
    print(f"ours: {report['onnx_dir']}" + (f"; baseline: {report['baseline_onnx']}" if "baseline" in report else ""))
    for side in sides:
        if "runtime" in report[side]:
            print(f"{side}: {report[side]['runtime']}")
    counts = ", ".join(f"{s} {report[s].get('prompt_tokens')}" for s in sides)
    print(f"prompt tokens: {counts}; {report['new_tokens']} new; {report.get('rounds', 1)} interleaved round(s)")
    for side in sides:
        before, after = report[side].get("loadavg_1min", (0.0, 0.0))
        if max(before, after) > report["threads"] + 0.5:
            print(f"warning: load average {before:.1f} / {after:.1f} around the {side} run: cores were shared")
    others = [s for s in sides if s != "ours"]
    header = f"{'':<28}" + "".join(f"{SIDE_LABELS[s]:>14}" for s in sides)
    header += "".join(f"{'ours vs ' + s:>22}" for s in others if "ours" in sides)
    print(header)
    for key, label, unit, higher in _rows(report, sides):
        values = {s: _value(report[s], key) for s in sides}
        if all(v is None for v in values.values()):
            continue
        line = f"{label + ' (' + unit + ')':<28}"
        line += "".join(f"{values[s]:>14.3f}" if values[s] is not None else f"{'-':>14}" for s in sides)
        for s in others:
            a, b = values.get("ours"), values[s]
            if a is None or b is None:
                line += f"{'-':>22}"
            else:
                line += f"{(a / b if higher else b / a):>21.2f}x"
        print(line)
    busy = []
    for s in sides:
        runs = [v["cores_busy"] for v in report[s].values() if isinstance(v, dict) and "cores_busy" in v]
        busy.append(f"{s} {statistics.mean(x for r in runs for x in r):.2f}" if runs else f"{s} -")
    print(f"mean cores busy in timed runs: {', '.join(busy)} (of {report['threads']})")
    for s in others:
        same = 0
        mine, theirs = report.get("ours", {}).get("decode_tokens", []), report[s].get("decode_tokens", [])
        for x, y in zip(mine, theirs, strict=False):
            if x != y:
                break
            same += 1
        if mine and theirs:
            print(f"greedy batch-1 tokens of ours and {s} agree for the first {same} of {len(mine)}")
    if "agreement" in report:
        for name, a in report["agreement"].items():
            print(
                f"teacher-forced agreement ours vs baseline, {name} prompt: top-1 {a['top1']:.3f}, top-5 "
                f"{a['top5']:.3f} over {a['positions']} tokens; logit error rms {a['relative_logit_rms']:.3f} of "
                f"the logits' spread (max abs {a['max_abs_logit_diff']:.3f})"
            )
    roof = report["roofline"]
    print(f"\nmemory bandwidth (numpy copy, {report['threads']} threads): {roof['bandwidth_gb_s']:.1f} GB/s")
    read = roof.get("read_gb_s")
    if read:
        print(f"read-only stream (ONNX Runtime float32 GEMV, 512 MB): {read:.1f} GB/s")
    for batch in (1, 4):
        for s in sides:
            r = roof.get(f"{s}_b{batch}") or (roof.get(f"b{batch}") if s == "transformers" else None)
            measured = _value(report[s], f"decode_b{batch}_tok_s")
            if r is None or measured is None:
                continue
            streamed = measured * r["total_bytes"] / batch / 1e9
            print(
                f"decode roofline batch {batch}, {s}: {r['total_bytes'] / 1e6:.0f} MB/step "
                f"(weights {r['weights_bytes'] / 1e6:.0f} + KV {r['kv_bytes'] / 1e6:.1f}) -> "
                f"{r['tok_s']:.1f} tok/s; measured {measured:.1f} = {measured / r['tok_s']:.0%}"
                + (f" (reads {streamed:.1f} GB/s = {streamed / read:.0%} of the read-only stream)" if read else "")
            )


def export(args: argparse.Namespace) -> None:
    """Export in a child process so the exporter's memory is gone before anything is timed."""
    code = (
        "import sys; from vlm_export.exporter.export import export_model; "
        "from vlm_export.exporter.quantize import QuantizeConfig; "
        "q = None if sys.argv[3] == 'none' else QuantizeConfig(scheme=sys.argv[3], block_size=int(sys.argv[4]), "
        "accuracy_level=int(sys.argv[5]), graphs=tuple(sys.argv[6].split(','))); "
        "export_model(sys.argv[1], sys.argv[2], overwrite=True, progress=False, quantize=q)"
    )
    print(f"exporting {args.model_dir} -> {args.onnx_dir} (quantize {args.quantize}) ...", flush=True)
    start = time.perf_counter()
    command = [sys.executable, "-c", code, str(args.model_dir), str(args.onnx_dir), args.quantize]
    command += [str(args.quant_block_size), str(args.quant_accuracy_level), args.quant_graphs]
    subprocess.run(command, check=True)
    print(f"  export done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model_dir", type=Path, nargs="?", help="Hugging Face model folder (e.g. from tools/make_model.py)"
    )
    parser.add_argument("onnx_dir", type=Path, nargs="?", help="vlm-export output folder of that model")
    parser.add_argument("--export", action="store_true", help="export model_dir into onnx_dir first (overwrites)")
    parser.add_argument(
        "--quantize",
        choices=("none", "int4", "int8"),
        default="none",
        help="with --export: quantize as `vlm-export --quantize` does (default none)",
    )
    parser.add_argument(
        "--quant-block-size",
        type=int,
        default=32,
        help="with --quantize (default 32, vlm-export's)",
    )
    parser.add_argument("--quant-accuracy-level", type=int, default=4, help="with --quantize (default 4)")
    parser.add_argument(
        "--quant-graphs", default="decoder,embedding", help="with --quantize (default decoder,embedding)"
    )
    parser.add_argument(
        "--baseline-onnx",
        type=Path,
        help="a second export of the same model (e.g. the float32 one) to run as side 'baseline' with our runtime, "
        "and to measure the teacher-forced agreement of onnx_dir against (side 'agreement')",
    )
    parser.add_argument(
        "--baseline-python",
        help="run the baseline side with this interpreter, e.g. a venv with only the runtime's dependencies and "
        "another onnxruntime (--baseline-onnx may then name onnx_dir itself: the same export on two onnxruntime "
        "releases, each loading the decoder form it supports)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run all sides this many times, interleaved (A B C A B C ...); each measurement is the median of the "
        "rounds' medians, so a neighbour that takes the cores during one round moves the result less (default 1)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up (default 3)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="templated text prompt length (default 64)")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square test images (default 448)")
    parser.add_argument(
        "--vision-images",
        default="1,4",
        help="image counts for the vision-encoder rows, e.g. 1,4,16 to show time grows linearly (default 1,4)",
    )
    parser.add_argument(
        "--sides",
        default="ours,transformers",
        help="comma-separated sides to run: ours, baseline, transformers, agreement (default ours,transformers; "
        "baseline and agreement need --baseline-onnx)",
    )
    parser.add_argument(
        "--measure", default="ttft,vision,decode", help="comma-separated groups to run (default ttft,vision,decode)"
    )
    parser.add_argument("--json", type=Path, help="write the full report (all runs) to this file")
    parser.add_argument("--show", action="store_true", help="print the table of an existing --json report; run nothing")
    parser.add_argument("--child", choices=("ours", "transformers", "agreement"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.show:
        if args.json is None:
            parser.error("--show needs --json REPORT")
        print_report(json.loads(args.json.read_text()))
        return 0
    if args.model_dir is None or args.onnx_dir is None:
        parser.error("model_dir and onnx_dir are required (unless --show)")
    args.model_dir, args.onnx_dir = args.model_dir.resolve(), args.onnx_dir.resolve()
    sides = args.sides.split(",")
    if {"baseline", "agreement"} & set(sides) and args.baseline_onnx is None:
        parser.error("sides baseline / agreement need --baseline-onnx DIR")
    if args.baseline_onnx is not None:
        args.baseline_onnx = args.baseline_onnx.resolve()

    if args.child:
        inputs = json.loads(args.inputs.read_text())
        if args.child == "ours":
            result = child_ours(args.onnx_dir, inputs, args)
        elif args.child == "agreement":
            result = child_agreement(args.onnx_dir, args.baseline_onnx, inputs, args)
        else:
            result = child_transformers(args.model_dir, inputs, args)
        args.child_out.write_text(json.dumps(result, indent=2))
        return 0

    if args.export:
        export(args)
    report: dict[str, Any] = {
        "model_dir": str(args.model_dir),
        "onnx_dir": str(args.onnx_dir),
        "baseline_onnx": str(args.baseline_onnx) if args.baseline_onnx else None,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    timed = [s for s in sides if s != "agreement"]
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        work = Path(tmp)
        inputs = write_inputs(args.model_dir, work, args.prompt_tokens, args.image_size, max(4, *_vision_counts(args)))
        inputs_file = work / "inputs.json"
        inputs_file.write_text(json.dumps(inputs))
        results: dict[str, list[dict[str, Any]]] = {side: [] for side in timed}
        for index in range(args.rounds):
            for side in timed:
                results[side].append(run_child(side, args, inputs_file, work, f"-{index}" if args.rounds > 1 else ""))
        for side in timed:
            report[side] = merge_rounds(results[side])
        if "agreement" in sides:
            report["agreement"] = run_child("agreement", args, inputs_file, work)
            report["agreement"].pop("loadavg_1min", None)
    bandwidth = memory_bandwidth(args.threads)
    roofline: dict[str, Any] = {"bandwidth_gb_s": bandwidth / 1e9, "read_gb_s": read_bandwidth(args.threads) / 1e9}
    context = report.get("ours", report.get("transformers", {})).get("prompt_tokens", args.prompt_tokens)
    for batch in (1, 4):
        r = decode_bytes(args.model_dir, batch, context + args.new_tokens / 2)
        r["tok_s"] = batch * bandwidth / r["total_bytes"]
        roofline[f"b{batch}"] = r
        for side, folder in (("ours", args.onnx_dir), ("baseline", args.baseline_onnx)):
            if side in report:
                r = export_decode_bytes(folder, batch, context + args.new_tokens / 2)
                r["tok_s"] = batch * bandwidth / r["total_bytes"]
                roofline[f"{side}_b{batch}"] = r
    report["roofline"] = roofline
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if len([s for s in ("ours", "baseline", "transformers") if s in report]) >= 2:
        print_report(report)
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
