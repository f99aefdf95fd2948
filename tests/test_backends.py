"""The backend interface on this machine: ONNX Runtime's IO-binding path (the one ort-cuda runs, here with the CPU
as the device) gives the same tokens as plain ONNX Runtime and keeps outputs as device values between calls."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from vlm_export.runtime.backends import BACKENDS, create_backend


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)).save(path)
    return path


def _conversation(image):
    return [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "What?"}]}]


def test_io_binding_matches_plain_session(exported_qwen2_5_vl, image):
    from vlm_export.runtime import VLMPipeline

    plain = VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu")
    bound = VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu", io_binding=True)
    batch = [_conversation(image), [{"role": "user", "content": "Hello there"}]]
    want = plain.generate(batch, max_new_tokens=8, do_sample=False)
    got = bound.generate(batch, max_new_tokens=8, do_sample=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(len(r.token_ids) > 1 for r in got)


@pytest.mark.parametrize("io_binding", [False, True])
def test_cache_is_updated_in_place(exported_qwen2_5_vl, io_binding):
    """`allocate`d cache buffers bound as `past` and (via `into`) `present`: each call writes only its new
    positions into the same memory, and prefill 3 + decode 1 gives the logits of a 4-token prefill."""
    from vlm_export.manifest import Manifest

    manifest = Manifest.load(exported_qwen2_5_vl)
    info = manifest.graphs["decoder"]
    session = create_backend("ort-cpu", io_binding=io_binding).load(exported_qwen2_5_vl / info.file, info)
    text = manifest.text
    past = [n for n in info.input_names() if n.startswith("past_key_values.")]
    into_names = [n.replace("past_key_values.", "present.") for n in past]
    shape = (1, int(text["num_kv_heads"]), 6, int(text["head_dim"]))
    embeds = np.random.default_rng(0).standard_normal((1, 4, int(text["hidden_size"]))).astype(np.float32)

    def call(cache, start, stop):
        feeds = {
            "inputs_embeds": embeds[:, start:stop],
            "position_ids": np.broadcast_to(np.arange(start, stop), (3, 1, stop - start)).astype(np.int64),
            "attention_mask": np.ones((1, stop), np.int64),
        }
        feeds.update(cache)
        return session.run(feeds, into=dict(zip(into_names, cache.values(), strict=True)))

    cache = {name: session.allocate(name, shape) for name in past}
    addresses = {name: value.data_ptr() for name, value in cache.items()}
    first = call(cache, 0, 3)
    key = session.to_numpy(cache[past[0]]).copy()
    assert np.abs(key[:, :, :3]).min() > 0 and not key[:, :, 3:].any()
    second = call(cache, 3, 4)
    assert all(
        isinstance(first[n], ort.OrtValue) and first[n].data_ptr() == addresses[p]
        for n, p in zip(into_names, past, strict=True)
    )
    after = session.to_numpy(second[into_names[0]])
    np.testing.assert_array_equal(after[:, :, :3], key[:, :, :3])
    assert np.abs(after[:, :, 3]).min() > 0 and not after[:, :, 4:].any()

    fresh = {name: session.allocate(name, shape) for name in past}
    whole = call(fresh, 0, 4)
    np.testing.assert_allclose(session.to_numpy(second["logits"]), session.to_numpy(whole["logits"]), atol=1e-5)
    np.testing.assert_allclose(session.to_numpy(fresh[past[0]]), after, atol=1e-5)


@pytest.mark.parametrize("decoder_form", ["in_place", "opset23"])
@pytest.mark.parametrize("io_binding", [False, True])
def test_cache_grows_by_doubling_with_the_same_tokens(
    exported_qwen2_5_vl, image, monkeypatch, io_binding, decoder_form
):
    """The prefill's cache holds just the prompt; the first decode step grows it to room for INITIAL_ROOM new
    tokens, which doubles when full: a batch whose cache grows four times gives the logits and tokens of one
    grown once to room for every new token. Also with the decoder form whose `present` comes back as new buffers
    (onnxruntime < 1.25): those are what grows."""
    from vlm_export.runtime import VLMPipeline
    from vlm_export.runtime.backends.ort import OrtCpuBackend
    from vlm_export.runtime.generation import CachedDecoding

    if decoder_form == "opset23":
        monkeypatch.setattr(OrtCpuBackend, "onnxruntime_version", "1.23.2")
    pipe = VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu", io_binding=io_binding)
    assert pipe.generator.in_place_cache is (decoder_form == "in_place")
    batch = [_conversation(image), [{"role": "user", "content": "Hello there"}]]
    settings = pipe.settings(max_new_tokens=20, do_sample=False, eos_token_ids=[])

    def run() -> tuple[list[np.ndarray], list[int]]:
        prompts, visual = pipe.prepare(batch)
        events = [e for e in pipe.generator.steps(prompts, visual, settings) if hasattr(e, "logits")]
        return [e.logits for e in events], capacities

    capacities: list[int] = []
    prefill_capacities: list[int] = []
    grow = CachedDecoding._make_room

    def spy(self, batch_size):
        if self.attention_mask.shape[1] == self.prompt_length + 1:  # the first decode step
            prefill_capacities.append(self.capacity)
        grow(self, batch_size)
        capacities.append(self.capacity)

    monkeypatch.setattr(CachedDecoding, "_make_room", spy)
    want, full = run()
    longest = full[0] - 20
    assert prefill_capacities == [longest]  # the prefill attended over the prompt only
    assert len(set(full)) == 1  # the default room: grown once, to prompt + 20
    capacities = []
    monkeypatch.setattr(CachedDecoding, "INITIAL_ROOM", 3)
    got, grown = run()
    longest = grown[0] - 3
    assert sorted(set(grown)) == [longest + 3, longest + 6, longest + 12, longest + 20]  # capped at prompt + 20
    assert len(got) == len(want) == 20
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"step {step}")
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_backend_names_and_unknown_backend():
    from vlm_export.errors import VLMExportError

    assert BACKENDS == ("ort-cpu", "ort-cuda", "trt")
    with pytest.raises(VLMExportError, match="unknown backend 'x'"):
        create_backend("x")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_ort_cuda_without_onnxruntime_gpu_says_what_to_install():
    from vlm_export.runtime.backends.ort import BackendError

    with pytest.raises(BackendError, match=r"needs onnxruntime-gpu.*pip uninstall -y onnxruntime"):
        create_backend("ort-cuda")


def test_vision_encoder_loads_on_first_visual_request(exported_qwen2_5_vl, image):
    """Decoder first (its pre-pack is the load-time peak), then embedding; the vision encoder only when a
    request has an image, so text-only use never holds it."""
    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu")
    assert pipe.sessions.loaded == ["decoder", "embedding"]
    assert "vision_encoder" in pipe.sessions and pipe.sessions.loaded == ["decoder", "embedding"]
    pipe.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=2)
    assert pipe.sessions.loaded == ["decoder", "embedding"]
    pipe.generate(_conversation(image), max_new_tokens=2)
    assert pipe.sessions.loaded == ["decoder", "embedding", "vision_encoder"]


def test_first_visual_request_reports_the_vision_encoder_load_apart(exported_qwen2_5_vl, image):
    """`vision_s` is the encoder's run; loading it on the first image request is `load_s` (TTFT includes it)."""
    import time

    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(exported_qwen2_5_vl, backend="ort-cpu")
    load = pipe.sessions._loaders["vision_encoder"]

    def slow_load():
        time.sleep(1.0)  # stands in for a large encoder's load, so the attribution cannot be a matter of noise
        return load()

    pipe.sessions._loaders["vision_encoder"] = slow_load
    text = pipe.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=2).timings
    first = pipe.generate(_conversation(image), max_new_tokens=2).timings
    second = pipe.generate(_conversation(image), max_new_tokens=2).timings
    assert text["load_s"] < 1.0 and second["load_s"] < 1.0
    assert first["load_s"] >= 1.0 and first["vision_s"] < 1.0 and first["ttft_s"] >= 1.0
