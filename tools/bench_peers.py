#!/usr/bin/env python
"""Peer sides of the benchmark: onnxruntime-genai and llama.cpp on the text decoder of the same checkpoint.

    pip install onnxruntime-genai==0.18.0
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 sentencepiece==0.2.3 --no-binary llama-cpp-python
    python tools/make_model.py --preset qwen2_5_vl-0.5b --output /tmp/bench/m05
    python tools/bench_peers.py /tmp/bench/m05 --work /tmp/bench/m05-peers --peers ortgenai,llamacpp \
        --precisions fp32,int8,int4 --ours fp32=/tmp/bench/m05-onnx,int4=/tmp/bench/m05-int4 \
        --threads 2 --rounds 2 --wait-idle 90 --json peers.json
    # rerun rows a neighbour disturbed (cores busy well below --threads), keeping the others:
    python tools/bench_peers.py /tmp/bench/m05 --work /tmp/bench/m05-peers --peers llamacpp --precisions int8 \
        --rounds 2 --update --json peers.json
    python tools/bench_peers.py --show --json peers.json      # print the table of a saved report again

(or ``pip install -e .[bench]`` for the same pins; llama-cpp-python compiles for ~15 min on 2 cores;
onnxruntime-genai 0.18 uses the installed onnxruntime >= 1.31). The peers run only the language model, so
the text part of the Qwen2.5-VL (Qwen3-VL) checkpoint is first written as a plain ``Qwen2ForCausalLM``
(``Qwen3ForCausalLM``) checkpoint
(config from the text config, ``model.language_model.*`` / ``model.*`` tensors as ``model.*``, tied
embeddings kept tied; the vision tower is dropped; every tensor in the checkpoint's own dtype, written one
<= 2 GB shard at a time, so a bfloat16 7B takes 15 GB of disk and about one shard of memory) and each peer
converts that same checkpoint with its own tools:

  ortgenai   ``python -m onnxruntime_genai.models.builder -i TEXT -o OUT -p fp32|int8|int4 -e cpu`` with
             ``block_size=32 accuracy_level=4`` (as ``vlm-export --quantize``) and the builder's symmetric
             default (0.18.0's ``is_symmetric=false`` int4 graph of a tied-embedding model does not load:
             its GatherBlockQuantized is fed the float lm_head)
  llamacpp   ``convert_hf_to_gguf.py TEXT --outtype f32`` from llama-cpp-python's source package (fetched
             with ``pip download --no-binary`` for the installed version unless --llama-cpp-src is given),
             then ``llama_model_quantize`` to q8_0 (int8) and q4_0 (int4) with llama.cpp's defaults; a
             bfloat16 checkpoint without an fp32 row converts ``--outtype bf16`` instead (half the size; the
             quantized files are the same, bf16 -> f32 being exact). TEXT here is the text checkpoint's
             config and tokenizer next to links to the VL checkpoint's own files (the converter drops the
             vision tower itself): the same tensors without a second 15 GB copy at 7B

What cannot run in this machine's memory is skipped with a one-line reason, kept in the report: onnxruntime-genai's
int4/int8 builder holds the whole float32 graph before quantizing (~45 GB for a 7B), and transformers' reference
falls back from float32 to the checkpoint's bfloat16 (or is skipped) when float32 does not fit. At 7B:

    python tools/bench_peers.py q7b --work q7b-peers --peers llamacpp --precisions int4 --ours int4=q7b-int4 \
        --new-tokens 64 --rounds 2 --prune --json peers7b.json

(--prune deletes the 15 GB text checkpoint once the reference has run, before the 15 GB bf16 GGUF is written,
and the bf16 GGUF once q4_0 is made: ~18 GB of disk at a time instead of ~34 GB.)

With ``--ours fp32=DIR,int4=DIR`` our runtime runs too, on vlm-export folders of the same checkpoint, as rows
``ours/fp32`` and ``ours/int4`` fed the same prompt ids and measured by the same code, in the same interleaved
rounds as the peers; the report then ends with ours / theirs ratios at each precision. This is the comparison to
quote: figures from separate runs differ by a few percent per row from one window to the next.

Everything converted is cached under --work, so a rerun only measures. Every peer x precision runs in its own
child process (peak RSS from getrusage in the child) with --threads threads: onnxruntime-genai's decoder
session gets intra_op_num_threads through a config overlay, llama.cpp gets n_threads = n_threads_batch.

Measured, with the definitions of tools/bench.py (same ~--prompt-tokens templated text prompt, built by its
``write_inputs`` and tokenized as our runtime does, fed to every peer as token ids; greedy on the host or by the
peer; EOS never stops a run, so every run makes exactly --new-tokens tokens (onnxruntime-genai: min_length =
max_length, which masks EOS); median of --repeats timed runs after one warm-up):
  decode b1/b4   tokens/s over the decode steps only: (steps - 1) x batch / (time of last token - time of
                 first token). onnxruntime-genai batches the same prompt 4 times (batch_size=4);
                 llama.cpp decodes 4 sequences (seq_id 0..3) in one llama_batch per step.
  prefill        prompt tokens / time to the first token (the prompt's forward pass + one argmax), batch 1.
  TTFT           that time to the first token, batch 1.
  peak RSS       peak resident memory of the child (VmHWM, model load included; see bench.peak_rss_mib).
  cores busy     process CPU time / wall time of each timed run: clearly below --threads means another process
                 took the cores during that run (the machine was shared), so treat that figure as a floor.

Sanity check: a transformers child generates --check-tokens greedy tokens on the same prompt ids with the
text-only checkpoint written here and with the original VL checkpoint (they must agree), and
keeps the text checkpoint's next-token logits after the prompt (in float32; in bfloat16 when float32 does not fit,
which the report says; cached in --work for the same prompt). The table reports how many of the first
--check-tokens greedy tokens of each peer agree with it, and the peer's next-token logits against it (max |diff|
over the reference's std, and how many of the top-10 ids they share). fp32 must agree (it proves the conversion
used the same weights; llama.cpp's f16 KV cache leaves ~1e-3); random-weight models repeat one token for long
stretches, so the logits are the stronger check, and quantized peers may differ from the first token.

Needs the ``export`` extra (torch, transformers, safetensors) for the conversion and the reference, and the
``bench`` extra (onnxruntime-genai, llama-cpp-python, sentencepiece) for the peers; a missing peer package is
reported in one line and that peer is skipped. With another process on the cores the figures are floors: rerun
when quiet (llama.cpp's spinning OpenMP threads suffer most when a core is taken).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))  # run from a source checkout without installing the package
sys.path.insert(0, str(TOOLS))

PEERS = ("ortgenai", "llamacpp")
PRECISIONS = ("fp32", "int8", "int4")
#: peer -> (modules it needs, install command shown when one is missing); llama.cpp's converter needs sentencepiece
REQUIREMENTS = {
    "ortgenai": (("onnxruntime_genai",), "pip install onnxruntime-genai==0.18.0"),
    "llamacpp": (
        ("llama_cpp", "sentencepiece"),
        'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 sentencepiece==0.2.3 '
        "--no-binary llama-cpp-python",
    ),
}
#: precision -> llama.cpp file type (names of convert_hf_to_gguf --outtype / LLAMA_FTYPE_MOSTLY_*)
LLAMA_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
#: the timed figures of every row: (result key, label)
FIGURES = (("decode_b1_tok_s", "decode b1"), ("decode_b4_tok_s", "decode b4"), ("prefill_tok_s", "prefill"))
#: VL model_type -> (architecture, model_type) of the text-only checkpoint the peers convert. Qwen3-VL's text
#: model is Qwen3 (per-head q/k RMSNorm); its interleaved M-RoPE is plain RoPE on text, like Qwen2.5-VL's.
TEXT_MODELS = {"qwen2_5_vl": ("Qwen2ForCausalLM", "qwen2"), "qwen3_vl": ("Qwen3ForCausalLM", "qwen3")}
#: text-config keys copied to the text-only config as they are
TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_bias",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
)


class PeerError(Exception):
    """Something the user can fix (missing package, unsupported model, failed conversion): one line."""


# ----------------------------------------------------------------------------------------------- pure logic
def text_config(config: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """config.json of the text-only causal LM for a VL config.json (hub layout or transformers 5 layout), whose
    weights are stored in ``dtype``.

    Text-only prompts give every M-RoPE section the same position, so the text model is the plain 1-D RoPE
    decoder with the same theta.
    """
    model_type = config.get("model_type")
    if model_type not in TEXT_MODELS:
        raise PeerError(f"bench_peers supports {sorted(TEXT_MODELS)} checkpoints, not model_type {model_type!r}")
    text = {**config, **(config.get("text_config") or {})}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = float(text.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    architecture, text_type = TEXT_MODELS[model_type]
    out: dict[str, Any] = {"architectures": [architecture], "model_type": text_type}
    out.update({key: text[key] for key in TEXT_KEYS if key in text})
    out.update(
        {
            "rope_theta": theta,  # read by converters that predate transformers 5's rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": int(text.get("max_window_layers", text["num_hidden_layers"])),
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
    )
    return out


def text_tensor_name(name: str) -> str | None:
    """Name of a VL checkpoint tensor in the text-only checkpoint; None for vision tensors."""
    if name.startswith(("visual.", "model.visual.")):
        return None
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.") or name == "lm_head.weight":
        return name
    raise PeerError(f"unexpected tensor {name!r} in the checkpoint: not a Qwen-VL text or vision weight")


def parse_ours(spec: str) -> dict[str, Path]:
    """``--ours fp32=DIR,int4=DIR`` as {label: folder}; every folder must be a vlm-export output."""
    ours: dict[str, Path] = {}
    for item in filter(None, spec.split(",")):
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise PeerError(f"--ours: {item!r} is not LABEL=DIR (e.g. --ours fp32=m-onnx,int4=m-int4)")
        if label in ours:
            raise PeerError(f"--ours: label {label!r} given twice")
        path = Path(folder).expanduser().resolve()
        if not (path / "manifest.json").is_file():
            raise PeerError(f"--ours: {path} is not a vlm-export output folder (no manifest.json); export it first")
        ours[label] = path
    return ours


def ratios(report: dict[str, Any]) -> list[str]:
    """One line per ours/LABEL row and peer row of the same precision: ours over theirs for every figure."""
    results = report["results"]
    lines = []
    for key, entry in results.items():
        peer, precision = key.split("/")
        if peer == "ours":
            continue
        mine = results.get(f"ours/{precision}")
        if mine is None:
            continue
        cells = []
        for name, label in FIGURES:
            a, b = _median(mine.get(name)), _median(entry.get(name))
            if a is not None and b is not None:
                cells.append(f"{label} {a / b:.2f}x")
        a, b = mine.get("peak_rss_mib"), entry.get("peak_rss_mib")
        if a and b:
            cells.append(f"peak RSS {a / b:.2f}x")
        lines.append(f"ours/{precision} vs {key} ({entry.get('label', precision)}): " + ", ".join(cells))
    return lines


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens the two sequences share before their first difference."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def step_rate(times: list[float], batch: int) -> float:
    """Tokens/s between the first and the last generated step (prefill excluded), as tools/bench.py."""
    return (len(times) - 1) * batch / (times[-1] - times[0])


# ----------------------------------------------------------------------------------------------- conversion
def _run_logged(command: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a converter with its output in ``log``; a failure is one line naming the log.

    Returns its wall time and peak RSS (VmHWM of the running process, sampled every 0.5 s: the memory map exec made
    fresh, so nothing this parent held counts; growth in its last half second can be missed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {what} ...", flush=True)
    start = time.perf_counter()
    peak_kib = 0
    with log.open("w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), "")
                peak_kib = max(peak_kib, int(line.split()[1])) if line else peak_kib
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.5)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise PeerError(f"{what} failed ({tail[0][:200]}); full output in {log}")
    wall = time.perf_counter() - start
    peak = f", peak RSS {peak_kib / 2**20:.2f} GiB" if peak_kib else ""
    print(f"  {what} done in {wall:.0f} s{peak}", flush=True)
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024 if peak_kib else None}


def record_conversion(work: Path, name: str, stats: dict[str, float]) -> None:
    """Keep a converter's wall time and peak RSS in --work/conversions.json (the report shows them on reruns)."""
    path = work / "conversions.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[name] = stats
    path.write_text(json.dumps(done, indent=2))


