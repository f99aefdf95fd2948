"""`vlm-serve` parts without a live server: 503 while loading, the bounded queue, media rules, CLI checks."""

from __future__ import annotations

import asyncio
import base64

import pytest

pytest.importorskip("fastapi", reason="vlm-serve needs the 'serve' extra")
httpx = pytest.importorskip("httpx")

from vlm_export.serve.app import ServeConfig, create_app  # noqa: E402
from vlm_export.serve.engine import Engine  # noqa: E402
from vlm_export.serve.errors import APIError  # noqa: E402
from vlm_export.serve.media import MediaFolder, MediaPolicy, fetch_remote, local_path, to_conversation  # noqa: E402
from vlm_export.serve.metrics import Metrics  # noqa: E402
from vlm_export.serve.schemas import ChatCompletionRequest  # noqa: E402


def test_health_and_chat_are_503_with_retry_after_until_loaded(tmp_path):
    app = create_app(ServeConfig(model=tmp_path))  # no lifespan here: the model never loads

    async def probe():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            health = await client.get("/health")
            chat = await client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user"}]})
            return health, chat

    health, chat = asyncio.run(probe())
    for response in (health, chat):
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "model_loading"


def test_full_queue_is_503(qwen2_5_vl_pipe):
    engine = Engine(qwen2_5_vl_pipe, max_batch=1, max_queue=2, metrics=Metrics())  # thread not started
    engine.submit(object())
    engine.submit(object())
    with pytest.raises(APIError) as caught:
        engine.submit(object())
    assert caught.value.status_code == 503 and caught.value.code == "queue_full"
    assert caught.value.headers["Retry-After"] == "1"


def test_file_urls_need_media_dir_and_stay_inside(tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    with pytest.raises(APIError, match="--media-dir"):
        local_path(f"file://{inside}/a.png", MediaPolicy(), "p")
    policy = MediaPolicy(media_dir=inside)
    assert local_path(f"file://{inside}/a.png", policy, "p") == str((inside / "a.png").resolve())
    for url in (f"file://{tmp_path}/outside.png", f"file://{inside}/../outside.png", "file://host/x.png"):
        with pytest.raises(APIError) as caught:
            local_path(url, policy, "p")
        assert caught.value.status_code == 400


def test_remote_media_is_refused_by_default():
    with pytest.raises(APIError, match="--allow-remote-media"):
        asyncio.run(fetch_remote("http://127.0.0.1:9/a.png", MediaPolicy(), "p"))


def test_video_options_and_data_urls_become_pipeline_parts():
    video = "data:video/mp4;base64," + base64.b64encode(b"not really a video").decode()
    request = ChatCompletionRequest(
        model="m",
        media_io_kwargs={"video": {"fps": 1.0}},
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video}},
                    {"type": "video_url", "video_url": {"url": video, "num_frames": 4}},
                    {"type": "text", "text": "Same?"},
                ],
            },
        ],
    )
    folder = MediaFolder()
    conversation = asyncio.run(to_conversation(request, MediaPolicy(), folder))
    system, user = conversation
    assert system == {"role": "system", "content": "Be brief."}
    first, second, text = user["content"]
    assert first["fps"] == 1.0 and "num_frames" not in first
    assert second["num_frames"] == 4 and "fps" not in second
    with open(first["path"], "rb") as handle:
        assert handle.read() == b"not really a video"
    folder.close()
    assert text == {"type": "text", "text": "Same?"}


def test_cli_refuses_a_bad_folder_in_one_line(tmp_path, capsys):
    from vlm_export.serve.cli import main

    assert main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm-serve: error:") and "\n" not in err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--max-batch", "0"])


def test_remote_fetch_has_a_time_cap():
    import http.server
    import threading
    import time

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            for _ in range(10):
                time.sleep(0.2)
                self.wfile.write(b"x")
                self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/slow"
        policy = MediaPolicy(allow_remote=True, timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(APIError, match=r"took longer than 0\.5 s"):
            asyncio.run(fetch_remote(url, policy, "p"))
        assert time.monotonic() - start < 1.5
        assert asyncio.run(fetch_remote(url, MediaPolicy(allow_remote=True, timeout_s=5), "p")) == b"x" * 10
    finally:
        httpd.shutdown()
        httpd.server_close()
