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


def test_io_binding_keeps_the_cache_as_device_values(exported_qwen2_5_vl):
    """Outputs are OrtValues fed back unchanged; an empty (length 0) past binds like any other input."""
    from vlm_export.manifest import Manifest

    manifest = Manifest.load(exported_qwen2_5_vl)
    info = manifest.graphs["decoder"]
    session = create_backend("ort-cpu", io_binding=True).load(exported_qwen2_5_vl / info.file, info)
    text = manifest.text
    kv = (1, int(text["num_kv_heads"]), 0, int(text["head_dim"]))
    feeds = {
        "inputs_embeds": np.random.default_rng(0).standard_normal((1, 3, int(text["hidden_size"]))).astype(np.float32),
        "position_ids": np.broadcast_to(np.arange(3), (3, 1, 3)).astype(np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
    }
    past = [n for n in info.input_names() if n.startswith("past_key_values.")]
    feeds.update({name: np.zeros(kv, np.float32) for name in past})
    first = session.run(feeds)
    assert all(isinstance(v, ort.OrtValue) for v in first.values())
    step = dict(feeds, inputs_embeds=feeds["inputs_embeds"][:, :1], attention_mask=np.ones((1, 4), np.int64))
    step["position_ids"] = np.full((3, 1, 1), 3, np.int64)
    step.update({name: first[name.replace("past_key_values.", "present.")] for name in past})
    second = session.run(step)
    assert session.to_numpy(second["present.0.key"]).shape[2] == 4
    np.testing.assert_array_equal(
        session.to_numpy(second["present.0.key"])[:, :, :3], session.to_numpy(first["present.0.key"])
    )


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
