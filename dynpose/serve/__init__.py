"""DynPose as an HTTP service on Ray Serve (see docs/serving.md).

- `Client(url, timeout, retries)`: `.pose(image_bgr, boxes=None, route=None) -> list[Person]` (no Ray needed);
- `ServeConfig` / `check_config`, `Service.start(cfg, host, port, address)`: start the service from Python;
- `build_app(cfg)`: the Ray Serve application (`dynpose.serve.app`) for `serve.run` or a Serve config file.
"""

from typing import TYPE_CHECKING

from dynpose.serve.client import Client, PoseAnswer, ServiceError
from dynpose.serve.config import ServeConfig, check_config, parse_replicas

if TYPE_CHECKING:
    from dynpose.serve.service import Service

__all__ = ["Client", "PoseAnswer", "ServiceError", "ServeConfig", "Service", "check_config", "parse_replicas", "build_app"]


def __getattr__(name: str) -> object:  # lazy: importing the client must not import Ray
    if name == "Service":
        from dynpose.serve.service import Service

        return Service
    if name == "build_app":
        from dynpose.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'dynpose.serve' has no attribute {name!r}")