def mem_available() -> int | None:
    """Bytes of memory available to a new process (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


#: headroom over a model's weights for what a loader holds besides them (activations, allocator, interpreter)
MEMORY_MARGIN = 1.15


def genai_memory_reason(entries: list[dict[str, Any]], precision: str, available: int | None) -> str | None:
    """Why onnxruntime-genai 0.18's model builder cannot convert this checkpoint in the memory here, or None.

    Its builder loads the model with ``AutoModelForCausalLM.from_pretrained`` and no dtype (transformers 5: the
    checkpoint's own dtype) and, for ``-p int4|int8 -e cpu``, builds a float32 graph (``default_io_dtype``) that
    ``to_nbits`` turns whole into one ModelProto (``ir.to_proto``) before MatMulNBitsQuantizer quantizes it: the
    torch model plus every text weight in float32 at once (~45 GB for a 7B)."""
    if available is None:
        return None
    text = [e for e in entries if e["text_name"] is not None]
    need = sum(e["nbytes"] for e in text) + (4 * sum(e["numel"] for e in text) if precision != "fp32" else 0)
    if need * MEMORY_MARGIN <= available:
        return None
    return (
        f"skipping ortgenai/{precision}: onnxruntime-genai's model builder would hold ~{_gib(need)} (the torch "
        f"model{' + the whole float32 ONNX model before quantizing' if precision != 'fp32' else ''}), "
        f"{_gib(available)} available"
    )


def reference_dtype(entries: list[dict[str, Any]], available: int | None) -> tuple[str | None, str | None]:
    """The dtype transformers' reference loads the VL checkpoint in, and a one-line note when it is not float32.

    float32 when it fits (the reference of the 0.5B tables), else the checkpoint's own dtype (a bfloat16 7B fits in
    ~16.5 GB where float32 needs 33 GB; its logits then carry bfloat16 rounding too), else None: no reference."""
    numel = sum(e["numel"] for e in entries)
    if available is None or 4 * numel * MEMORY_MARGIN <= available:
        return "float32", None
    dtypes = {e["dtype"] for e in entries}
    own = SAFETENSORS_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None
    need = sum(e["nbytes"] for e in entries)
    why = f"float32 needs ~{_gib(4 * numel)}, {_gib(available)} available"
    if own in ("bfloat16", "float16") and need * MEMORY_MARGIN <= available:
        return own, f"reference: transformers in {own}, the checkpoint's dtype ({why})"
    return None, f"skipping the transformers reference (greedy tokens and logits columns): {why}"


#: safetensors dtype names -> config.json dtype names
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: the largest shard write_text_checkpoint writes (a single larger tensor gets a shard of its own)
MAX_SHARD_BYTES = 2 * 10**9


def checkpoint_tensors(model_dir: Path) -> list[dict[str, Any]]:
    """Every tensor of a safetensors checkpoint from the files' headers alone (nothing loaded): file, name, text
    name (None for the vision tower), safetensors dtype, element count and bytes."""
    from safetensors import safe_open

    entries = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                part = f.get_slice(name)
                numel = int(np.prod(part.get_shape(), dtype=np.int64))
                dtype = part.get_dtype()
                size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
                entries.append(
                    {"file": path, "name": name, "text_name": text_tensor_name(name), "dtype": dtype}
                    | {"numel": numel, "nbytes": numel * size}
                )
    if not entries:
        raise PeerError(f"no *.safetensors weights in {model_dir}")
    return entries


def require_disk(folder: Path, size: int, what: str) -> None:
    """A one-line error, before writing, when ``folder``'s disk has not ``size`` bytes free (nothing half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size * 1.02 + 2**28:
        raise PeerError(f"{what} needs ~{_gib(size)} of disk, {folder} has {_gib(free)} free: make room or use --prune")


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped in order into shards of at most ``max_bytes`` (a larger item stands alone)."""
    shards: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if not shards or (total + size > max_bytes and shards[-1]):
            shards.append([])
            total = 0
        shards[-1].append(index)
        total += size
    return shards


def write_text_checkpoint(model_dir: Path, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The text part of model_dir as a plain causal-LM checkpoint (safetensors + tokenizer files).

    Every tensor keeps the checkpoint's own dtype (bfloat16 stays bfloat16: a 7B model is 15 GB, not 30 GB in
    float32), and the shards are written one at a time with a ``model.safetensors.index.json`` as transformers
    writes them, so memory holds about one shard (<= max_shard_bytes) rather than the whole model."""
    if (out / "config.json").is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    entries = [e for e in checkpoint_tensors(model_dir) if e["text_name"] is not None]
    if not entries:
        raise PeerError(f"no text weights in the *.safetensors of {model_dir}")
    require_disk(out.parent, sum(e["nbytes"] for e in entries), "the text checkpoint")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"  writing the text part of {model_dir} to {out} ...", flush=True)
    shards = plan_shards([e["nbytes"] for e in entries], max_shard_bytes)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, Any] = {}
        for source in dict.fromkeys(entries[i]["file"] for i in shard):
            with safe_open(str(source), framework="pt") as f:
                for i in shard:
                    if entries[i]["file"] == source:
                        tensors[entries[i]["text_name"]] = f.get_tensor(entries[i]["name"]).contiguous()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e["nbytes"] for e in entries)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_text_files(model_dir, tmp, entries)
    tmp.rename(out)
    return out


