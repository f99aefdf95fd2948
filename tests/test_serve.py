"""`vlm-serve` live on loopback, driven by the official `openai` client: every request field, streaming, errors
with their status codes, greedy answers equal to `VLMPipeline.generate`, a bounded load test with disconnecting
clients, and SIGTERM draining (a real `vlm-serve` process)."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the live server tests use the openai client (the 'dev' extra)")
pytest.importorskip("fastapi", reason="vlm-serve needs the 'serve' extra")
uvicorn = pytest.importorskip("uvicorn", reason="vlm-serve needs the 'serve' extra")

from vlm_export.runtime.sampling import token_logprobs  # noqa: E402
from vlm_export.serve.app import ServeConfig, create_app  # noqa: E402
from vlm_export.serve.media import MediaPolicy  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny-vl"
BODY_CAP = 1024 * 1024


class LiveServer:
    """uvicorn serving an app in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.app.state.server.engine is not None):
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _png(seed: int, size=(60, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "a.png").write_bytes(_png(1))
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes(_png(2))
    os.symlink(tmp_path_factory.getbasetemp() / "secret.png", folder / "link.png")
    return folder


@pytest.fixture(scope="module")
def live(qwen2_5_vl_pipe, exported_qwen2_5_vl, media_dir):
    config = ServeConfig(
        model=exported_qwen2_5_vl,
        served_model_name=MODEL,
        api_key=API_KEY,
        max_batch=4,
        max_queue=64,
        max_body_bytes=BODY_CAP,
        media=MediaPolicy(media_dir=media_dir, allow_remote=True, max_bytes=200_000, timeout_s=3),
    )
    with LiveServer(create_app(config, qwen2_5_vl_pipe)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _pipeline_messages(messages):
    """The same conversation in VLMPipeline's format (data URLs as image bytes)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    parts.append({"type": "image", "image": base64.b64decode(url.split(",", 1)[1])})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


TEXT = [{"role": "user", "content": "Hello there"}]
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_png(3))}},
            {"type": "text", "text": "Describe it."},
        ],
    }
]
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_png(4, (40, 70)))}},
            {"type": "image_url", "image_url": {"url": _data_url(_png(5, (80, 50)))}},
            {"type": "text", "text": "Compare them."},
        ],
    },
    {"role": "assistant", "content": "They differ."},
    {"role": "user", "content": "How?"},
]


@pytest.mark.parametrize("messages", [TEXT, IMAGE, MULTI_TURN], ids=["text", "image", "multi-turn"])
def test_greedy_answer_is_the_pipelines(client, qwen2_5_vl_pipe, messages):
    want = qwen2_5_vl_pipe.generate(_pipeline_messages(messages), max_new_tokens=10, do_sample=False)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion" and got.model == MODEL
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want.prompt_tokens  # vision tokens included
    assert got.usage.completion_tokens == len(want.token_ids) == 10
    assert got.usage.total_tokens == want.prompt_tokens + 10


def test_stream_has_role_deltas_finish_usage_and_done(client, live):
    full = client.chat.completions.create(model=MODEL, messages=IMAGE, max_completion_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=IMAGE,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    # raw SSE: `data: [DONE]` closes the stream
    raw = httpx.post(
        f"{live.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": TEXT, "max_tokens": 3, "stream": True},
        timeout=30,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_stop_string_ends_the_answer_and_never_leaks(client):
    base = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=16, temperature=0)
    text = base.choices[0].message.content
    stop = text[6:9]
    cut = text[: text.index(stop)]
    got = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=16, temperature=0, stop=[stop, "@@@"])
    assert got.choices[0].message.content == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 16
    stream = client.chat.completions.create(
        model=MODEL, messages=TEXT, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == cut  # a stream cannot take text back: no prefix of the stop string was ever sent


def test_logprobs_are_the_models(client, qwen2_5_vl_pipe):
    got = client.chat.completions.create(
        model=MODEL, messages=TEXT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = got.choices[0].logprobs.content
    assert len(content) == 5
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == got.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy = the top one
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    prompts, visual = qwen2_5_vl_pipe.prepare([TEXT])
    first = next(iter(qwen2_5_vl_pipe.generator.steps(prompts, visual, qwen2_5_vl_pipe.settings(max_new_tokens=1))))
    chosen, _, _ = token_logprobs(first.logits, first.tokens)
    assert content[0].logprob == pytest.approx(float(chosen[0]), abs=1e-5)


def test_seeded_sampling_is_reproducible_and_the_pipelines(client, qwen2_5_vl_pipe):
    kwargs = {"temperature": 0.8, "top_p": 0.9, "seed": 11}
    first, second = (
        client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=8, extra_body={"top_k": 40}, **kwargs)
        for _ in range(2)
    )
    assert first.choices[0].message.content == second.choices[0].message.content
    want = qwen2_5_vl_pipe.generate(TEXT, max_new_tokens=8, do_sample=True, top_k=40, **kwargs)
    assert first.choices[0].message.content == want.text


def test_media_rules(client, live, media_dir):
    ok = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media_dir}/a.png"}}]}
        ],
        max_tokens=2,
    )
    assert ok.usage.prompt_tokens > 20

    def image_request(url):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
        )

    for url, message in [
        (f"file://{media_dir}/../secret.png", "'..' is not allowed"),
        (f"file://{media_dir}/link.png", "outside the server's --media-dir"),
        (f"file://{media_dir}/missing.png", "no file"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot"),
        ("ftp://example.com/a.png", "unsupported URL"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message) as caught:
            image_request(url)
        assert caught.value.body["param"].startswith("messages")

    with _http_server({"/a.png": _png(6), "/big.png": b"x" * 300_000}) as base:
        assert image_request(f"{base}/a.png").usage.prompt_tokens > 20
        with pytest.raises(openai.BadRequestError, match="larger than the server's cap"):
            image_request(f"{base}/big.png")
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            image_request(f"{base}/none.png")


def test_video_url_with_frame_options(client, tmp_path):
    from vlm_export.testing.videos import write_test_video

    video = write_test_video(tmp_path / "v.mp4", num_frames=8, width=56, height=42, fps=4)
    url = _data_url(video.read_bytes(), "video/mp4")

    def ask(**options):
        content = [{"type": "video_url", "video_url": {"url": url, **options}}, {"type": "text", "text": "What?"}]
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
        )

    assert ask(num_frames=4).usage.prompt_tokens < ask().usage.prompt_tokens  # 4 of 8 frames
    assert ask(fps=2).usage.prompt_tokens == ask(num_frames=4).usage.prompt_tokens


def test_errors_have_openais_shape_and_status(client, live):
    def create(**kwargs):
        return client.chat.completions.create(**{"model": MODEL, "messages": TEXT, "max_tokens": 2, **kwargs})

    refused = [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"stop": [""]}, None),
        ({"messages": []}, "messages"),
    ]
    for kwargs, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            create(**kwargs)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["type"] == "invalid_request_error", kwargs
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError) as caught:
        create(model="other")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    too_big = httpx.post(
        f"{live.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        content=b"{" + b" " * BODY_CAP + b"}",
        timeout=30,
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(
        f"{live.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        content=(b" " * 65536 for _ in range(BODY_CAP // 65536 + 2)),
        timeout=30,
    )
    assert chunked.status_code == 413
    auth = {"Authorization": f"Bearer {API_KEY}"}
    not_json = httpx.post(f"{live.url}/v1/chat/completions", headers=auth, content=b"{nope", timeout=30)
    assert not_json.status_code == 400 and "error" in not_json.json()
    missing = httpx.get(f"{live.url}/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_models_health_metrics_version(client, live):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == live.app.state.server.pipe.manifest.limits.max_seq_len
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{live.url}/version").json()
    metrics = httpx.get(f"{live.url}/metrics").text
    names = ["requests_total", "queue_depth", "time_to_first_token_seconds", "time_per_output_token_seconds"]
    for name in [*names, "generation_tokens_total", "prompt_tokens_total", "batch_size"]:
        assert f"vlm_serve_{name}" in metrics


def test_load_mixed_clients_some_disconnecting(live, qwen2_5_vl_pipe):
    """64 requests from 16 clients: text / image / streamed, every 5th client leaves mid-stream. Each request gets
    its answer (the greedy one it gets alone) or its error, nothing else; the departed ones stop decoding; the server
    stays healthy."""
    variants = [TEXT, IMAGE, [{"role": "user", "content": "Count to five"}]]
    expected = {
        k: qwen2_5_vl_pipe.generate(_pipeline_messages(v), max_new_tokens=6 + k, do_sample=False).text
        for k, v in enumerate(variants)
    }

    def one(i: int) -> str:
        k = i % len(variants)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        kwargs = {"model": MODEL, "messages": variants[k], "max_tokens": 6 + k, "temperature": 0}
        if i % 5 == 4:  # asks for a long answer and leaves after the first content chunk
            with client.chat.completions.create(stream=True, **{**kwargs, "max_tokens": 4000}) as stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        break
            return "left"
        if i % 2:
            text = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
            )
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        assert text == expected[k], (i, text, expected[k])
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(64)))
    assert outcomes.count("ok") == 52 and outcomes.count("left") == 12
    assert httpx.get(f"{live.url}/health").status_code == 200
    deadline = time.monotonic() + 3  # not cancelled, the 4000-token answers would run far longer
    while live.app.state.server.engine.batch.sequences and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live.app.state.server.engine.batch.sequences, "requests of departed clients are still decoding"
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'vlm_serve_requests_total{outcome="cancelled"} 12.0' in metrics  # each departed client's request, once


class _Files(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


class _http_server:
    def __init__(self, files: dict[str, bytes]):
        handler = type("Files", (_Files,), {"files": files})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_then_exits(exported_qwen2_5_vl):
    """A real `vlm-serve` process: /health is 503 or refused until loaded, then SIGTERM during a stream lets the
    stream finish, refuses new connections and exits."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm_export.serve.cli", str(exported_qwen2_5_vl), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and process.poll() is None, "vlm-serve did not become healthy"
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            assert status in (None, 503)
            time.sleep(0.1)
        body = {"model": exported_qwen2_5_vl.name, "messages": TEXT, "max_tokens": 400, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:
                    process.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                    try:  # the listening socket is closed; a request that still got in is refused with 503
                        late = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=5)
                        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
                    except httpx.TransportError:
                        pass
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
        assert finish["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once drained, so supervisors see the process ended by SIGTERM
        assert process.wait(30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode(errors="replace")
    assert "Traceback" not in output, output
