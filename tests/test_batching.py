"""Continuous batching (`runtime/batching.py`): sequences that join a running batch at different steps, with
different prompts, media and settings, get exactly the tokens they get alone from `VLMPipeline.generate`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm_export.errors import InputError
from vlm_export.runtime.batching import ContinuousBatch


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("batching") / "a.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (70, 110, 3), dtype=np.uint8)).save(path)
    return path


def _text(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _with_image(image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": text}]}]


def _run(pipe, requests, joins_at, max_batch=4):
    """Drive a ContinuousBatch: request k is added before step `joins_at[k]`; returns tokens per request."""
    batch = ContinuousBatch(pipe.generator, max_batch=max_batch)
    tokens: dict[int, list[int]] = {}
    step = 0
    waiting = list(range(len(requests)))
    while waiting or len(batch):
        for k in [k for k in waiting if joins_at[k] <= step]:
            if len(batch) >= batch.max_batch:
                break
            waiting.remove(k)
            conversation, settings = requests[k]
            prompts, visual = pipe.prepare([conversation])
            first = batch.add(prompts[0], visual, pipe.settings(**settings), tag=k)
            tokens[k] = [first.token]
        for event in batch.step():
            tokens[event.sequence.tag].append(event.token)
        step += 1
    return tokens


def test_joining_sequences_get_their_solo_tokens(qwen2_5_vl_pipe, image):
    pipe = qwen2_5_vl_pipe
    requests = [
        (_text("Hello there"), {"max_new_tokens": 12, "do_sample": False}),
        (_with_image(image, "What is this?"), {"max_new_tokens": 9, "do_sample": False}),
        (_text("A much longer prompt than the others, to shift the columns"), {"max_new_tokens": 10}),
        (_text("Sampled"), {"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "top_k": 20, "seed": 7}),
        (_text("Penalised"), {"max_new_tokens": 7, "do_sample": False, "repetition_penalty": 1.3}),
        (_with_image(image, "Again?"), {"max_new_tokens": 6, "do_sample": False}),
    ]
    got = _run(pipe, requests, joins_at=[0, 0, 3, 4, 4, 9])
    for k, (conversation, settings) in enumerate(requests):
        want = pipe.generate(conversation, **settings).token_ids
        assert got[k] == want, f"request {k}"
    assert all(len(t) >= 6 for t in got.values())


def test_batch_full_and_prompt_limit_are_input_errors(qwen2_5_vl_pipe):
    pipe = qwen2_5_vl_pipe
    batch = ContinuousBatch(pipe.generator, max_batch=1)
    prompts, visual = pipe.prepare([_text("Hi")])
    batch.add(prompts[0], visual, pipe.settings(max_new_tokens=5, do_sample=False))
    with pytest.raises(InputError, match="batch is full"):
        batch.add(prompts[0], visual, pipe.settings(max_new_tokens=5, do_sample=False))
    limit = pipe.manifest.limits.max_seq_len
    with pytest.raises(InputError, match="exceeds this export's limit"):
        ContinuousBatch(pipe.generator, max_batch=1).add([1] * limit, visual, pipe.settings(max_new_tokens=5))


def test_cancelled_sequence_leaves_and_others_continue(qwen2_5_vl_pipe):
    pipe = qwen2_5_vl_pipe
    settings = pipe.settings(max_new_tokens=10, do_sample=False)
    batch = ContinuousBatch(pipe.generator, max_batch=2)
    a, b = (pipe.prepare([_text(t)]) for t in ("one", "two"))
    first_a = batch.add(a[0][0], a[1], settings, tag="a")
    first_b = batch.add(b[0][0], b[1], settings, tag="b")
    tokens = {"a": [first_a.token], "b": [first_b.token]}
    for event in batch.step():
        tokens[event.sequence.tag].append(event.token)
    first_a.sequence.finish("cancelled")
    while len(batch):
        events = batch.step()
        assert [e.sequence.tag for e in events] == ["b"]
        tokens["b"].append(events[0].token)
    assert tokens["b"] == pipe.generate(_text("two"), max_new_tokens=10, do_sample=False).token_ids
    assert first_a.sequence.finish_reason == "cancelled" and first_b.sequence.finish_reason == "length"


@pytest.mark.parametrize("export", ["exported_qwen3_vl", "exported_llava_onevision"])
def test_other_families_join_and_keep_their_tokens(request, export, image):
    """Qwen3-VL (DeepStack decoder inputs, rope deltas) and LLaVA-OneVision (no decode state) batch the same way."""
    from vlm_export.runtime import VLMPipeline

    pipe = VLMPipeline.from_pretrained(request.getfixturevalue(export))
    first = _with_image(image, "What is this?") if export == "exported_qwen3_vl" else _text("What is this?")
    requests = [
        (first, {"max_new_tokens": 6, "do_sample": False}),  # LLaVA's anyres image is slow here and adds nothing
        (_text("Hello there, a longer text prompt"), {"max_new_tokens": 6, "do_sample": False}),
        (_text("Hi"), {"max_new_tokens": 4, "do_sample": False}),
    ]
    got = _run(pipe, requests, joins_at=[0, 2, 3])
    for k, (conversation, settings) in enumerate(requests):
        assert got[k] == pipe.generate(conversation, **settings).token_ids, f"request {k}"