def write_text_files(model_dir: Path, folder: Path, entries: list[dict[str, Any]]) -> None:
    """The text-only model's config (dtype: the text weights' one dtype, else float32), tokenizer and generation
    config in ``folder``."""
    config = json.loads((model_dir / "config.json").read_text())
    dtypes = {e["dtype"] for e in entries if e["text_name"] is not None}
    dtype = SAFETENSORS_DTYPES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
    (folder / "config.json").write_text(json.dumps(text_config(config, dtype), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, folder / name)
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_gguf_view(model_dir: Path, out: Path) -> Path:
    """A folder convert_hf_to_gguf.py converts the text model from without a second copy of the weights (15 GB at
    7B): write_text_checkpoint's config and tokenizer files next to links to model_dir's own safetensors files and
    index. The converter drops the vision tower itself (``TextModel.filter_tensors`` skips ``visual.`` tensors)
    and strips ``language_model.``, so it reads exactly the text checkpoint's tensors (checked on a tiny model:
    the same GGUF tensors, byte for byte)."""
    entries = checkpoint_tensors(model_dir)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in [*model_dir.glob("*.safetensors"), *model_dir.glob("*.safetensors.index.json")]:
        (tmp / path.name).symlink_to(path.resolve())
    write_text_files(model_dir, tmp, entries)
    tmp.rename(out)
    return out


def convert_genai(text_dir: Path | Callable[[], Path], work: Path, precision: str, python: str) -> Path:
    """onnxruntime-genai model builder output for one precision (cached; ``text_dir`` as in llama_source)."""
    out = work / f"ortgenai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    text_dir = text_dir() if callable(text_dir) else text_dir
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(text_dir), "-o", str(tmp)]
    command += ["-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
    if precision != "fp32":
        command += ["--extra_options", "block_size=32", "accuracy_level=4"]
    what = f"onnxruntime-genai builder ({precision})"
    record_conversion(work, what, _run_logged(command, work / "logs" / f"ortgenai-{precision}.log", what))
    tmp.rename(out)
    return out


def llama_cpp_source(work: Path, given: Path | None) -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py: --llama-cpp-src, or the installed version's sdist."""
    if given is not None:
        if not (given / "convert_hf_to_gguf.py").is_file():
            raise PeerError(f"--llama-cpp-src {given} has no convert_hf_to_gguf.py")
        return given
    from importlib.metadata import version

    release = version("llama-cpp-python")
    src = work / f"llama-cpp-python-{release}-src"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    download = work / "downloads"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [f"llama-cpp-python=={release}", "-d", str(download)]
    _run_logged(command, work / "logs" / "llama-cpp-sdist.log", f"pip download llama-cpp-python=={release} (source)")
    archive = next(download.glob(f"llama_cpp_python-{release}.tar.gz"), None)
    if archive is None:
        raise PeerError(f"pip download gave no llama_cpp_python-{release}.tar.gz in {download}")
    prefix = f"llama_cpp_python-{release}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and rel.startswith(wanted):
                member.name = rel
                tar.extract(member, tmp, filter="data")
    tmp.rename(src)
    archive.unlink()  # 77 MB; the three parts needed are extracted
    return src


def gguf_outtype(model_dir: Path, need_f32: bool) -> str:
    """``convert_hf_to_gguf.py --outtype`` for the source GGUF: bf16 when every text weight is bfloat16 and no f32
    row needs the f32 file (see llama_source), else f32."""
    dtypes = {e["dtype"] for e in checkpoint_tensors(model_dir) if e["text_name"] is not None}
    return "bf16" if dtypes == {"BF16"} and not need_f32 else "f32"


def llama_source(model_dir: Path, work: Path, src: Path, need_f32: bool) -> Path:
    """The GGUF the quantized files are made from (cached): ``convert_hf_to_gguf.py --outtype f32`` of the text
    model (through write_gguf_view), or ``--outtype bf16`` when every text weight is bfloat16 and no f32 row is
    asked for.

    bfloat16 -> float32 is exact, and llama_model_quantize turns every source tensor into float32 before
    quantizing it, so a q8_0 / q4_0 made from the bf16 GGUF is byte for byte the one made from the f32 GGUF
    (checked on a tiny model); the bf16 file is half the size (15 GB instead of 30 GB at 7B)."""
    f32, bf16 = work / "llamacpp-f32.gguf", work / "llamacpp-bf16.gguf"
    if f32.is_file():
        return f32
    if bf16.is_file() and not need_f32:
        return bf16
    outtype = gguf_outtype(model_dir, need_f32)
    numel = sum(e["numel"] for e in checkpoint_tensors(model_dir) if e["text_name"] is not None)
    require_disk(work, numel * (2 if outtype == "bf16" else 4), f"the {outtype} GGUF")
    view = write_gguf_view(model_dir, work / "gguf-view" / "text")  # "text": the GGUF's general.name, as before
    out = work / f"llamacpp-{outtype}.gguf"
    tmp = out.with_name(out.name + ".tmp")
    command = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(view), "--outfile", str(tmp)]
    command += ["--outtype", outtype]
    stats = _run_logged(command, work / "logs" / f"llamacpp-{outtype}.log", f"convert_hf_to_gguf.py ({outtype})")
    record_conversion(work, f"convert_hf_to_gguf.py --outtype {outtype}", stats)
    tmp.rename(out)
    return out


