"""Discovery from Kubernetes EndpointSlices: list, then watch from the list's resourceVersion.

A background thread keeps every EndpointSlice that matches the label selector (the official
`kubernetes` client, which is synchronous): one list, then a watch that resumes from the
latest resourceVersion it saw. When the server says the version is too old (410 Gone, as an
HTTP status or as an ERROR event in the watch stream) the thread lists again; any other
failure is logged and retried after a pause, while `instances()` keeps answering from the last
good view, so an API server restart does not empty the fleet.

Which endpoints are instances (`instances_from_slices`, pure):

- only slices of the configured address type (a dual-stack Service has one slice per family);
- only endpoints that are ready: `conditions.ready` true or absent (the API says absent means
  ready), and not `terminating`. A terminating pod leaves the list at once, so the collector
  drops it and the next route tables leave it out (drained) while Triton finishes what it
  already has;
- the gRPC port is the slice port named `grpc_port_name`; metrics come from the port named
  `metrics_port_name` when the slice has one;
- the instance id is the pod name (`targetRef.name`), else the endpoint's hostname, else its
  address; the first endpoint with an id wins.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pointsman.errors import ConfigError
from router.config import InstanceConfig
from router.discovery_config import DiscoveryConfig

__all__ = ["KubernetesDiscovery", "api_client_for", "instances_from_slices"]

log = logging.getLogger(__name__)

_GONE = 410
# Pause before retrying after an error other than 410 (the API server restarting, RBAC).
_RETRY_PAUSE_S = 2.0


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _port_numbers(slice_obj: Mapping[str, Any]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for port in slice_obj.get("ports") or ():
        name, number = port.get("name") or "", port.get("port")
        if isinstance(number, int):
            ports[name] = number
    return ports


def _is_serving(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def _endpoint_id(endpoint: Mapping[str, Any], address: str) -> str:
    target = endpoint.get("targetRef") or {}
    return str(target.get("name") or endpoint.get("hostname") or address)


def instances_from_slices(
    slices: Iterable[Mapping[str, Any]], config: DiscoveryConfig
) -> tuple[InstanceConfig, ...]:
    """The serving instances in `slices` (EndpointSlice objects as the API's JSON), by id."""
    found: dict[str, InstanceConfig] = {}
    for slice_obj in slices:
        if slice_obj.get("addressType") != config.address_type:
            continue
        ports = _port_numbers(slice_obj)
        grpc_port = ports.get(config.grpc_port_name)
        if grpc_port is None:
            continue
        metrics_port = ports.get(config.metrics_port_name) if config.metrics_port_name else None
        for endpoint in slice_obj.get("endpoints") or ():
            addresses = endpoint.get("addresses") or ()
            if not addresses or not _is_serving(endpoint):
                continue
            address = str(addresses[0])  # the API guarantees one; more are interchangeable
            instance_id = _endpoint_id(endpoint, address)
            if instance_id in found:
                continue
            found[instance_id] = InstanceConfig(
                instance_id=instance_id,
                grpc_address=_host_port(address, grpc_port),
                metrics_url=(
                    f"http://{_host_port(address, metrics_port)}/metrics"
                    if metrics_port is not None
                    else ""
                ),
                memory_budget_bytes=config.memory_budget_bytes,
            )
    return tuple(found[key] for key in sorted(found))


def _slice_key(slice_obj: Mapping[str, Any]) -> str:
    meta = slice_obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def api_client_for(config: DiscoveryConfig) -> Any:
    """A client configured from the kubeconfig, the pod's service account, or `api_server`."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    if config.kubeconfig:
        kube_config.load_kube_config(config.kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    elif not config.api_server:
        try:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except kube_config.ConfigException:
            kube_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    if config.api_server:
        configuration.host = config.api_server
    return client.ApiClient(configuration)


class KubernetesDiscovery:
    """See the module docstring. `start()` begins watching; `stop()` ends the thread."""

    def __init__(self, config: DiscoveryConfig, api_client: Any = None) -> None:
        self._config = config
        self._api_client = api_client
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._instances: tuple[InstanceConfig, ...] = ()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        # Counted for tests and logs: how often the full list was fetched.
        self.lists = 0
        self.synced = threading.Event()

    def instances(self) -> Sequence[InstanceConfig]:
        return self._instances

    def start(self) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        if self._api_client is None:
            try:
                self._api_client = api_client_for(self._config)
            except (kube_config.ConfigException, OSError) as exc:
                raise ConfigError(
                    "discovery: no Kubernetes API credentials (in-cluster service account, "
                    f"discovery.kubeconfig or ~/.kube/config): {exc}"
                ) from exc
        self._api = client.DiscoveryV1Api(self._api_client)
        self._thread = threading.Thread(
            target=self._run, name="pointsman-endpointslices", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._follow(resource_version)
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("EndpointSlice watch expired (410 Gone): listing again")
                    resource_version = None
                    continue
                log.warning("EndpointSlice watch failed: %s %s", exc.status, exc.reason)
                resource_version = None
                self._stopping.wait(_RETRY_PAUSE_S)
            except Exception as exc:  # the API server restarting, a broken connection
                log.warning("EndpointSlice watch failed: %s", exc)
                resource_version = None
                self._stopping.wait(_RETRY_PAUSE_S)

    def _call(self, **kwargs: Any) -> Any:
        selector = self._config.label_selector
        if self._config.namespace:
            return self._api.list_namespaced_endpoint_slice(
                self._config.namespace, label_selector=selector, **kwargs
            )
        return self._api.list_endpoint_slice_for_all_namespaces(label_selector=selector, **kwargs)

    def _list(self) -> str:
        response = self._call(_preload_content=False, _request_timeout=30)
        body = json.loads(response.data)
        slices = {_slice_key(item): item for item in body.get("items") or ()}
        with self._lock:
            self._slices = slices
            self._publish()
        self.lists += 1
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _follow(self, resource_version: str) -> str:
        """Applies watch events until the server ends the watch; the version to resume from."""
        from kubernetes import watch

        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        timeout = self._config.watch_timeout_s
        for event in self._watch.stream(
            self._call,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=timeout + 30,
        ):
            if self._stopping.is_set():
                break
            if not isinstance(event, dict):
                continue  # a blank keep-alive line
            kind, obj = event.get("type"), event.get("raw_object") or {}
            # Raw events (no model types): the Watch does not track versions for us.
            resource_version = str(
                (obj.get("metadata") or {}).get("resourceVersion") or resource_version
            )
            with self._lock:
                if kind in ("ADDED", "MODIFIED"):
                    self._slices[_slice_key(obj)] = obj
                elif kind == "DELETED":
                    self._slices.pop(_slice_key(obj), None)
                else:  # BOOKMARK: only a resourceVersion, which the Watch keeps
                    continue
                self._publish()
        return resource_version

    def _publish(self) -> None:
        instances = instances_from_slices(self._slices.values(), self._config)
        if instances != self._instances:
            log.info(
                "EndpointSlices: %d instance(s): %s",
                len(instances),
                ", ".join(i.instance_id for i in instances) or "none",
            )
        self._instances = instances
