"""The sidecar's configuration: one frozen dataclass, validated once, loadable from YAML.

Every field can come from a YAML file (`load_config`), whose keys are the field names; the
command line overrides the file (see `sidecar.main`). Read by the one config reader
(pointsman/config/): a duplicate key or a bad value raises ConfigError naming the field.

    listen: 127.0.0.1:8001
    routers: [router-0.router:50051, router-1.router:50051]
    pick_mode: table                   # or per-request: ask the router for every request
    max_message_bytes: 67108864
    static_routes:                     # used for a model the router has no table for
      echo: [10.0.0.5:8001, 10.0.0.6:8001]
    fallback_instances: [10.0.0.5:8001]  # any model, until a router table has arrived
    cpus: [1]                          # pin the sidecar to CPU 1
    metrics_listen: 127.0.0.1:9101     # serve Prometheus metrics at /metrics
    tls: {cert_file: s.pem, key_file: s.key, ca_file: ca.pem, require_client_cert: true}
    router_tls: {ca_file: ca.pem}      # and triton_tls: TLS towards the router / Triton
    max_in_flight: 256                 # overload: sent on at once; more wait in a queue of
    max_queued: 1024                   #   this many; a full queue sheds the lowest class
    idempotency_ttl_s: 60              # replay finished outcomes of a request id this long
    idempotency:                       # coalesce and replay across every sidecar sharing Redis
      backend: redis                   #   (default: memory, each sidecar on its own)
      url: redis://redis:6379/0
"""

from __future__ import annotations

import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pointsman.config import (
    host_port,
    load_yaml_file,
    or_empty,
    read,
    relative_files,
    rule,
    validate,
)
from pointsman.errors import ConfigError
from pointsman.tls import TlsConfig, check_calling, check_listening, tls_from_mapping

__all__ = [
    "IDEMPOTENCY_BACKENDS",
    "PICK_MODES",
    "IdempotencyBackend",
    "IdempotencyConfig",
    "PickMode",
    "SidecarConfig",
    "config_from_mapping",
    "load_config",
    "sidecar_config_data",
]

PickMode = Literal["table", "per-request"]
PICK_MODES: tuple[PickMode, ...] = ("table", "per-request")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
IdempotencyBackend = Literal["memory", "redis"]
IDEMPOTENCY_BACKENDS: tuple[IdempotencyBackend, ...] = ("memory", "redis")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _default_client_id() -> str:
    return f"pointsman-sidecar@{socket.gethostname()}"


def _dialled(address: str) -> None:
    """An address the sidecar dials: host:port, and not port 0."""
    host_port(address)
    if address.endswith(":0"):
        raise ValueError("must be host:port with a port > 0")


def _redis_url(value: str) -> None:
    if not value.startswith(_REDIS_SCHEMES) or value in _REDIS_SCHEMES:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")


@dataclass(frozen=True)
class IdempotencyConfig:
    """Where requests with an id are coalesced and replayed (sidecar/README.md, Idempotency).

    memory: each sidecar on its own. redis: every sidecar whose `url` and `key_prefix` are the
    same shares one store, so a duplicate sent through another pod's sidecar runs once too.
    """

    backend: IdempotencyBackend = "memory"
    # redis://[[user]:password@]host:port/db, rediss:// for TLS, unix:///path?db=0.
    url: str = field(default="", metadata=rule(check=or_empty(_redis_url)))
    # Put before every key and channel, so fleets (or tests) can share one Redis.
    key_prefix: str = "pointsman:idempotency:"
    # An outcome (response bytes, or error status) larger than this is not kept in Redis:
    # duplicates after it run again (counted in idempotency_too_large_total).
    max_value_bytes: int = field(default=1024 * 1024, metadata=rule(above=0))
    # The running execution's lock lives this long unless its sidecar renews it (every third
    # of it): duplicates elsewhere wait at most this long after that sidecar died, then run.
    lease_s: float = field(default=10.0, metadata=rule(above=0))
    # A duplicate waiting on another sidecar's execution is told by pub/sub when it ends; it
    # also looks at least this often (a missed message, an expired lease).
    poll_interval_s: float = field(default=0.25, metadata=rule(above=0))
    # Connecting and each Redis operation: past it the store counts as down and requests run
    # without it, paying nothing more, until a probe every retry_interval_s finds it back.
    timeout_s: float = field(default=0.05, metadata=rule(above=0))
    retry_interval_s: float = field(default=1.0, metadata=rule(above=0))

    def __post_init__(self) -> None:
        validate(self)
        if self.backend == "redis" and not self.url:
            raise ConfigError("url: required with backend: redis")
        if self.backend != "redis" and self.url:
            raise ConfigError(f"url: only with backend: redis (backend is {self.backend})")