def llama_quantized(work: Path, precision: str) -> Path:
    """Where the GGUF of one quantized precision is cached."""
    return work / f"llamacpp-{LLAMA_TYPES[precision]}.gguf"


def llama_quantize(source: Path, work: Path, precision: str, threads: int) -> Path:
    """``llama_model_quantize`` of the source GGUF to q8_0 (int8) or q4_0 (int4), llama.cpp's defaults (cached)."""
    out = llama_quantized(work, precision)
    if out.is_file():
        return out
    bits = {"q8_0": 8.5, "q4_0": 4.5}[LLAMA_TYPES[precision]] / (16 if source.name.endswith("-bf16.gguf") else 32)
    # x2: llama.cpp keeps more bits in the output (and a small model's embedding) than in the blocks
    require_disk(work, int(source.stat().st_size * min(1.0, 2 * bits)), f"the {out.name} file")
    tmp = out.with_name(out.name + ".tmp")
    code = (
        "import ctypes, sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
        "p.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3].upper()); p.nthread = int(sys.argv[4]); "
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
    )
    command = [sys.executable, "-c", code, str(source), str(tmp), LLAMA_TYPES[precision], str(threads)]
    what = f"llama_model_quantize ({source.name} -> {out.name})"
    stats = _run_logged(command, work / "logs" / f"llamacpp-{LLAMA_TYPES[precision]}.log", what)
    record_conversion(work, f"llama_model_quantize {LLAMA_TYPES[precision]}", stats)
    tmp.rename(out)
    return out


def convert_llama(model_dir: Path, work: Path, precision: str, src: Path, threads: int) -> Path:
    """GGUF file of one precision (cached): f32 from convert_hf_to_gguf.py, others quantized from the source."""
    if precision != "fp32" and llama_quantized(work, precision).is_file():
        return llama_quantized(work, precision)
    source = llama_source(model_dir, work, src, need_f32=precision == "fp32")
    return source if precision == "fp32" else llama_quantize(source, work, precision, threads)


# ----------------------------------------------------------------------------------------------- children
def _peak_rss_mib() -> float:
    from bench import peak_rss_mib  # VmHWM: ru_maxrss would include this tool's own peak (see there)

    return peak_rss_mib()


