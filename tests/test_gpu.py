"""TensorRT and ONNX Runtime CUDA on a GPU: engines for the tiny model of every family, compared with ONNX Runtime
CPU (vision embeddings, every decode step's logits) and with transformers (greedy tokens: identical for fp32
engines; the agreement of fp16 engines is reported). Skipped cleanly without tensorrt/polygraphy or a CUDA device.

Run: `pytest -m gpu tests/test_gpu.py -s` on a machine with an NVIDIA GPU and the `trt` extra.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="needs TensorRT (the 'trt' extra)")
pytest.importorskip("polygraphy", reason="needs polygraphy (the 'trt' extra)")


def _cuda_devices() -> int:
    import ctypes

    try:
        from polygraphy import cuda

        count = ctypes.c_int()
        return count.value if cuda.wrapper().handle.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    except Exception:  # no libcudart, no driver
        return 0


if _cuda_devices() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS = 12
LIMITS = {"max_batch": 2, "max_seq_len": 512, "max_images": 3}
# fp32 engines (TF32 off) vs ONNX Runtime CPU: kernel order differences only
LOGITS_ATOL = 1e-3
FAMILIES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", []),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", []),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", ["--moe-form", "dense"]),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", []),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


def _export(model_dir: Path, out: Path, extra: list[str]) -> Path:
    from vlm_export.exporter.cli import main

    assert main(["--model", str(model_dir), "--output", str(out), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def engine_dir(family, request, tmp_path_factory) -> Path:
    """The family's fp32 export with engines built next to it (dense experts for the MoE family)."""
    from vlm_export.exporter.engines import build_engines

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    folder = _export(model_dir, tmp_path_factory.mktemp("trt") / family, FAMILIES[family][2])
    build_engines(folder, progress=False, **LIMITS)
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


def test_engine_metadata_in_manifest(engine_dir):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    meta = manifest["engines"]["tensorrt"]
    assert meta["tensorrt_version"] == trt.__version__ and meta["compute_capability"]
    assert manifest["limits"]["max_batch"] == 2 and manifest["limits"]["max_seq_len"] == 512
    assert (engine_dir / meta["timing_cache"]).is_file()
    for name in ("vision_encoder", "embedding", "decoder"):
        entry = meta["graphs"][name]
        assert (engine_dir / entry["engine"]).is_file()
        print(f"{name}: {entry['build_s']} s, rewritten ops {entry['rewritten_ops']}")
    assert [p["name"] for p in meta["graphs"]["decoder"]["profiles"]] == ["prefill", "decode"]


def test_trt_matches_onnxruntime_cpu(engine_dir, images):
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.trt import GpuTensor

    trt_pipe = VLMPipeline.from_pretrained(engine_dir, backend="trt")
    ort_pipe = VLMPipeline.from_pretrained(engine_dir, backend="ort-cpu")
    for name, conversations in _cases(images).items():
        want, want_logits = _steps(ort_pipe, conversations)
        got, got_logits = _steps(trt_pipe, conversations)
        steps = min(want_logits.shape[1], got_logits.shape[1])
        diff = float(np.abs(want_logits[:, :steps] - got_logits[:, :steps]).max())
        print(f"{name}: max |logits diff| TensorRT fp32 vs ONNX Runtime CPU {diff:.3g}")
        assert diff <= LOGITS_ATOL, (name, diff)
        assert got.token_ids == want.token_ids, name
    # the cache stays on the GPU and is updated in place: `present` is the allocated `past` buffer, with the
    # engine's fixed capacity (max_seq_len) whatever capacity was asked for
    decoder = trt_pipe.generator.sessions["decoder"]
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


def _hf_tokens(family, model_dir, conversations, dtype=None):
    from vlm_export.testing.reference import vl_processor

    model_name, processor_name, _ = FAMILIES[family]
    model = getattr(transformers, model_name).from_pretrained(model_dir).eval()
    processor = vl_processor(model_dir, getattr(transformers, processor_name))
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [[Image.open(p["path"]) for m in c for p in m["content"] if p["type"] == "image"] for c in conversations]
    inputs = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return out[:, inputs["input_ids"].shape[1] :].numpy()


def _trim(row, eos):
    for index, token in enumerate(row.tolist()):
        if token in eos:
            return row[: index + 1].tolist()
    return row.tolist()


def test_fp32_engines_greedy_tokens_match_transformers(family, engine_dir, images, request):
    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(engine_dir, backend="trt")
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    eos = set(pipe.settings().eos_token_ids)
    for name, conversations in _cases(images).items():
        output, _ = _steps(pipe, conversations)
        reference = _hf_tokens(family, model_dir, conversations)
        for row in range(len(conversations)):
            assert output.token_ids[row] == _trim(reference[row], eos), (name, row)


def test_fp16_engines_agreement_reported(family, images, request, tmp_path):
    """fp16 export -> strongly typed fp16 engines; greedy-token agreement with transformers fp32 is reported."""
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime import VLMPipeline

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    folder = _export(model_dir, tmp_path / "fp16", ["--dtype", "float16", *FAMILIES[family][2]])
    manifest = build_engines(folder, progress=False, **LIMITS)
    assert manifest.engines["tensorrt"]["precision"] == "fp16"
    pipe = VLMPipeline.from_pretrained(folder, backend="trt")
    eos = set(pipe.settings().eos_token_ids)
    same = total = 0
    for conversations in _cases(images).values():
        output, _ = _steps(pipe, conversations)
        reference = _hf_tokens(family, model_dir, conversations)
        for row in range(len(conversations)):
            want = _trim(reference[row], eos)
            got = output.token_ids[row]
            same += sum(a == b for a, b in zip(got, want, strict=False))
            total += len(want)
    print(f"{family} fp16 engines: {same}/{total} greedy tokens equal to transformers fp32")
    assert total > 0


def test_limits_give_one_line_errors(engine_dir, images):
    from vlm_export.errors import InputError
    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(engine_dir, backend="trt")
    with pytest.raises(InputError, match="--max-batch"):
        pipe.generate([_user("a"), _user("b"), _user("c")], max_new_tokens=2)
    with pytest.raises(InputError, match="--max-seq-len"):
        pipe.generate(_user("word " * 600), max_new_tokens=2)
    # more images at the pixel budget than the vision engine was built for (the prompt-length check would fire
    # first in a full request, so the vision engine is called directly)
    from vlm_export.runtime.families import MediaItem

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


def test_ort_cuda_matches_cpu(engine_dir, images):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from vlm_export.runtime import VLMPipeline

    cuda_pipe = VLMPipeline.from_pretrained(engine_dir, backend="ort-cuda")
    cpu_pipe = VLMPipeline.from_pretrained(engine_dir, backend="ort-cpu")
    for name, conversations in _cases(images).items():
        want, want_logits = _steps(cpu_pipe, conversations)
        got, got_logits = _steps(cuda_pipe, conversations)
        steps = min(want_logits.shape[1], got_logits.shape[1])
        diff = float(np.abs(want_logits[:, :steps] - got_logits[:, :steps]).max())
        print(f"{name}: max |logits diff| ONNX Runtime CUDA vs CPU {diff:.3g}")
        assert diff <= LOGITS_ATOL and got.token_ids == want.token_ids, (name, diff)
