"""Scale-out: the vlm-serve app as a Ray Serve deployment with two replicas on loopback, answering through Ray's
proxy with the same greedy text as the pipeline, from both replicas. Needs the `ray` extra (skipped without it)."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve deployment needs the 'ray' extra")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from vlm_export.serve.app import ServeConfig  # noqa: E402
from vlm_export.serve.ray_app import DEPLOYMENT_NAME, build_deployment  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_replicas_answer_through_rays_proxy(exported_qwen2_5_vl, qwen2_5_vl_pipe):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(model=exported_qwen2_5_vl, served_model_name="tiny", max_batch=2)
        serve.run(build_deployment(config, replicas=2), name=DEPLOYMENT_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
        messages = [{"role": "user", "content": "Hello there"}]
        want = qwen2_5_vl_pipe.generate(messages, max_new_tokens=6, do_sample=False).text
        body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0}

        def ask(_: int) -> tuple[str, str]:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            response.raise_for_status()
            return response.headers["x-replica"], response.json()["choices"][0]["message"]["content"]

        replicas: set[str] = set()
        deadline = time.monotonic() + 60
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            while len(replicas) < 2 and time.monotonic() < deadline:
                for replica, text in pool.map(ask, range(8)):
                    assert text == want
                    replicas.add(replica)
        assert len(replicas) == 2, f"only replica(s) {replicas} answered"
        status = serve.status().applications[DEPLOYMENT_NAME].deployments[DEPLOYMENT_NAME]
        assert status.replica_states.get("RUNNING") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
