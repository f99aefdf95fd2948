"""The same FastAPI app as a Ray Serve deployment (the `ray` extra): Ray's proxy routes requests to N replicas,
each holding the model and its own engine; Ray's autoscaling and multi-node cluster do the scaling.

    vlm-serve out/q3 --ray --replicas 2 --port 8000

or from Python (e.g. in a Ray Serve config file's `import_path`, or with autoscaling options):

    from vlm_export.serve.app import ServeConfig
    from vlm_export.serve.ray_app import build_deployment
    app = build_deployment(ServeConfig(model=Path("out/q3")), replicas=2)
    serve.run(app, route_prefix="/")

A replica loads the model in its constructor (the app builder), so Ray marks it ready only once it can answer.
Every response carries `X-Replica` (the replica's id) so operators can tell which one answered.
"""

from __future__ import annotations

import logging
from typing import Any

from vlm_export.serve.app import ServeConfig

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "vlm-serve"


def build_deployment(config: ServeConfig, replicas: int = 1, ray_actor_options: dict[str, Any] | None = None):
    """A bound Ray Serve application serving `config`'s model on `replicas` replicas."""
    from ray import serve

    accelerated = config.backend in ("ort-cuda", "trt")
    options = ray_actor_options or {"num_cpus": 1, "num_gpus": 1 if accelerated else 0}

    def build_app():
        from fastapi import Request

        from vlm_export.runtime.pipeline import VLMPipeline
        from vlm_export.serve.app import create_app

        pipe = VLMPipeline.from_pretrained(config.model, backend=config.backend, **config.backend_options)
        app = create_app(config, pipe)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def tag(request: Request, call_next):
            response = await call_next(request)
            response.headers["X-Replica"] = replica
            return response

        return app

    @serve.deployment(name=DEPLOYMENT_NAME, num_replicas=replicas, ray_actor_options=options)
    @serve.ingress(build_app)
    class VLMServe:
        """One replica: the app built above, with its own pipeline and engine thread."""

    return VLMServe.bind()


def run_ray(config: ServeConfig, host: str, port: int, replicas: int) -> int:
    """Start a local Ray (or join RAY_ADDRESS), deploy, and block until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("vlm-serve: error: --ray needs Ray Serve; pip install 'vlm-export[ray]'")
        return 1
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    logger.info("deploying %d replica(s) of %s on http://%s:%d", replicas, config.model, host, port)
    try:
        serve.run(build_deployment(config, replicas), name=DEPLOYMENT_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
