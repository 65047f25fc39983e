"""The Pointsman sidecar: Triton's gRPC API on 127.0.0.1, routed across a fleet.

start_sidecar(config, route_source=..., rng=...) -> SidecarServer   (sidecar.server)
SidecarConfig, load_config                                          (sidecar.config)
RouteCache, RouterWatch, RouteSource                                (sidecar.routes)
add_arguments(parser), run(args)                                    (sidecar.main)
peek_model(raw_request)                                             (sidecar.wire)
"""

from __future__ import annotations

from sidecar.config import SidecarConfig, load_config
from sidecar.main import add_arguments, run
from sidecar.routes import RouteCache, RouterWatch, RouteSource
from sidecar.server import SidecarServer, start_sidecar
from sidecar.wire import peek_model

__all__ = [
    "RouteCache",
    "RouteSource",
    "RouterWatch",
    "SidecarConfig",
    "SidecarServer",
    "add_arguments",
    "load_config",
    "peek_model",
    "run",
    "start_sidecar",
]
