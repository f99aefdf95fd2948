"""`vlm-serve`: serve an exported folder over an OpenAI-compatible HTTP API (uvicorn, or Ray Serve with --ray)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from vlm_export.errors import VLMExportError

EPILOG = """\
examples:
  vlm-serve out/q3                                   # http://127.0.0.1:8000/v1, model name "q3"
  vlm-serve out/q3 --host 0.0.0.0 --port 8000 --api-key "$KEY" --served-model-name qwen3-vl
  vlm-serve out/q3 --max-batch 8 --max-queue 64 --media-dir /data/images --allow-remote-media
  vlm-serve out/q3 --ray --replicas 2                # a Ray Serve deployment (pip install 'vlm-export[ray]')

then, with the openai package:
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
  client.chat.completions.create(model="q3", messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
      {"type": "text", "text": "Describe it."}]}], stream=True)

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health (503 until the model is loaded:
the readiness probe), GET /metrics (Prometheus), GET /version.
Media: data: URLs always; file:// only under --media-dir; http(s) only with --allow-remote-media (capped by
--max-media-mb and --media-timeout). Requests that arrive together decode together, up to --max-batch; up to
--max-queue more wait, beyond that the server answers 503 with Retry-After. SIGTERM finishes in-flight requests,
refuses new ones and exits.
"""


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.runtime.backends import BACKEND_HELP, BACKENDS

    parser = argparse.ArgumentParser(
        prog="vlm-serve",
        description="Serve a model exported by vlm-export over an OpenAI-compatible HTTP API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="folder written by vlm-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help=f"inference backend: {BACKEND_HELP}")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLM_SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $VLM_SERVE_API_KEY, else no key)",
    )
    parser.add_argument("--served-model-name", help="model id clients send and /v1/models lists (default: folder name)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch before 503 (default 64)"
    )
    parser.add_argument("--media-dir", type=Path, help="serve file:// image/video URLs from this folder only")
    parser.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    parser.add_argument("--max-media-mb", type=float, default=32, help="cap per fetched media file (default 32 MB)")
    parser.add_argument("--media-timeout", type=float, default=20, help="time cap per fetched file (default 20 s)")
    parser.add_argument("--max-body-mb", type=float, default=64, help="cap on a request body (default 64 MB)")
    parser.add_argument(
        "--drain-timeout", type=float, default=300, help="on SIGTERM, wait this long for in-flight requests (300 s)"
    )
    parser.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (the 'ray' extra)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with the model (--ray)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_from_args(args: argparse.Namespace):
    from vlm_export.serve.app import ServeConfig
    from vlm_export.serve.media import MediaPolicy

    media_dir = args.media_dir.expanduser().resolve() if args.media_dir else None
    return ServeConfig(
        model=args.model.expanduser().resolve(),
        backend=args.backend,
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        media=MediaPolicy(
            media_dir=media_dir,
            allow_remote=args.allow_remote_media,
            max_bytes=int(args.max_media_mb * 1024 * 1024),
            timeout_s=args.media_timeout,
        ),
    )


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--replicas", args.replicas),
    ):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.media_dir is not None and not args.media_dir.expanduser().is_dir():
        parser.error(f"--media-dir {args.media_dir} is not a folder")


def serve(config, host: str, port: int, drain_timeout: float, log_level: str) -> int:
    """Run uvicorn until SIGINT/SIGTERM; 0 after a clean drain, 1 if the model failed to load."""
    import uvicorn

    from vlm_export.serve.app import create_app

    app = create_app(config)
    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            state.draining = True  # new requests on open connections get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout, access_log=False
        )
    )
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if state.load_error else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        print(f"vlm-serve: error: {error.name} is missing; pip install 'vlm-export[serve]'", file=sys.stderr)
        return 1
    try:
        from vlm_export.manifest import Manifest

        Manifest.load(args.model.expanduser())  # a wrong folder fails here, in one line, before anything starts
        config = config_from_args(args)
        if args.ray:
            from vlm_export.serve.ray_app import run_ray

            return run_ray(config, host=args.host, port=args.port, replicas=args.replicas)
        return serve(config, args.host, args.port, args.drain_timeout, args.log_level)
    except VLMExportError as error:
        print(f"vlm-serve: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
