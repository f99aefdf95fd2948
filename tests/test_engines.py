"""TensorRT engine path, CPU side: profiles from the manifest limits, engine metadata checks, error messages,
the op-support table against the ops the exporter really emits, and the ONNX rewrite for older TensorRT
(checked numerically on ONNX Runtime). Building and running engines needs a GPU: see tests/test_gpu.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_export.errors import InputError
from vlm_export.exporter.engine_profiles import AxisRange, EngineLimits, ProfileError, engine_profiles, profile_for
from vlm_export.exporter.engines import EngineBuildError, resolve_limits, resolve_precision
from vlm_export.manifest import Manifest
from vlm_export.runtime.backends.trt import BackendError, check_engines, engine_mismatch, limit_message

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request) -> Path:
    return request.getfixturevalue(f"exported_{request.param}")


def _limits(manifest: Manifest, **overrides) -> EngineLimits:
    values = {"max_batch": 2, "max_seq_len": 512, "max_image_pixels": manifest.limits.max_image_pixels, "max_images": 3}
    values.update(overrides)
    return EngineLimits(**values)


# -- profiles ------------------------------------------------------------------------------------------
def test_profiles_cover_every_input_with_the_limits(exported):
    manifest = Manifest.load(exported)
    profiles = engine_profiles(manifest, exported, _limits(manifest))
    assert set(profiles) == {"vision_encoder", "embedding", "decoder"}
    prefill, decode = profiles["decoder"]
    assert (prefill.name, decode.name) == ("prefill", "decode")
    for spec in (prefill, decode, *profiles["embedding"], *profiles["vision_encoder"]):
        graph = next(g for g, specs in profiles.items() if spec in specs)
        assert set(spec.shapes) == set(manifest.graphs[graph].input_names())
        for low, opt, high in spec.shapes.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
    past = next(n for n in prefill.shapes if n.startswith("past_key_values."))
    # one fixed-capacity cache (KVCacheUpdate needs a static capacity); prefill: any prompt up to max_seq_len,
    # decode: one token after up to max_seq_len - 1
    for spec in (prefill, decode):
        assert [shape[2] for shape in spec.shapes[past]] == [512, 512, 512]
    assert prefill.shapes["inputs_embeds"][2][:2] == [2, 512]
    assert decode.shapes["inputs_embeds"][2][:2] == [2, 1]
    assert decode.shapes["attention_mask"][2] == [2, 512]
    # text-only prompts and decode steps merge zero visual rows
    assert profiles["embedding"][0].shapes["visual_embeds"][0][0] == 0


def test_vision_profile_holds_real_images_up_to_the_limit(exported):
    """Shapes the family's preprocessing really produces (odd sizes, extreme aspect ratios, max_images images in
    one request) never leave the vision profile measured with the probe images."""
    from vlm_export.runtime.families import MediaItem, runtime_family_for

    manifest = Manifest.load(exported)
    limits = _limits(manifest)
    spec = engine_profiles(manifest, exported, limits)["vision_encoder"][0]
    family = runtime_family_for(dataclasses.replace(manifest, limits=limits.to_limits()), exported)
    info = manifest.graphs["vision_encoder"]
    rng = np.random.default_rng(0)
    sizes = [(31, 29), (640, 480), (2000, 300), (300, 2000), (1500, 1500), (4000, 100), (97, 131)]
    for start in range(0, len(sizes), 2):
        group = [sizes[(start + k) % len(sizes)] for k in range(limits.max_images)]
        items = [MediaItem("image", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for w, h in group]
        feeds = family.encode_media(items, [1] * len(items)).feeds
        for tensor in info.inputs:
            low, _, high = spec.shapes[tensor.name]
            shape = feeds[tensor.name].shape
            assert all(lo <= v <= hi for v, lo, hi in zip(shape, low, high, strict=True)), (tensor.name, group, shape)


def test_profile_for_rejects_an_axis_without_a_rule(exported):
    info = Manifest.load(exported).graphs["decoder"]
    with pytest.raises(ProfileError, match="no TensorRT profile rule"):
        profile_for(info, {"batch": AxisRange(1, 1, 2)}, "x")
    with pytest.raises(ProfileError):
        AxisRange(3, 2, 4)


def test_polygraphy_profiles_carry_the_shapes(exported):
    pytest.importorskip("polygraphy")
    from vlm_export.exporter.engines import polygraphy_profiles

    manifest = Manifest.load(exported)
    specs = engine_profiles(manifest, exported, _limits(manifest))["decoder"]
    profiles = polygraphy_profiles(specs)
    assert len(profiles) == 2
    shape = profiles[1]["attention_mask"]
    assert (tuple(shape.min), tuple(shape.opt), tuple(shape.max)) == (
        tuple(specs[1].shapes["attention_mask"][0]),
        tuple(specs[1].shapes["attention_mask"][1]),
        tuple(specs[1].shapes["attention_mask"][2]),
    )


# -- limits, precision, metadata -----------------------------------------------------------------------
def test_limits_defaults_and_overrides(exported_qwen2_5_vl):
    manifest = Manifest.load(exported_qwen2_5_vl)
    assert manifest.limits.max_batch is None and manifest.limits.max_seq_len == 8192
    limits = resolve_limits(manifest)
    assert (limits.max_batch, limits.max_seq_len, limits.max_images) == (1, 8192, 4)
    assert limits.max_image_pixels == manifest.limits.max_image_pixels
    manifest.limits.max_seq_len = 128000  # a model's max_position_embeddings is not an engine size
    assert resolve_limits(manifest).max_seq_len == 4096
    limits = resolve_limits(manifest, max_batch=2, max_seq_len=100000, max_image_pixels=50176, max_images=2)
    assert (limits.max_batch, limits.max_seq_len, limits.max_image_pixels, limits.max_images) == (2, 100000, 50176, 2)
    with pytest.raises(EngineBuildError, match="--max-batch must be a positive integer"):
        resolve_limits(manifest, max_batch=0)
    with pytest.raises(ProfileError, match="at least 2"):
        engine_profiles(manifest, exported_qwen2_5_vl, _limits(manifest, max_seq_len=1))


def test_precision_rules():
    assert resolve_precision("auto", "float16") == ("fp16", True)
    assert resolve_precision("auto", "float32") == ("fp32", True)
    assert resolve_precision("bf16", "float32") == ("bf16", False)
    assert resolve_precision("fp16", "float32", "10.16.1.11") == ("fp16", False)
    with pytest.raises(EngineBuildError, match="needs a float32 export"):
        resolve_precision("bf16", "float16")
    # TensorRT 11 has no weakly typed builds (BuilderFlag.FP16/BF16 are gone): the export's types decide
    assert resolve_precision("auto", "float32", "11.4.0.106") == ("fp32", True)
    assert resolve_precision("fp16", "float16", "11.4.0.106") == ("fp16", True)
    with pytest.raises(EngineBuildError, match=r"TensorRT 11.4.0.106 builds only strongly typed.*--dtype float16"):
        resolve_precision("fp16", "float32", "11.4.0.106")
    with pytest.raises(EngineBuildError, match="strongly typed"):
        resolve_precision("bf16", "float32", "11.0")


def test_engine_mismatch_names_versions_and_gpu():
    meta = {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7"}
    assert engine_mismatch(meta, "10.3.0.26", "8.7") is None  # same release, other build number
    message = engine_mismatch(meta, "10.15.1.29", "9.0")
    assert "TensorRT 10.3.0.30 built them" in message and "10.15.1.29" in message
    assert "compute capability 8.7" in message and "9.0" in message


def test_check_engines_explains_how_to_rebuild(exported_qwen2_5_vl):
    manifest = Manifest.load(exported_qwen2_5_vl)
    with pytest.raises(BackendError, match=r"no TensorRT engines.*vlm-export build-engines"):
        check_engines(exported_qwen2_5_vl, manifest, "10.15.1", "9.0")
    manifest.engines["tensorrt"] = {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "graphs": {"x": {}}}
    with pytest.raises(BackendError) as error:
        check_engines(exported_qwen2_5_vl, manifest, "10.15.1", "9.0")
    assert f"vlm-export build-engines {exported_qwen2_5_vl}" in str(error.value)
    assert "\n" not in str(error.value)


def test_limit_message_names_the_flag():
    message = limit_message("decoder", "attention_mask", "total_sequence", 5000, 2, 4096, "out/q7")
    assert "total_sequence=5000" in message and "--max-seq-len" in message and "build-engines out/q7" in message
    assert "--max-batch" in limit_message("decoder", "inputs_embeds", "batch", 3, 1, 2, "d")
    assert "--max-images" in limit_message("vision_encoder", "pixel_values", "num_patches", 9999, 1, 3072, "d")


class _EngineShapes:
    """Just the profile queries of a TensorRT engine, for the selection logic (real engines: tests/test_gpu.py)."""

    def __init__(self, ranges):
        self.ranges = ranges

    def select(self, shapes):
        from vlm_export.runtime.backends.trt import TrtSession

        session = TrtSession.__new__(TrtSession)
        session.ranges = self.ranges
        session.axes = {"inputs_embeds": ["batch", "sequence", 8], "attention_mask": ["batch", "total_sequence"]}
        session.name = "decoder"
        session.backend = type("B", (), {"folder": Path("out")})()
        return session.select_profile(shapes)


def test_profile_selection_prefers_the_profile_tuned_for_the_shapes():
    # the decoder's two profiles as engine_profiles makes them (max_seq_len 4096): a decode step fits both
    engine = _EngineShapes([
        {"inputs_embeds": ((1, 1, 8), (1, 1024, 8), (2, 4096, 8)), "attention_mask": ((1, 1), (1, 1024), (2, 4096))},
        {"inputs_embeds": ((1, 1, 8), (1, 1, 8), (2, 1, 8)), "attention_mask": ((1, 2), (1, 1025), (2, 4096))},
    ])  # fmt: skip
    assert engine.select({"inputs_embeds": (1, 1, 8), "attention_mask": (1, 40)}) == 1  # decode step
    assert engine.select({"inputs_embeds": (2, 1, 8), "attention_mask": (2, 3000)}) == 1
    assert engine.select({"inputs_embeds": (1, 1, 8), "attention_mask": (1, 1)}) == 0  # a one-token prompt
    assert engine.select({"inputs_embeds": (1, 37, 8), "attention_mask": (1, 37)}) == 0  # prefill
    with pytest.raises(InputError, match=r"total_sequence=5000 .*1\.\.4096.*--max-seq-len"):
        engine.select({"inputs_embeds": (1, 1, 8), "attention_mask": (1, 5000)})


# -- the trt backend on a fake TensorRT (host memory, ONNX Runtime CPU as the engine) -------------------
def _conversations(image: Path) -> list:
    return [
        [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    ]


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "small.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("version", ["10.16.1.11", "10.3.0"])
def test_trt_backend_on_fake_tensorrt_gives_onnxruntime_tokens(exported_qwen2_5_vl, small_image, tmp_path, version):
    """build-engines + the trt backend against a TensorRT that runs the graphs it was given on ONNX Runtime: the
    same greedy tokens as ONNX Runtime CPU on a padded batch with an image, and the backend's device-side
    bookkeeping: decode steps on the decode profile, one shared activation block for every context, caches
    zeroed on the device and (10.15+) updated in place at a fixed capacity or (older) grown with the request and
    swapped instead of copied back, host inputs staged through pinned memory."""
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime import VLMPipeline
    from vlm_export.testing.fake_tensorrt import fake_tensorrt

    folder = tmp_path / "export"
    shutil.copytree(exported_qwen2_5_vl, folder)
    native = version.startswith("10.16")
    unit = 1 << 14
    with fake_tensorrt(version, memory_unit=unit) as device:
        manifest = build_engines(folder, progress=False, max_batch=2, max_seq_len=96, max_images=1)
        meta = manifest.engines["tensorrt"]["graphs"]
        assert ("TensorScatter" in meta["decoder"]["rewritten_ops"]) != native
        capacity = {p["name"]: p["shapes"]["past_key_values.0.key"] for p in meta["decoder"]["profiles"]}
        if native:  # KVCacheUpdate: the capacity is static, in the graph and in both profiles
            assert capacity["prefill"] == capacity["decode"] == {"min": [1, 2, 96, 16], "opt": [1, 2, 96, 16],
                                                                 "max": [2, 2, 96, 16]}  # fmt: skip
            assert json.loads((folder / "decoder.engine").read_text())["static"]["past_key_values.0.key"][2] == 96
        else:
            assert capacity["prefill"]["min"][2] == 1 and capacity["decode"]["max"][2] == 96

        trt_pipe = VLMPipeline.from_pretrained(folder, backend="trt")
        want = VLMPipeline.from_pretrained(folder, backend="ort-cpu").generate(
            _conversations(small_image), max_new_tokens=8, do_sample=False
        )
        trt_pipe.generate(_conversations(small_image), max_new_tokens=8, do_sample=False)  # first use
        for context in device.contexts:
            context.profiles_run.clear()
            context.memory_run.clear()
        device.copies.clear()
        device.memsets.clear()
        device.row_copies.clear()
        got = trt_pipe.generate(_conversations(small_image), max_new_tokens=8, do_sample=False)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]

        decoder = trt_pipe.generator.sessions["decoder"]
        runs = {index: context.profiles_run for index, context in decoder.contexts.items()}
        assert runs[0] == [0] and runs[1] == [1] * 7  # prefill on profile 0, the 7 decode steps on the decode one
        backend = trt_pipe.backend
        assert backend.scratch.nbytes == 2 * unit  # the largest profile's need, not the sum over contexts
        used = [c for c in device.contexts if c.profiles_run]
        assert len(used) == 4 and all(c.strategy == "USER_MANAGED" for c in used)  # vision, embedding, decoder x2
        assert {address for c in used for address in c.memory_run} == {backend.scratch.array.ptr}

        num_cache = 2 * int(manifest.text["num_layers"])
        assert not [c for c in device.copies if c[0] == "HostToDevice" and not c[2]]  # all from pinned memory
        assert not [c for c in device.copies if c[0] == "DeviceToDevice"]  # no cache copied back after a run
        if native:
            # zeroed on the device at the engine's capacity (2 rows, 2 heads, 96 slots, head_dim 16, float32)
            assert device.memsets.count(2 * 2 * 96 * 16 * 4) == num_cache and not device.row_copies
        else:
            # a cache of the prompt's length, grown once on the device for the decode steps
            assert len(device.row_copies) == num_cache and max(device.memsets) < 2 * 2 * 96 * 16 * 4
            cache = decoder.buffers["past_key_values.0.key"]
            assert len(cache) == 2  # the cache and its spare, swapped after each run


def test_fake_tensorrt_refuses_an_unaliased_cache(exported_qwen2_5_vl, tmp_path):
    """The fake enforces what TensorRT enforces (so the test above can fail): a KVCacheUpdate output bound
    elsewhere than its input is refused."""
    from vlm_export.exporter.engines import build_engines
    from vlm_export.runtime.backends.trt import BackendError, TrtBackend
    from vlm_export.testing.fake_tensorrt import fake_tensorrt

    folder = tmp_path / "export"
    shutil.copytree(exported_qwen2_5_vl, folder)
    with fake_tensorrt() as _:
        manifest = build_engines(folder, progress=False, max_batch=1, max_seq_len=16, max_images=1)
        backend = TrtBackend()
        decoder = backend.load(folder / "decoder.onnx", manifest.graphs["decoder"])
        decoder.aliases = {}  # as if the backend did not know the pairs
        feeds = _random_feeds(manifest.graphs["decoder"], {"batch": 1, "sequence": 2, "total_sequence": 2,
                                                            "cache_capacity": 16, "num_visual_tokens": 0})  # fmt: skip
        feeds["attention_mask"][:] = 1
        cache = {n: decoder.allocate(n, v.shape) for n, v in feeds.items() if n.startswith("past_key_values.")}
        feeds.update(cache)
        into = {n.replace("past_key_values.", "present."): v for n, v in cache.items()}
        with pytest.raises(BackendError, match="execution failed"):
            decoder.run(feeds, into=into)


def test_libcudart_is_found_in_pip_wheels_and_missing_is_one_line(tmp_path, monkeypatch):
    from vlm_export.runtime.backends import cuda_memory

    pytest.importorskip("polygraphy")
    import polygraphy.cuda.cuda as polygraphy_cuda

    wheel = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcudart.so.13").write_bytes(b"")
    with monkeypatch.context() as patch:
        patch.setattr(cuda_memory.sys, "path", [str(tmp_path / "nowhere"), str(tmp_path / "site")])
        patch.setenv("LD_LIBRARY_PATH", str(tmp_path / "empty"))
        dirs = cuda_memory.cudart_search_dirs()
    assert dirs[0] == tmp_path / "empty" and wheel in dirs
    assert cuda_memory.find_cudart([tmp_path / "empty", wheel]) == wheel / "libcudart.so.13"

    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(cuda_memory, "_loaded", False)
    monkeypatch.setattr(cuda_memory, "cudart_search_dirs", lambda: [tmp_path / "empty"])
    with pytest.raises(cuda_memory.CudaError) as error:
        cuda_memory.load_cuda_runtime()
    message = str(error.value)
    assert "\n" not in message and "libcudart.so was not found" in message and "nvidia-cuda-runtime" in message
    # a file that is no library: one line too, and LD_LIBRARY_PATH is left as it was
    monkeypatch.setattr(cuda_memory, "cudart_search_dirs", lambda: [wheel])
    monkeypatch.setattr(polygraphy_cuda, "G_CUDA", None)  # polygraphy's cached wrapper
    with pytest.raises(cuda_memory.CudaError, match=r"cannot load the CUDA runtime .*libcudart.so.13"):
        cuda_memory.load_cuda_runtime()
    assert cuda_memory.os.environ["LD_LIBRARY_PATH"] == str(tmp_path / "empty")


# -- backends without TensorRT / CUDA ------------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_trt_backend_says_how_to_install(exported_qwen2_5_vl, capsys):
    from vlm_export.runtime.cli import main

    assert main([str(exported_qwen2_5_vl), "--backend", "trt", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TensorRT, which is not installed" in err and "pip install" in err


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_build_engines_without_tensorrt_fails_before_work(exported_qwen2_5_vl, tmp_path, capsys):
    from vlm_export.exporter.cli import main

    assert main(["build-engines", str(exported_qwen2_5_vl)]) == 1
    assert "needs TensorRT" in capsys.readouterr().err
    # --engine trt refuses before exporting anything
    assert main(["--model", "unused", "--output", str(tmp_path / "o"), "--engine", "trt"]) == 1
    assert "needs TensorRT" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_build_engines_subcommand_never_imports_torch(exported_qwen2_5_vl):
    """`vlm-export build-engines` must run where only the runtime + TensorRT are installed (a Jetson)."""
    code = (
        "import sys\n"
        "from vlm_export.exporter.cli import main\n"
        f"rc = main(['build-engines', {str(exported_qwen2_5_vl)!r}, '--quiet'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_backends_import_lazily_without_gpu_libraries():
    code = (
        "import sys\n"
        "from vlm_export.runtime.backends import BACKENDS, create_backend\n"
        "import vlm_export.runtime.backends.trt, vlm_export.exporter.engines, vlm_export.exporter.engine_profiles\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'torch', 'transformers', 'cuda'))\n"
        "print(','.join(bad), BACKENDS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith(" ") and "'trt'" in out and "'ort-cuda'" in out


# -- op support ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[*FAMILIES, "qwen3_vl_moe"])
def any_export(request) -> Path:
    return request.getfixturevalue(f"exported_{request.param}")


def test_every_emitted_op_is_in_the_table(any_export):
    from vlm_export.exporter.trt_ops import DECOMPOSABLE, check_graph

    manifest = Manifest.load(any_export)
    for name, info in manifest.graphs.items():
        latest = check_graph(any_export / info.file, "10.15")
        jetpack = check_graph(any_export / info.file, "10.3")
        assert latest.opset == (24 if name == "decoder" else 23)
        assert not latest.restrictions and not jetpack.restrictions, latest.restrictions
        if manifest.family == "qwen3_vl_moe" and name == "decoder":
            # the default MoE form is ONNX Runtime's fused kernel: refused, with the export flag that avoids it
            assert "--moe-form dense" in latest.blocking["MoE"]
            continue
        assert not latest.unsupported, (name, latest.unsupported)
        assert set(jetpack.unsupported) <= set(DECOMPOSABLE), (name, jetpack.unsupported)


def test_decomposed_graphs_match_for_older_tensorrt(exported, tmp_path):
    """Attention / RMSNormalization / RotaryEmbedding rewritten from their ONNX function definitions: importable
    by TensorRT 10.3 per the table, and the same numbers on ONNX Runtime."""
    import onnxruntime as ort

    from vlm_export.exporter.trt_ops import DECOMPOSABLE, check_graph, decompose

    manifest = Manifest.load(exported)
    work = tmp_path / "graphs"
    shutil.copytree(exported, work)
    source = work / manifest.graphs["decoder"].file
    target = work / "decoder.trt.onnx"
    rewritten = decompose(source, target, list(DECOMPOSABLE))
    assert "Attention" in rewritten and "RMSNormalization" in rewritten and "TensorScatter" in rewritten
    report = check_graph(target, "10.3")
    assert not report.unsupported and not report.restrictions
    assert not {op for _, op in report.ops} & set(DECOMPOSABLE)

    rng = np.random.default_rng(0)
    # a cache larger than past + sequence, with values in the unused slots
    dims = {"batch": 2, "sequence": 3, "cache_capacity": 9, "total_sequence": 7, "num_visual_tokens": 2}
    feeds = {}
    for tensor in manifest.graphs["decoder"].inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.name == "attention_mask":
            value = np.ones(shape, np.int64)
            value[1, :2] = 0
        elif tensor.name == "position_ids":
            value = np.broadcast_to(np.arange(4, 7), shape).astype(np.int64)
        elif tensor.dtype == "bool":
            value = np.zeros(shape, bool)
            value[:, 1] = True
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        feeds[tensor.name] = value
    options = ort.SessionOptions()
    options.log_severity_level = 3
    want = ort.InferenceSession(str(source), options).run(None, feeds)
    got = ort.InferenceSession(str(target), options).run(None, feeds)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(want, got, strict=True))
    assert worst <= 2e-5, worst


def _random_feeds(info, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in info.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.name == "attention_mask":
            value = np.ones(shape, np.int64)
            value[-1, :2] = 0
        elif tensor.name == "position_ids":
            value = np.broadcast_to(np.arange(shape[-1]) + dims["total_sequence"] - shape[-1], shape).astype(np.int64)
        elif tensor.dtype == "bool":
            value = np.zeros(shape, bool)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        feeds[tensor.name] = value
    return feeds


def _without_trt_attributes(source: Path, target: Path) -> Path:
    """The TensorRT copy with its TensorRT-private attributes dropped, which ONNX Runtime refuses."""
    import onnx

    from vlm_export.exporter.trt_ops import TRT_DECOMPOSABLE

    model = onnx.load(str(source), load_external_data=False)
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != TRT_DECOMPOSABLE]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(model, str(target))
    return target


def test_tensorrt_copy_pins_the_cache_and_marks_attention(exported_qwen2_5_vl, tmp_path):
    """The decoder TensorRT builds from: cache capacity fixed (KVCacheUpdate needs a static s_max), batch still
    symbolic, every Attention node decomposable; otherwise the same graph (same numbers on ONNX Runtime)."""
    import onnx
    import onnxruntime as ort

    from vlm_export.exporter.trt_ops import TRT_DECOMPOSABLE, tensorrt_copy

    manifest = Manifest.load(exported_qwen2_5_vl)
    work = tmp_path / "export"
    shutil.copytree(exported_qwen2_5_vl, work)
    source, target = work / "decoder.onnx", work / "decoder.trt.onnx"
    report = tensorrt_copy(source, target, [], cache_capacity=16)
    assert report.changed and report.cache_capacity == 16 and not report.rewritten
    model = onnx.load(str(target), load_external_data=False)
    caches = [v for v in [*model.graph.input, *model.graph.output] if v.name.startswith(("past_", "present."))]
    assert len(caches) == 4 * int(manifest.text["num_layers"])
    for value in caches:
        dims = value.type.tensor_type.shape.dim
        assert dims[2].dim_value == 16 and not dims[2].dim_param and dims[0].dim_param == "batch", value.name
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == report.decomposable_attention == int(manifest.text["num_layers"])
    assert all({a.name: a.i for a in n.attribute}[TRT_DECOMPOSABLE] == 1 for n in attention)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = _without_trt_attributes(target, work / "decoder.plain.onnx")
    dims = {"batch": 2, "sequence": 3, "cache_capacity": 16, "total_sequence": 7, "num_visual_tokens": 0}
    feeds = _random_feeds(manifest.graphs["decoder"], dims)
    want = ort.InferenceSession(str(source), options).run(None, feeds)
    got = ort.InferenceSession(str(plain), options).run(None, feeds)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got, strict=True)) == 0.0
    dims["cache_capacity"] = 9  # the copy takes no other capacity
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        ort.InferenceSession(str(plain), options).run(None, _random_feeds(manifest.graphs["decoder"], dims))

    # a graph with nothing to change gets no copy
    embedding = tensorrt_copy(work / "embedding.onnx", work / "embedding.trt.onnx", [], cache_capacity=None)
    assert not embedding.changed and not (work / "embedding.trt.onnx").exists()
    # the rewritten decoder (TensorRT < 10.15) keeps a symbolic capacity and has no Attention node left
    rewritten = tensorrt_copy(source, target, ["Attention", "TensorScatter"], cache_capacity=None)
    assert rewritten.rewritten == ["Attention", "TensorScatter"] and rewritten.decomposable_attention == 0
    model = onnx.load(str(target), load_external_data=False)
    assert model.graph.input[-1].type.tensor_type.shape.dim[2].dim_param == "cache_capacity"


def test_heads_packed_attention_is_rewritten_below_10_15(exported_qwen2_5_vl):
    from vlm_export.exporter.trt_ops import check_graph

    vision = exported_qwen2_5_vl / "vision_encoder.onnx"
    assert "Attention" in check_graph(vision, "10.14").decomposable  # [segments, length, heads * head_dim]
    assert "Attention" not in check_graph(vision, "10.15").unsupported
    assert "Attention" not in check_graph(exported_qwen2_5_vl / "decoder.onnx", "10.14").unsupported  # 4-D


def test_check_ops_reports_without_tensorrt(exported_qwen2_5_vl, exported_qwen3_vl_moe, capsys):
    from vlm_export.exporter.cli import main

    assert main(["build-engines", str(exported_qwen2_5_vl), "--check-ops", "10.3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TensorRT 10.3 ONNX parser (documents opsets up to 20) vs")
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert lines["vision_encoder"].endswith("rewrites RMSNormalization, RotaryEmbedding, Attention")
    assert lines["embedding"].endswith("imports as is")
    assert lines["decoder"].endswith("rewrites RMSNormalization, RotaryEmbedding, TensorScatter, Attention")
    assert main(["build-engines", str(exported_qwen3_vl_moe), "--check-ops", "10.15"]) == 1
    assert "CANNOT import" in capsys.readouterr().out


def test_engine_metadata_round_trips_through_the_manifest(exported_qwen2_5_vl, tmp_path):
    """What build-engines writes to manifest.json survives save/load and is what the trt backend checks."""
    from vlm_export.exporter.engines import engine_entry, engine_metadata

    folder = tmp_path / "export"
    shutil.copytree(exported_qwen2_5_vl, folder)
    manifest = Manifest.load(folder)
    limits = _limits(manifest)
    profiles = engine_profiles(manifest, folder, limits)
    meta = engine_metadata("10.3.0.30", "8.7", "fp16", True, limits)
    for name, specs in profiles.items():
        meta["graphs"][name] = engine_entry(f"{name}.engine", f"{name}.onnx", ["Attention"], specs, 1.234)
    manifest.engines["tensorrt"] = meta
    manifest.limits = limits.to_limits()
    manifest.save(folder)

    loaded = Manifest.load(folder)
    saved = loaded.engines["tensorrt"]
    assert check_engines(folder, loaded, "10.3.0.26", "8.7") == saved
    assert saved["limits"] == {"max_batch": 2, "max_seq_len": 512, "max_image_pixels": 200704, "max_images": 3}
    assert loaded.limits.max_batch == 2 and loaded.limits.max_seq_len == 512
    decoder = saved["graphs"]["decoder"]
    assert [p["name"] for p in decoder["profiles"]] == ["prefill", "decode"]
    assert decoder["profiles"][1]["shapes"]["attention_mask"] == {"min": [1, 2], "opt": [1, 512], "max": [2, 512]}
    assert decoder["build_s"] == 1.23 and decoder["rewritten_ops"] == ["Attention"]
    with pytest.raises(BackendError, match=r"compute capability 8\.7"):
        check_engines(folder, loaded, "10.3.0.30", "9.0")


def test_cpu_fallbacks_reads_onnxruntime_profiles(exported_qwen2_5_vl, tmp_path):
    """The check tests/test_gpu.py runs on ONNX Runtime CUDA, read here from a real CPU profile: every float node
    of a CPU session is reported; int64 shape arithmetic on the CPU and CUDA nodes are not."""
    import onnxruntime as ort

    from vlm_export.runtime.backends.ort import cpu_fallbacks

    manifest = Manifest.load(exported_qwen2_5_vl)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "decoder")
    decoder = str(exported_qwen2_5_vl / "decoder.onnx")
    session = ort.InferenceSession(decoder, options, providers=["CPUExecutionProvider"])
    dims = {"batch": 1, "sequence": 2, "cache_capacity": 4, "total_sequence": 2, "num_visual_tokens": 0}
    session.run(None, _random_feeds(manifest.graphs["decoder"], dims))
    found = cpu_fallbacks(session.end_profiling())
    assert any("(Attention, CPUExecutionProvider)" in node for node in found)
    assert any("(TensorScatter, CPUExecutionProvider)" in node for node in found)

    profile = tmp_path / "synthetic.json"
    node = {"cat": "Node", "name": "n_kernel_time"}
    profile.write_text(json.dumps([
        {**node, "args": {"op_name": "MatMul", "provider": "CUDAExecutionProvider",
                          "input_type_shape": [{"float": [1, 2]}]}},
        {**node, "args": {"op_name": "Gather", "provider": "CPUExecutionProvider",
                          "input_type_shape": [{"int64": [3]}], "output_type_shape": [{"int64": [1]}]}},
        {"cat": "Session", "name": "model_run", "args": {}},
    ]))  # fmt: skip
    assert cpu_fallbacks(profile) == []
