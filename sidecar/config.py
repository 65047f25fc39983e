"""The sidecar's configuration: one frozen dataclass, validated once, loadable from YAML.

Every field can come from a YAML file (`load_config`), whose keys are the field names; the
command line overrides the file (see `sidecar.main`). A bad value raises ConfigError naming
the field.

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
"""

from __future__ import annotations

import dataclasses
import math
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pointsman.errors import ConfigError
from pointsman.tls import (
    TlsConfig,
    check_calling,
    check_listening,
    resolved_against,
    tls_from_mapping,
)

__all__ = ["PICK_MODES", "PickMode", "SidecarConfig", "config_from_mapping", "load_config"]

PickMode = Literal["table", "per-request"]
PICK_MODES: tuple[PickMode, ...] = ("table", "per-request")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _default_client_id() -> str:
    return f"pointsman-sidecar@{socket.gethostname()}"


@dataclass(frozen=True)
class SidecarConfig:
    """Everything the sidecar needs; immutable once built."""

    # host:port the Triton-compatible API is served on (port 0 lets the kernel choose).
    listen: str = "127.0.0.1:8001"
    # host:port of each router replica, tried in order; empty runs on static_routes alone.
    routers: tuple[str, ...] = ()
    # "table": pick from the streamed route tables (no router round trip per request);
    # "per-request": ask the router's PickTarget for every request, tables as fallback.
    pick_mode: PickMode = "table"
    # Largest request or response, both on the listening port and towards Triton.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # model -> Triton gRPC addresses, for models the router has no table for.
    static_routes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    # Triton gRPC addresses for ANY model while no router table has arrived (fail-static: a
    # sidecar that starts while every router is down still serves); unused once one has.
    fallback_instances: tuple[str, ...] = ()
    # Name the router logs this watcher under.
    client_id: str = field(default_factory=_default_client_id)
    # Models to watch; empty watches every model.
    watch_models: tuple[str, ...] = ()
    # Reconnect backoff towards the router: full jitter between 0 and a ceiling that doubles
    # from the initial value up to the maximum.
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 5.0
    # A watch stream silent this long (no tables, no heartbeat) is treated as broken.
    router_idle_timeout_s: float = 30.0
    # Deadline of one PickTarget call in per-request mode.
    pick_timeout_s: float = 0.5
    # The cold path: a request for a model that is loaded nowhere asks the router for a load
    # and waits up to this long (bounded by the caller's deadline) instead of failing. 0: off.
    cold_start_wait_s: float = 30.0
    # A Triton instance absent from every table this long gets its channel closed.
    upstream_idle_close_s: float = 60.0
    # Deadline of each call of a fan-out (RepositoryIndex, ModelStatistics for all models).
    fanout_timeout_s: float = 5.0
    # Failover: when an attempt fails before any response reached the caller (connection
    # refused or reset, UNAVAILABLE, NOT_FOUND from a model unloading there), try another
    # candidate not yet tried, within the caller's deadline. False: never retry.
    retry_unavailable: bool = True
    # Attempts per request at most, the first included (1: no retries).
    max_attempts: int = 3
    # Retry budget: retries within `retry_budget_window_s` stay below
    # retry_budget_min + retry_budget_ratio * requests, so a failing fleet is not hammered.
    retry_budget_ratio: float = 0.1
    retry_budget_min: int = 10
    retry_budget_window_s: float = 10.0
    # Passive outlier detection: this many connection-level failures in a row eject an
    # instance from picks for outlier_base_ejection_s * 2**(earlier ejections), at most
    # outlier_max_ejection_s; it returns when that ends and the router still lists it ready.
    outlier_consecutive_failures: int = 3
    outlier_base_ejection_s: float = 1.0
    outlier_max_ejection_s: float = 30.0
    # Pass the caller's remaining deadline to Triton as the request's queue timeout
    # (parameters["timeout"], microseconds) unless the request sets one: Triton would
    # otherwise run queued requests whose caller has given up.
    deadline_queue_timeout: bool = True
    # Seconds in-flight requests get to finish on shutdown.
    shutdown_grace_s: float = 5.0
    # TLS (pointsman/tls.py) of the listening port (cert_file + key_file; with ca_file and
    # require_client_cert: mutual TLS), of the channels to the routers, and of the channels
    # to Triton (ca_file verifies the server; cert_file + key_file present our identity).
    # Empty: plaintext.
    tls: TlsConfig = field(default_factory=lambda: TlsConfig(where="tls"))
    router_tls: TlsConfig = field(default_factory=lambda: TlsConfig(where="router_tls"))
    triton_tls: TlsConfig = field(default_factory=lambda: TlsConfig(where="triton_tls"))
    # CPUs to pin every thread of the sidecar to (Linux); empty leaves placement to the OS.
    # grpc.aio hands each request between several threads; on one CPU those hand-offs are
    # plain context switches instead of cross-CPU wake-ups, which on small VMs is worth
    # about a quarter of a millisecond per request and some throughput.
    cpus: tuple[int, ...] = ()
    # host:port to serve Prometheus metrics on at /metrics (port 0 lets the kernel choose);
    # empty serves none (they are still kept, for tests to read from the registry).
    metrics_listen: str = ""
    # Overload: at most this many ModelInfer calls and streams sent on at once; more wait in
    # a queue of at most max_queued, best priority class first. A full queue sheds the lowest
    # sheddable class first with RESOURCE_EXHAUSTED and `retry-after-ms` (shed_retry_after_ms).
    max_in_flight: int = 256
    max_queued: int = 1024
    # Request bytes the queue may hold (a request that would pass it waits like one that
    # finds the queue full), so memory stays bounded for large tensors too.
    max_queued_bytes: int = 256 * 1024 * 1024
    shed_retry_after_ms: int = 200
    # Requests with an id (x-request-id, else the request's `id`): concurrent duplicates run
    # once, and finished outcomes are replayed for idempotency_ttl_s (0: no replay), within
    # idempotency_max_bytes of kept responses.
    idempotency_ttl_s: float = 60.0
    idempotency_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_address("listen", self.listen, allow_port_zero=True)
        if self.metrics_listen != "":
            _check_address("metrics_listen", self.metrics_listen, allow_port_zero=True)
        for address in self.routers:
            _check_address("routers", address)
        if self.pick_mode not in PICK_MODES:
            raise ConfigError(
                f"sidecar config field 'pick_mode': expected one of {list(PICK_MODES)}, "
                f"got {self.pick_mode!r}"
            )
        if self.pick_mode == "per-request" and not self.routers:
            raise ConfigError("sidecar config field 'pick_mode': per-request needs 'routers'")
        if (
            isinstance(self.max_message_bytes, bool)
            or not isinstance(self.max_message_bytes, int)
            or self.max_message_bytes <= 0
        ):
            raise ConfigError(
                "sidecar config field 'max_message_bytes': expected a positive integer, "
                f"got {self.max_message_bytes!r}"
            )
        for model, addresses in self.static_routes.items():
            if not model or not addresses:
                raise ConfigError(
                    f"sidecar config field 'static_routes': model {model!r} needs a name "
                    "and at least one address"
                )
            for address in addresses:
                _check_address(f"static_routes.{model}", address)
        for address in self.fallback_instances:
            _check_address("fallback_instances", address)
        # A read-only view, so the frozen config cannot change behind the sidecar's back.
        object.__setattr__(
            self,
            "static_routes",
            types.MappingProxyType({k: tuple(v) for k, v in self.static_routes.items()}),
        )
        if not _is_number(self.cold_start_wait_s) or self.cold_start_wait_s < 0:
            raise ConfigError(
                "sidecar config field 'cold_start_wait_s': expected a number >= 0, "
                f"got {self.cold_start_wait_s!r}"
            )
        for name in (
            "reconnect_initial_s",
            "reconnect_max_s",
            "router_idle_timeout_s",
            "pick_timeout_s",
            "upstream_idle_close_s",
            "fanout_timeout_s",
        ):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(
                    f"sidecar config field {name!r}: expected a positive number, got {value!r}"
                )
        for name in ("max_attempts", "outlier_consecutive_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"sidecar config field {name!r}: expected an integer >= 1, got {value!r}"
                )
        if (
            isinstance(self.retry_budget_min, bool)
            or not isinstance(self.retry_budget_min, int)
            or self.retry_budget_min < 0
        ):
            raise ConfigError(
                "sidecar config field 'retry_budget_min': expected an integer >= 0, "
                f"got {self.retry_budget_min!r}"
            )
        if not _is_number(self.retry_budget_ratio) or self.retry_budget_ratio < 0:
            raise ConfigError(
                "sidecar config field 'retry_budget_ratio': expected a number >= 0, "
                f"got {self.retry_budget_ratio!r}"
            )
        for name in ("retry_budget_window_s", "outlier_base_ejection_s", "outlier_max_ejection_s"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(
                    f"sidecar config field {name!r}: expected a positive number, got {value!r}"
                )
        if self.outlier_max_ejection_s < self.outlier_base_ejection_s:
            raise ConfigError(
                "sidecar config field 'outlier_base_ejection_s': must be <= "
                f"outlier_max_ejection_s ({self.outlier_max_ejection_s}), "
                f"got {self.outlier_base_ejection_s!r}"
            )
        check_listening(self.tls)
        check_calling(self.router_tls)
        check_calling(self.triton_tls)
        if not _is_number(self.shutdown_grace_s) or self.shutdown_grace_s < 0:
            raise ConfigError(
                "sidecar config field 'shutdown_grace_s': expected a number >= 0, "
                f"got {self.shutdown_grace_s!r}"
            )
        for name, minimum in (
            ("max_in_flight", 1),
            ("max_queued", 0),
            ("max_queued_bytes", 0),
            ("shed_retry_after_ms", 0),
            ("idempotency_max_bytes", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(
                    f"sidecar config field {name!r}: expected an integer >= {minimum}, "
                    f"got {value!r}"
                )
        if not _is_number(self.idempotency_ttl_s) or self.idempotency_ttl_s < 0:
            raise ConfigError(
                "sidecar config field 'idempotency_ttl_s': expected a number >= 0, "
                f"got {self.idempotency_ttl_s!r}"
            )
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.cpus):
            raise ConfigError(
                f"sidecar config field 'cpus': expected CPU numbers >= 0, got {self.cpus!r}"
            )
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError(
                "sidecar config field 'reconnect_max_s': must be >= reconnect_initial_s"
            )

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_address(field_name: str, address: object, *, allow_port_zero: bool = False) -> None:
    ok = isinstance(address, str) and ":" in address
    if ok:
        host, _, port = cast(str, address).rpartition(":")
        ok = bool(host) and port.isdigit() and (allow_port_zero or int(port) > 0)
        ok = ok and int(port) < 65536
    if not ok:
        raise ConfigError(
            f"sidecar config field {field_name!r}: expected host:port, got {address!r}"
        )


_TLS_FIELDS = {"tls", "router_tls", "triton_tls"}
_TUPLE_FIELDS = {"routers", "watch_models", "fallback_instances"}


def config_from_mapping(
    data: Mapping[str, Any], base: SidecarConfig | None = None
) -> SidecarConfig:
    """A config from a mapping of field names (e.g. parsed YAML) over `base` or the defaults."""
    known = {f.name for f in dataclasses.fields(SidecarConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"sidecar config field {key!r}: unknown field")
        if key == "cpus":
            if isinstance(value, int):
                value = [value]
            if not isinstance(value, list | tuple):
                raise ConfigError(f"sidecar config field 'cpus': expected a list, got {value!r}")
            value = tuple(value)
        elif key in _TUPLE_FIELDS:
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"sidecar config field {key!r}: expected a list of strings, got {value!r}"
                )
            value = tuple(value)
        elif key == "static_routes":
            value = _static_routes(value)
        elif key in _TLS_FIELDS:
            value = tls_from_mapping(value, f"sidecar config field {key}")
        elif key in ("listen", "client_id", "pick_mode", "metrics_listen") and not isinstance(
            value, str
        ):
            raise ConfigError(f"sidecar config field {key!r}: expected a string, got {value!r}")
        elif key in ("retry_unavailable", "deadline_queue_timeout") and not isinstance(value, bool):
            raise ConfigError(f"sidecar config field {key!r}: expected true or false")
        values[key] = value
    try:
        return dataclasses.replace(base or SidecarConfig(), **values)
    except TypeError as error:  # pragma: no cover - every field is checked above
        raise ConfigError(f"sidecar config: {error}") from None


def _static_routes(value: object) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            "sidecar config field 'static_routes': expected a mapping of model to addresses"
        )
    routes: dict[str, tuple[str, ...]] = {}
    for model, addresses in value.items():
        if isinstance(addresses, str):
            addresses = [addresses]
        if not isinstance(model, str) or not isinstance(addresses, list | tuple):
            raise ConfigError(
                f"sidecar config field 'static_routes.{model}': expected a list of host:port"
            )
        routes[model] = tuple(addresses)
    return routes


def load_config(path: str | Path, base: SidecarConfig | None = None) -> SidecarConfig:
    """Reads a YAML file of SidecarConfig fields; raises ConfigError naming the bad field."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"sidecar config file {str(path)!r}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"sidecar config file {str(path)!r}: not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"sidecar config file {str(path)!r}: expected a mapping at top level")
    config = config_from_mapping(data, base)
    # Certificate paths written in the file are relative to the file.
    folder = Path(path).parent
    resolved: dict[str, Any] = {
        name: resolved_against(getattr(config, name), folder) for name in _TLS_FIELDS & set(data)
    }
    return dataclasses.replace(config, **resolved) if resolved else config
