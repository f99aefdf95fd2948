"""`vlm-serve`: an OpenAI-compatible HTTP server over `VLMPipeline` (the `serve` extra: FastAPI, uvicorn, pydantic).

Modules: `schemas` (request models, response shapes), `errors` (OpenAI's error body and status codes), `media`
(image/video URLs under the server's media rules), `engine` (one inference thread running a continuous batch),
`metrics` (Prometheus), `app` (routes), `cli` (`vlm-serve`), `ray_app` (the same app as a Ray Serve deployment).
The runtime never imports this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlm_export.serve import app

        return getattr(app, name)
    raise AttributeError(name)