def save_logits(args: argparse.Namespace, logits: np.ndarray) -> None:
    """The prompt's next-token logits next to the child's JSON, for the parent's comparison with the reference."""
    np.save(args.child_out.with_suffix(".logits.npy"), np.asarray(logits, dtype=np.float32))


def compare_logits(logits: np.ndarray, reference: np.ndarray, top: int = 10) -> dict[str, Any]:
    """Max abs difference of two next-token logit vectors, relative to the reference's spread, and top-k overlap."""
    diff = float(np.abs(logits - reference).max())
    ours, theirs = np.argsort(-logits)[:top], np.argsort(-reference)[:top]
    return {
        "max_abs_diff": diff,
        "relative_diff": diff / float(reference.std() or 1.0),
        "top1_same": bool(ours[0] == theirs[0]),
        f"top{top}_overlap": len(set(ours.tolist()) & set(theirs.tolist())),
    }


#: one generation: (start time, time each new token was known, the batch's first row of tokens)
Run = tuple[float, list[float], list[int]]


def measure(generate: Callable[[int, int], Run], prompt_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and decode figures from ``generate(batch, new_tokens)`` (warm-up, then median of --repeats)."""
    from bench import cpu_seconds

    result: dict[str, Any] = {}
    batches = [1, 4] if args.batch4 else [1]
    for batch in batches:
        generate(batch, args.new_tokens)  # warm-up
        rates, prefill, ttft, busy, tokens = [], [], [], [], []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), cpu_seconds()
            start, times, tokens = generate(batch, args.new_tokens)
            busy.append((cpu_seconds() - cpu) / (time.perf_counter() - wall))
            assert len(times) == args.new_tokens, f"{len(times)} tokens, not {args.new_tokens}"
            rates.append(step_rate(times, batch))
            prefill.append(prompt_len * batch / (times[0] - start))
            ttft.append(times[0] - start)
        result[f"decode_b{batch}_tok_s"] = {"median": statistics.median(rates), "runs": rates, "cores_busy": busy}
        if batch == 1:
            result["prefill_tok_s"] = {"median": statistics.median(prefill), "runs": prefill, "cores_busy": busy}
            result["ttft_s"] = {"median": statistics.median(ttft), "runs": ttft, "cores_busy": busy}
            result["decode_tokens"] = [int(t) for t in tokens]
    return result


def child_ortgenai(model: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """onnxruntime-genai on the CPU; EOS is masked with min_length = max_length so every run is full length."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(str(model))
    config.clear_providers()
    options = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    llm = og.Model(config)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_mib": _peak_rss_mib()}

    def generate(batch: int, new_tokens: int) -> Run:
        params = og.GeneratorParams(llm)
        length = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=batch)
        generator = og.Generator(llm, params)
        times: list[float] = []
        start = time.perf_counter()
        generator.append_tokens(np.array([prompt] * batch, dtype=np.int32))
        for _ in range(new_tokens):
            generator.generate_next_token()
            times.append(time.perf_counter())
        tokens = list(generator.get_sequence(0)[len(prompt) :])
        del generator
        return start, times, tokens

    params = og.GeneratorParams(llm)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 1, batch_size=1)
    generator = og.Generator(llm, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    save_logits(args, np.asarray(generator.get_logits()).reshape(-1))
    del generator
    result.update(measure(generate, len(prompt), args))
    result["version"] = og.__version__
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def child_llamacpp(model: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python's low-level API: one llama_batch per step, greedy argmax on the host."""
    import llama_cpp as lc

    lc.llama_backend_init()
    quiet = lc.llama_log_callback(lambda *_: None)  # held until the end: llama.cpp keeps the pointer
    lc.llama_log_set(quiet, ctypes.c_void_p(0))
    start = time.perf_counter()
    model_params = lc.llama_model_default_params()
    llm = lc.llama_model_load_from_file(str(model).encode(), model_params)
    if not llm:
        raise PeerError(f"llama.cpp could not load {model}")
    n_seq = 4 if args.batch4 else 1
    ctx_params = lc.llama_context_default_params()
    ctx_params.n_ctx = (len(prompt) + args.new_tokens + 16) * n_seq
    ctx_params.n_batch = ctx_params.n_ubatch = max(512, len(prompt))
    ctx_params.n_seq_max = n_seq
    ctx_params.n_threads = ctx_params.n_threads_batch = args.threads
    ctx = lc.llama_init_from_model(llm, ctx_params)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(llm))
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_mib": _peak_rss_mib()}
    batch_buf = lc.llama_batch_init(max(len(prompt), n_seq), 0, n_seq)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch_buf.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch_buf.token[i], batch_buf.pos[i], batch_buf.n_seq_id[i] = token, pos, 1
            batch_buf.seq_id[i][0], batch_buf.logits[i] = seq, logits
        if lc.llama_decode(ctx, batch_buf) != 0:
            raise PeerError("llama_decode failed")

    def argmax(index: int) -> int:
        row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, index), shape=(vocab,))
        return int(row.argmax())

    def generate(batch: int, new_tokens: int) -> Run:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        times: list[float] = []
        rows: list[list[int]] = [[] for _ in range(batch)]
        start = time.perf_counter()
        for seq in range(batch):  # prefill each sequence (batch 1: just the one)
            decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            rows[seq].append(argmax(len(prompt) - 1))
        times.append(time.perf_counter())
        for step in range(1, new_tokens):
            pos = len(prompt) + step - 1
            decode([(rows[seq][-1], pos, seq, True) for seq in range(batch)])
            for seq in range(batch):
                rows[seq].append(argmax(seq))
            times.append(time.perf_counter())
        return start, times, rows[0]

    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
    save_logits(args, np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, len(prompt) - 1), shape=(vocab,)).copy())
    result.update(measure(generate, len(prompt), args))
    result["version"] = lc.__version__
    result["peak_rss_mib"] = _peak_rss_mib()
    lc.llama_batch_free(batch_buf)
    lc.llama_free(ctx)
    lc.llama_model_free(llm)
    del quiet
    return result