@dataclass(frozen=True)
class SidecarConfig:
    """Everything the sidecar needs; immutable once built."""

    # host:port the Triton-compatible API is served on (port 0 lets the kernel choose).
    listen: str = field(default="127.0.0.1:8001", metadata=rule(check=host_port))
    # host:port of each router replica, tried in order; empty runs on static_routes alone.
    routers: tuple[str, ...] = field(default=(), metadata=rule(check=_dialled))
    # "table": pick from the streamed route tables (no router round trip per request);
    # "per-request": ask the router's PickTarget for every request, tables as fallback.
    pick_mode: PickMode = "table"
    # Largest request or response, both on the listening port and towards Triton.
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata=rule(above=0))
    # model -> Triton gRPC addresses, for models the router has no table for.
    static_routes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=rule(check=_dialled)
    )
    # Triton gRPC addresses for ANY model while no router table has arrived (fail-static: a
    # sidecar that starts while every router is down still serves); unused once one has.
    fallback_instances: tuple[str, ...] = field(default=(), metadata=rule(check=_dialled))
    # Name the router logs this watcher under.
    client_id: str = field(default_factory=_default_client_id)
    # Models to watch; empty watches every model.
    watch_models: tuple[str, ...] = ()
    # Reconnect backoff towards the router: full jitter between 0 and a ceiling that doubles
    # from the initial value up to the maximum.
    reconnect_initial_s: float = field(default=0.2, metadata=rule(above=0))
    reconnect_max_s: float = field(default=5.0, metadata=rule(above=0))
    # A watch stream silent this long (no tables, no heartbeat) is treated as broken.
    router_idle_timeout_s: float = field(default=30.0, metadata=rule(above=0))
    # Deadline of one PickTarget call in per-request mode.
    pick_timeout_s: float = field(default=0.5, metadata=rule(above=0))
    # The cold path: a request for a model that is loaded nowhere asks the router for a load
    # and waits up to this long (bounded by the caller's deadline) instead of failing. 0: off.
    cold_start_wait_s: float = field(default=30.0, metadata=rule(minimum=0))
    # A Triton instance absent from every table this long gets its channel closed.
    upstream_idle_close_s: float = field(default=60.0, metadata=rule(above=0))
    # Deadline of each call of a fan-out (RepositoryIndex, ModelStatistics for all models).
    fanout_timeout_s: float = field(default=5.0, metadata=rule(above=0))
    # Failover: when an attempt fails before any response reached the caller (connection
    # refused or reset, UNAVAILABLE, NOT_FOUND from a model unloading there), try another
    # candidate not yet tried, within the caller's deadline. False: never retry.
    retry_unavailable: bool = True
    # Attempts per request at most, the first included (1: no retries).
    max_attempts: int = field(default=3, metadata=rule(minimum=1))
    # Retry budget: retries within `retry_budget_window_s` stay below
    # retry_budget_min + retry_budget_ratio * requests, so a failing fleet is not hammered.
    retry_budget_ratio: float = field(default=0.1, metadata=rule(minimum=0))
    retry_budget_min: int = field(default=10, metadata=rule(minimum=0))
    retry_budget_window_s: float = field(default=10.0, metadata=rule(above=0))
    # Passive outlier detection: this many connection-level failures in a row eject an
    # instance from picks for outlier_base_ejection_s * 2**(earlier ejections), at most
    # outlier_max_ejection_s; it returns when that ends and the router still lists it ready.
    outlier_consecutive_failures: int = field(default=3, metadata=rule(minimum=1))
    outlier_base_ejection_s: float = field(default=1.0, metadata=rule(above=0))
    outlier_max_ejection_s: float = field(default=30.0, metadata=rule(above=0))
    # Pass the caller's remaining deadline to Triton as the request's queue timeout
    # (parameters["timeout"], microseconds) unless the request sets one: Triton would
    # otherwise run queued requests whose caller has given up.
    deadline_queue_timeout: bool = True
    # Seconds in-flight requests get to finish on shutdown.
    shutdown_grace_s: float = field(default=5.0, metadata=rule(minimum=0))
    # TLS (pointsman/tls.py) of the listening port (cert_file + key_file; with ca_file and
    # require_client_cert: mutual TLS), of the channels to the routers, and of the channels
    # to Triton (ca_file verifies the server; cert_file + key_file present our identity).
    # Empty: plaintext.
    tls: TlsConfig = field(
        default_factory=lambda: TlsConfig(where="tls"), metadata=rule(parse=tls_from_mapping)
    )
    router_tls: TlsConfig = field(
        default_factory=lambda: TlsConfig(where="router_tls"),
        metadata=rule(parse=tls_from_mapping),
    )
    triton_tls: TlsConfig = field(
        default_factory=lambda: TlsConfig(where="triton_tls"),
        metadata=rule(parse=tls_from_mapping),
    )
    # CPUs to pin every thread of the sidecar to (Linux); empty leaves placement to the OS.
    # grpc.aio hands each request between several threads; on one CPU those hand-offs are
    # plain context switches instead of cross-CPU wake-ups, which on small VMs is worth
    # about a quarter of a millisecond per request and some throughput.
    cpus: tuple[int, ...] = field(default=(), metadata=rule(minimum=0))
    # host:port to serve Prometheus metrics on at /metrics (port 0 lets the kernel choose);
    # empty serves none (they are still kept, for tests to read from the registry).
    metrics_listen: str = field(default="", metadata=rule(check=or_empty(host_port)))
    # Overload: at most this many ModelInfer calls and streams sent on at once; more wait in
    # a queue of at most max_queued, best priority class first. A full queue sheds the lowest
    # sheddable class first with RESOURCE_EXHAUSTED and `retry-after-ms` (shed_retry_after_ms).
    max_in_flight: int = field(default=256, metadata=rule(minimum=1))
    max_queued: int = field(default=1024, metadata=rule(minimum=0))
    # Request bytes the queue may hold (a request that would pass it waits like one that
    # finds the queue full), so memory stays bounded for large tensors too.
    max_queued_bytes: int = field(default=256 * 1024 * 1024, metadata=rule(minimum=0))
    shed_retry_after_ms: int = field(default=200, metadata=rule(minimum=0))
    # Requests with an id (x-request-id, else the request's `id`): concurrent duplicates run
    # once, and finished outcomes are replayed for idempotency_ttl_s (0: no replay), within
    # idempotency_max_bytes of kept responses.
    idempotency_ttl_s: float = field(default=60.0, metadata=rule(minimum=0))
    idempotency_max_bytes: int = field(default=64 * 1024 * 1024, metadata=rule(minimum=0))
    # The store: memory (each sidecar its own, within idempotency_max_bytes) or redis (shared
    # by every sidecar; the TTL above applies). See IdempotencyConfig.
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)

    def __post_init__(self) -> None:
        """Holds a config built in code to the rules of one read from a file, then checks the
        rules across fields."""
        validate(self)
        if self.pick_mode == "per-request" and not self.routers:
            raise ConfigError("pick_mode: per-request needs routers")
        for model, addresses in self.static_routes.items():
            if not model or not addresses:
                raise ConfigError(
                    f"static_routes.{model}: needs a model name and at least one address"
                )
        if self.outlier_max_ejection_s < self.outlier_base_ejection_s:
            raise ConfigError(
                "outlier_base_ejection_s: must be <= "
                f"outlier_max_ejection_s ({self.outlier_max_ejection_s}), "
                f"got {self.outlier_base_ejection_s!r}"
            )
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError("reconnect_max_s: must be >= reconnect_initial_s")
        check_listening(self.tls)
        check_calling(self.router_tls)
        check_calling(self.triton_tls)

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0]


def config_from_mapping(data: Any) -> SidecarConfig:
    """A config from plain data (YAML, with flags laid over it); raises ConfigError naming the
    field."""
    return read(SidecarConfig, data, root="sidecar config")


def sidecar_config_data(path: str | Path) -> Any:
    """The plain data of the file at `path`, certificate paths taken relative to the file."""
    return relative_files(SidecarConfig, load_yaml_file(Path(path)), Path(path).parent)


def load_config(path: str | Path) -> SidecarConfig:
    """Reads a YAML file of SidecarConfig fields; raises ConfigError naming the bad field."""
    return config_from_mapping(sidecar_config_data(path))
