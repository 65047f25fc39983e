"""The Pointsman sidecar: Triton's gRPC API on 127.0.0.1, routed across a fleet.

start_sidecar(config, route_source=..., rng=...) -> SidecarServer   (sidecar.server)
SidecarConfig, load_config                                          (sidecar.config)
RouteCache                                                          (sidecar.routes)
RouterWatch, RouteSource                                            (sidecar.router_watch)
add_arguments(parser), run(args)                                    (sidecar.main)
peek_model(raw_request)                                             (sidecar.wire)
MockTransport, MockContext: the request path without Triton         (sidecar.testing)

One ModelInfer: sidecar.head (read) -> sidecar.decide (where, what to set) ->
sidecar.pipeline (admission, idempotency) -> sidecar.attempts (the attempt loop) ->
sidecar.upstream.
"""

from __future__ import annotations

from sidecar.config import SidecarConfig, load_config
from sidecar.main import add_arguments, run
from sidecar.router_watch import RouterWatch, RouteSource
from sidecar.routes import RouteCache
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