def child_ours(folder: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Our runtime (ONNX Runtime CPU, VLM_EXPORT_THREADS intra-op threads) on a vlm-export folder, fed the same
    prompt ids as the peers through ``Generator.steps``: a token is known when its StepEvent is yielded."""
    from importlib.metadata import version

    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.generation import StepEvent

    start = time.perf_counter()
    pipe = VLMPipeline.from_pretrained(folder, backend="ort-cpu")
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_mib": _peak_rss_mib()}

    def steps(batch: int, new_tokens: int) -> Any:
        settings = pipe.settings(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0, eos_token_ids=[])
        no_media = pipe.family.encode_media([], [0] * batch)
        events = pipe.generator.steps([list(prompt)] * batch, no_media, settings)
        return (event for event in events if isinstance(event, StepEvent))

    def generate(batch: int, new_tokens: int) -> Run:
        times: list[float] = []
        tokens: list[int] = []
        start = time.perf_counter()
        for event in steps(batch, new_tokens):
            times.append(time.perf_counter())
            tokens.append(int(event.tokens[0]))
        return start, times, tokens

    save_logits(args, next(steps(1, 1)).logits[0])
    result.update(measure(generate, len(prompt), args))
    result["version"] = f"vlm-export {version('vlm-export')}, onnxruntime {version('onnxruntime')}"
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def child_reference(text_dir: Path, model_dir: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """transformers greedy tokens on the prompt ids: the text-only checkpoint and the original VL checkpoint, in
    ``args.dtype`` (float32 unless it does not fit: see reference_dtype)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    dtype_name = getattr(args, "dtype", None) or "float32"
    result: dict[str, Any] = {"dtype": dtype_name, "prompt_ids": list(prompt), "check_tokens": args.check_tokens}
    ids = torch.tensor([prompt])
    for key, folder, cls in (("text", text_dir, AutoModelForCausalLM), ("vl", model_dir, AutoModelForImageTextToText)):
        model = cls.from_pretrained(folder, dtype=getattr(torch, dtype_name)).eval()
        config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        config.update(do_sample=False, repetition_penalty=1.0, eos_token_id=None, top_k=None, top_p=None)
        config.update(temperature=None, pad_token_id=0)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                max_new_tokens=args.check_tokens,
            )  # fmt: skip
        result[f"{key}_tokens"] = out[0, len(prompt) :].tolist()
        if key == "text":
            with torch.inference_mode():
                save_logits(args, model(input_ids=ids).logits[0, -1].float().numpy())
        del model
    result["transformers_version"] = transformers.__version__
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


# ----------------------------------------------------------------------------------------------- driver
def available(peer: str, genai_python: str) -> str | None:
    """None when the peer's package imports, else the one-line reason with the install command."""
    modules, install = REQUIREMENTS[peer]
    if peer == "ortgenai" and genai_python != sys.executable:
        code = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
        try:
            done = subprocess.run([genai_python, "-c", code, *modules], capture_output=True, text=True)
        except OSError:
            return f"skipping {peer}: --genai-python {genai_python} cannot be run"
        missing = done.stdout.split() if done.returncode == 0 else [f"(--genai-python {genai_python} failed)"]
    else:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"skipping {peer}: {', '.join(missing)} not importable ({install})" if missing else None


def idle_fraction(seconds: float = 3.0) -> float:
    """Fraction of all CPUs' time spent idle over the next ``seconds`` (Linux /proc/stat; 1.0 elsewhere)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 1.0
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(limit_s: float, threshold: float = 0.9) -> float:
    """Wait up to ``limit_s`` for the CPUs to be >= ``threshold`` idle; returns the last idle fraction seen."""
    deadline = time.monotonic() + limit_s
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        print(f"  waiting for idle CPUs ({idle:.0%} idle) ...", flush=True)
        time.sleep(10)
        idle = idle_fraction()
    return idle


def run_child(
    kind: str, target: Path, args: argparse.Namespace, work: Path, tag: str, python: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its JSON result plus the load average around it."""
    out = work / "results" / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLM_EXPORT_THREADS": str(args.threads)}
    command = [python, __file__, str(args.model_dir), "--child", kind, "--target", str(target)]
    command += ["--inputs", str(work / "inputs.json"), "--child-out", str(out), "--threads", str(args.threads)]
    command += ["--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
    command += ["--check-tokens", str(args.check_tokens)] + ([] if args.batch4 else ["--no-batch4"]) + list(extra)
    idle = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else None
    print(f"running {tag} ...", flush=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise PeerError(f"the {tag} child failed (exit {done.returncode}); its error is printed above")
    print(f"  {tag} done in {time.perf_counter() - start:.0f} s", flush=True)
    result = json.loads(out.read_text())
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    if idle is not None:
        result["idle_before"] = idle
    return result


def cached_reference(work: Path, prompt: list[int], check_tokens: int) -> dict[str, Any] | None:
    """The reference an earlier run left in --work for the same prompt ids and token count, else None (at 7B it
    costs two model loads: reruns that only measure skip it, and need no text checkpoint for it)."""
    path, logits = work / "results" / "reference.json", work / "results" / "reference.logits.npy"
    if not (path.is_file() and logits.is_file()):
        return None
    reference = json.loads(path.read_text())
    if reference.get("prompt_ids") != list(prompt) or reference.get("check_tokens") != check_tokens:
        return None
    return reference


def prune(path: Path) -> None:
    """Delete an intermediate file or folder of --work that nothing asked for needs any more (--prune)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.is_file():
        path.unlink()
    else:
        return
    print(f"  --prune: deleted {path}", flush=True)


def prompt_ids(model_dir: Path, work: Path, prompt_tokens: int) -> dict[str, Any]:
    """tools/bench.py's text prompt (write_inputs), templated and tokenized as our runtime does."""
    from bench import _chat_template, _conversation, write_inputs
    from tokenizers import Tokenizer

    from vlm_export.runtime.chat import render_chat

    inputs = write_inputs(model_dir, work, prompt_tokens, image_size=8, num_images=0)
    rendered = render_chat(_chat_template(model_dir), _conversation(inputs["text"], []), add_generation_prompt=True)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    inputs["prompt_ids"] = tokenizer.encode(rendered, add_special_tokens=False).ids
    return inputs


def previous_report(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The report in ``path`` (--update), whose results this run replaces key by key; it must measure the same."""
    report = json.loads(path.read_text())
    for key in ("model_dir", "threads", "prompt_tokens", "new_tokens"):
        if report.get(key) != fresh[key]:
            raise PeerError(
                f"--update: {path} has {key} {report.get(key)!r}, this run {fresh[key]!r}; use another --json"
            )
    report["skipped"] = fresh["skipped"]
    return report


def cpu_model() -> str:
    """The CPU's model name (Linux), for the report's header."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def _median(entry: Any) -> float | None:
    return entry["median"] if isinstance(entry, dict) else entry


def print_report(report: dict[str, Any]) -> None:
    """The peer x precision table, the cores-busy caveat and the greedy-token agreement."""
    print(f"\n{report['model_dir']}  ({report['threads']} threads, {report['cpus']} CPUs: {report.get('cpu_model')})")
    print(
        f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, greedy, EOS ignored, "
        f"median of {report['repeats']} runs after a warm-up, {report.get('rounds', 1)} interleaved round(s)"
    )
    reference = report.get("reference", {})
    if reference:
        same = leading_agreement(reference["text_tokens"], reference["vl_tokens"])
        dtype = reference.get("dtype", "float32")
        print(
            f"reference (transformers {reference['transformers_version']}, {dtype}): text-only checkpoint vs VL "
            f"checkpoint greedy tokens agree for {same} of {len(reference['vl_tokens'])}"
        )
        if reference.get("dtype_note"):
            print(f"  {reference['dtype_note']}")
        print("logits: each peer's next-token logits after the prompt vs the text-only checkpoint's (max |diff| / std)")
    header = f"{'peer':<10}{'precision':<11}{'decode b1':>11}{'decode b4':>11}{'prefill':>10}{'TTFT':>8}"
    header += f"{'peak RSS':>10}{'cores busy':>12}{'tokens = ref':>14}{'logits |d|':>12}{'top-10':>8}"
    print(header)
    units = f"{'':<21}{'tok/s':>11}{'tok/s':>11}{'tok/s':>10}{'s':>8}{'MiB':>10}"
    units += f"{'(of ' + str(report['threads']) + ')':>12}"
    print(units + f"{'':>14}{'/ spread':>12}{'shared':>8}")
    for key, entry in report["results"].items():
        peer, precision = key.split("/")
        busy = [x for name in ("decode_b1_tok_s", "decode_b4_tok_s") for x in entry.get(name, {}).get("cores_busy", [])]
        cells = []
        for (name, _), width in zip(FIGURES, (11, 11, 10), strict=True):
            value = _median(entry.get(name))
            cells.append(f"{value:>{width}.1f}" if value is not None else f"{'n/a':>{width}}")
        agree = "-"
        if reference.get("text_tokens"):
            ref = reference["text_tokens"]
            agree = f"{leading_agreement(entry['decode_tokens'][: len(ref)], ref)}/{len(ref)}"
        ttft = _median(entry.get("ttft_s"))
        cells.append(f"{ttft:>8.2f}" if ttft is not None else f"{'n/a':>8}")
        label = entry.get("label", precision)
        line = f"{peer:<10}{label:<11}" + "".join(cells) + f"{entry['peak_rss_mib']:>10.0f}"
        line += f"{statistics.mean(busy):>12.2f}" if busy else f"{'-':>12}"
        logits = entry.get("logits_vs_reference")
        if logits:
            line += f"{agree:>14}{logits['relative_diff']:>12.1e}{logits['top10_overlap']:>6}/10"
        else:
            line += f"{agree:>14}{'-':>12}{'-':>8}"
        print(line)
        before, after = entry.get("loadavg_1min", (0.0, 0.0))
        if max(before, after) > report["threads"] + 0.5:
            print(f"  warning: load average {before:.1f} / {after:.1f} around this run: the cores were shared")
    for line in report.get("skipped", []):
        print(line)
    for what, stats in report.get("conversions", {}).items():
        peak = f", peak RSS {stats['peak_rss_mib']:.0f} MiB" if stats.get("peak_rss_mib") else ""
        print(f"conversion: {what} {stats['wall_s']:.0f} s{peak}")
    lines = ratios(report)
    if lines:
        print("\nours / theirs at the same precision (higher is better for ours; peak RSS lower is better):")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model_dir", type=Path, nargs="?", help="Hugging Face Qwen2.5-VL or Qwen3-VL folder (tools/make_model.py)"
    )
    parser.add_argument("--work", type=Path, help="folder for the converted models (cached) and the results")
    parser.add_argument("--peers", default="ortgenai,llamacpp", help="comma-separated: ortgenai, llamacpp")
    parser.add_argument("--precisions", default="fp32,int8,int4", help="comma-separated: fp32, int8, int4")
    parser.add_argument(
        "--ours",
        default="",
        metavar="LABEL=DIR,...",
        help="also run our runtime on these vlm-export folders of model_dir (e.g. fp32=m-onnx,int4=m-int4) as rows "
        "ours/LABEL, in the same interleaved rounds as the peers, so ours and theirs share every window",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for every peer (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up (default 3)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per decode run (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="templated text prompt length (default 64)")
    parser.add_argument("--no-batch4", dest="batch4", action="store_false", help="skip the batch-4 decode runs")
    parser.add_argument("--check-tokens", type=int, default=16, help="reference greedy tokens to compare (default 16)")
    parser.add_argument(
        "--genai-python",
        default=sys.executable,
        help="interpreter with onnxruntime-genai, when it lives in another venv that also has numpy, torch and "
        "transformers (its model builder loads the checkpoint with them; default: this interpreter)",
    )
    parser.add_argument(
        "--llama-cpp-src",
        type=Path,
        help="llama.cpp folder with convert_hf_to_gguf.py (default: the installed llama-cpp-python's source "
        "package, fetched with pip download into --work)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every peer x precision this many times, interleaved; each figure is the median of the rounds' "
        "medians (as tools/bench.py --rounds; default 1)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="with an existing --json report: rerun only the given --peers x --precisions (e.g. one a neighbour "
        "disturbed) and replace those rows, keeping the others",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for the CPUs to be >= 90%% idle over 3 s (a shared "
        "machine; default 0: do not wait)",
    )
    parser.add_argument("--convert-only", action="store_true", help="convert (into --work) and stop; measure nothing")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete the text checkpoint and llama.cpp's source GGUF from --work once nothing asked for needs them "
        "(at 7B they and q4_0 are 34 GB together; pruned, ~18 GB at a time); a later run that needs them writes "
        "them again",
    )
    parser.add_argument("--json", type=Path, help="write the full report (all runs) to this file")
    parser.add_argument("--show", action="store_true", help="print the table of an existing --json report; run nothing")
    parser.add_argument("--child", choices=("ortgenai", "llamacpp", "ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # the reference child's
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    except PeerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.show:
        if args.json is None:
            parser.error("--show needs --json REPORT")
        print_report(json.loads(args.json.read_text()))
        return 0
    if args.child:
        prompt = json.loads(args.inputs.read_text())["prompt_ids"]
        if args.child == "reference":
            result = child_reference(args.target, args.model_dir.resolve(), prompt, args)
        else:
            children = {"ortgenai": child_ortgenai, "llamacpp": child_llamacpp, "ours": child_ours}
            result = children[args.child](args.target, prompt, args)
        args.child_out.write_text(json.dumps(result, indent=2))
        return 0
    if args.model_dir is None or args.work is None:
        parser.error("model_dir and --work are required (unless --show)")
    peers = [p for p in args.peers.split(",") if p]
    precisions = [p for p in args.precisions.split(",") if p]
    for name, values, known in (("--peers", peers, PEERS), ("--precisions", precisions, PRECISIONS)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    ours = parse_ours(args.ours)
    model_dir, work = args.model_dir.resolve(), args.work.resolve()
    args.model_dir = model_dir
    if not (model_dir / "config.json").is_file():
        raise PeerError(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)")
    for module in ("torch", "transformers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            raise PeerError(
                f"{module} is not installed: the conversion needs the export extra (pip install -e .[export])"
            )
    entries = checkpoint_tensors(model_dir)
    memory = mem_available()
    too_big = {  # what does not fit here is said first: installing the package would not help
        f"ortgenai/{precision}": reason
        for precision in (precisions if "ortgenai" in peers else [])
        if not (work / f"ortgenai-{precision}" / "genai_config.json").is_file()
        and (reason := genai_memory_reason(entries, precision, memory))
    }
    skipped = list(too_big.values())
    if "ortgenai" in peers and len(too_big) == len(precisions):
        peers.remove("ortgenai")
    reasons = {peer: available(peer, args.genai_python) for peer in peers}
    skipped += [reason for reason in reasons.values() if reason]
    for line in skipped:
        print(line, flush=True)
    peers = [p for p in peers if reasons[p] is None]
    if not peers and not ours:
        raise PeerError("no peer to run: install one of them or make room (see the lines above)")
    work.mkdir(parents=True, exist_ok=True)
    inputs = prompt_ids(model_dir, work, args.prompt_tokens)
    (work / "inputs.json").write_text(json.dumps(inputs))

    text_dir = work / "text"
    text = functools.partial(write_text_checkpoint, model_dir, text_dir)  # written on first use, then cached
    reference = cached_reference(work, inputs["prompt_ids"], args.check_tokens) if args.check_tokens > 0 else None
    if args.check_tokens > 0 and reference is None:
        dtype, note = reference_dtype(entries, memory)
        if note:
            print(note, flush=True)
        if dtype is None:
            skipped.append(note)
        else:  # before the conversions: with --prune the text checkpoint goes once they are done
            print("reference (transformers) ...", flush=True)
            reference = run_child("reference", text(), args, work, "reference", sys.executable, ("--dtype", dtype))
            reference["dtype_note"] = note
            (work / "results" / "reference.json").write_text(json.dumps(reference, indent=2))  # for cached_reference

    print("converting (cached in --work) ...", flush=True)
    targets: dict[str, tuple[Path, str]] = {}
    for precision in precisions if "ortgenai" in peers else []:
        if f"ortgenai/{precision}" in too_big:
            continue
        targets[f"ortgenai/{precision}"] = (convert_genai(text, work, precision, args.genai_python), precision)
    if args.prune:  # the reference and onnxruntime-genai are done with it; llama.cpp reads model_dir's files
        prune(text_dir)
    if "llamacpp" in peers:
        src = llama_cpp_source(work, args.llama_cpp_src)
        gguf = None
        if any(p == "fp32" or not llama_quantized(work, p).is_file() for p in precisions):
            gguf = llama_source(model_dir, work, src, need_f32="fp32" in precisions)
        for precision in precisions:
            if precision == "fp32":
                assert gguf is not None
                path = gguf
            elif gguf is not None:
                path = llama_quantize(gguf, work, precision, args.threads)
            else:
                path = llama_quantized(work, precision)  # cached
            targets[f"llamacpp/{precision}"] = (path, LLAMA_TYPES[precision])
        if args.prune and gguf is not None and "fp32" not in precisions:
            prune(gguf)

    for label, folder in ours.items():
        source = json.loads((folder / "manifest.json").read_text()).get("source_model")
        if source and Path(source).resolve() != model_dir:
            print(f"warning: --ours {label}: {folder} was exported from {source}, not {model_dir}", flush=True)
        targets[f"ours/{label}"] = (folder, label)

    if args.convert_only:
        print("\n".join(f"{key}: {path}" for key, (path, _) in targets.items()))
        return 0
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "work": str(work),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "prompt_tokens": len(inputs["prompt_ids"]),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "skipped": skipped,
        "results": {},
    }
    if args.update and args.json and args.json.is_file():
        report = previous_report(args.json, report)
    conversions = work / "conversions.json"
    if conversions.is_file():
        report["conversions"] = json.loads(conversions.read_text())
    if reference is not None:
        report["reference"] = reference
    elif args.check_tokens > 0:
        report.pop("reference", None)  # --update: an older reference no longer applies
    from bench import merge_rounds

    rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
    for index in range(args.rounds):  # interleaved: a neighbour taking the cores for a while hits every key less
        for key, (path, label) in targets.items():
            peer = key.split("/")[0]
            python = args.genai_python if peer == "ortgenai" else sys.executable
            tag = key.replace("/", "-") + (f"-{index}" if args.rounds > 1 else "")
            rounds[key].append(run_child(peer, path, args, work, tag, python))
            result = merge_rounds(rounds[key])
            reference_logits = work / "results" / "reference.logits.npy"
            if report.get("reference") and reference_logits.is_file():
                logits = np.load(work / "results" / f"{tag}.logits.npy")
                result["logits_vs_reference"] = compare_logits(logits, np.load(reference_logits))
            result.update(label=label, model=str(path), batch4=args.batch4)
            report["results"][key] = result
            if args.json:  # keep what is done if a later child fails
                args.json.write_text(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
