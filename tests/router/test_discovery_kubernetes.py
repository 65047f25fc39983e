"""Kubernetes discovery: the pure EndpointSlice reading (a table), then the real `kubernetes`
client against a minimal in-test API server that speaks the EndpointSlice list and watch
protocol (resource versions, chunked JSON events, ERROR 410 Gone), then `pointsman router`
itself discovering two real Tritons of the session fleet through it.

No cluster is available here: the API server is ours, shaped after the Kubernetes API docs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import httpx
import pytest
import yaml

from app.fleet import Fleet
from app.processes import free_port
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from router.config import InstanceConfig
from router.discovery_config import DiscoveryConfig, DiscoveryKind
from router.discovery_kubernetes import KubernetesDiscovery, instances_from_slices

NAMESPACE = "pointsman"
SELECTOR = "app.kubernetes.io/name=triton"
PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def endpoint(
    pod: str, address: str, *, ready: bool | None = True, terminating: bool = False
) -> dict[str, Any]:
    conditions: dict[str, Any] = {"serving": ready is not False, "terminating": terminating}
    if ready is not None:
        conditions["ready"] = ready
    return {
        "addresses": [address],
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod},
    }


def endpoint_slice(
    name: str,
    endpoints: list[dict[str, Any]],
    *,
    grpc_port: int = 8001,
    metrics_port: int | None = 8002,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    ports = [{"name": "grpc", "port": grpc_port, "protocol": "TCP"}]
    if metrics_port is not None:
        ports.append({"name": "metrics", "port": metrics_port, "protocol": "TCP"})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": "triton"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


CONFIG = DiscoveryConfig(kind=DiscoveryKind.KUBERNETES, namespace=NAMESPACE)

# --- the pure reading -------------------------------------------------------------------------

READING_CASES: list[tuple[str, list[dict[str, Any]], list[tuple[str, str, str]]]] = [
    ("empty", [], []),
    (
        "ready endpoints, sorted by pod name",
        [endpoint_slice("s", [endpoint("b", "10.0.0.2"), endpoint("a", "10.0.0.1")])],
        [
            ("a", "10.0.0.1:8001", "http://10.0.0.1:8002/metrics"),
            ("b", "10.0.0.2:8001", "http://10.0.0.2:8002/metrics"),
        ],
    ),
    (
        "ready absent counts as ready",
        [endpoint_slice("s", [endpoint("a", "10.0.0.1", ready=None)])],
        [("a", "10.0.0.1:8001", "http://10.0.0.1:8002/metrics")],
    ),
    (
        "not ready and terminating endpoints are left out",
        [
            endpoint_slice(
                "s",
                [
                    endpoint("a", "10.0.0.1", ready=False),
                    endpoint("b", "10.0.0.2", ready=False, terminating=True),
                    endpoint("c", "10.0.0.3", ready=True, terminating=True),
                    endpoint("d", "10.0.0.4"),
                ],
            )
        ],
        [("d", "10.0.0.4:8001", "http://10.0.0.4:8002/metrics")],
    ),
    (
        "no metrics port: no scraping",
        [endpoint_slice("s", [endpoint("a", "10.0.0.1")], metrics_port=None)],
        [("a", "10.0.0.1:8001", "")],
    ),
    (
        "a slice without the grpc port is ignored",
        [
            {
                **endpoint_slice("s", [endpoint("a", "10.0.0.1")]),
                "ports": [{"name": "http", "port": 1}],
            }
        ],
        [],
    ),
    (
        "other address family ignored; a pod in two slices counts once",
        [
            endpoint_slice("v6", [endpoint("a", "fd00::1")], address_type="IPv6"),
            endpoint_slice("s1", [endpoint("a", "10.0.0.1")]),
            endpoint_slice("s2", [endpoint("a", "10.0.0.9")]),
        ],
        [("a", "10.0.0.1:8001", "http://10.0.0.1:8002/metrics")],
    ),
    (
        "no targetRef: the address is the id",
        [endpoint_slice("s", [{"addresses": ["10.0.0.7"], "conditions": {"ready": True}}])],
        [("10.0.0.7", "10.0.0.7:8001", "http://10.0.0.7:8002/metrics")],
    ),
]


@pytest.mark.parametrize(
    ("slices", "expected"), [c[1:] for c in READING_CASES], ids=[c[0] for c in READING_CASES]
)
def test_instances_from_slices(
    slices: list[dict[str, Any]], expected: list[tuple[str, str, str]]
) -> None:
    found = instances_from_slices(slices, CONFIG)
    assert [(i.instance_id, i.grpc_address, i.metrics_url) for i in found] == expected


def test_ipv6_addresses_are_bracketed() -> None:
    config = DiscoveryConfig(kind=DiscoveryKind.KUBERNETES, address_type="IPv6")
    slices = [endpoint_slice("v6", [endpoint("a", "fd00::1")], address_type="IPv6")]
    (found,) = instances_from_slices(slices, config)
    assert found.grpc_address == "[fd00::1]:8001"
    assert found.metrics_url == "http://[fd00::1]:8002/metrics"


# --- a minimal EndpointSlice API server --------------------------------------------------------


class FakeEndpointSliceApi:
    """Lists and watches EndpointSlices of one namespace like the API server does: every change
    gets the next resourceVersion; a watch from a version older than the kept history (after
    `put_and_compact()`) gets an ERROR event with code 410; a watch ends after `watch_hold_s`."""

    def __init__(self, watch_hold_s: float = 0.5) -> None:
        self.slices: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.oldest_kept = 100
        self.requests: list[dict[str, list[str]]] = []
        self.watch_hold_s = watch_hold_s
        self.cond = threading.Condition(threading.RLock())
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeEndpointSliceApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # changes, as a controller would make them
    def put(self, slice_obj: dict[str, Any]) -> None:
        with self.cond:
            self.version += 1
            obj = copy.deepcopy(slice_obj)
            obj["metadata"]["resourceVersion"] = str(self.version)
            kind = "MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED"
            self.slices[obj["metadata"]["name"]] = obj
            self.history.append((self.version, kind, obj))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.version += 1
            obj = self.slices.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.history.append((self.version, "DELETED", obj))
            self.cond.notify_all()

    def put_and_compact(self, slice_obj: dict[str, Any]) -> None:
        """A change the event history no longer holds (etcd compacted it): every watch from
        an earlier version gets 410 Gone, and only a re-list shows the change."""
        with self.cond:
            self.put(slice_obj)
            self.history.clear()
            self.oldest_kept = self.version
            self.cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a watch body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.requests.append(query)
                if url.path != PATH:
                    self.send_error(404)
                    return
                if query.get("labelSelector") != [SELECTOR]:
                    self.send_error(400, "unexpected labelSelector")
                    return
                if query.get("watch") == ["true"]:
                    self._watch(int(query.get("resourceVersion", ["0"])[0]))
                else:
                    self._list()

            def _list(self) -> None:
                with api.cond:
                    body = {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSliceList",
                        "metadata": {"resourceVersion": str(api.version)},
                        "items": [copy.deepcopy(s) for s in api.slices.values()],
                    }
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, since: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                deadline = time.monotonic() + api.watch_hold_s
                while True:
                    with api.cond:
                        if since < api.oldest_kept:
                            gone = {
                                "type": "ERROR",
                                "object": {
                                    "kind": "Status",
                                    "apiVersion": "v1",
                                    "status": "Failure",
                                    "message": f"too old resource version: {since}",
                                    "reason": "Expired",
                                    "code": 410,
                                },
                            }
                            self._send(gone)
                            return
                        events = [(v, k, o) for v, k, o in api.history if v > since]
                        if not events:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                return
                            api.cond.wait(remaining)
                            continue
                    for version, kind, obj in events:
                        self._send({"type": kind, "object": obj})
                        since = version

            def _send(self, event: dict[str, Any]) -> None:
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()

        return Handler


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def ids(instances: Any) -> list[str]:
    return [i.instance_id for i in instances]


@pytest.fixture
def api() -> Iterator[FakeEndpointSliceApi]:
    with FakeEndpointSliceApi() as fake:
        yield fake


@pytest.mark.timeout(60)
def test_list_watch_terminating_and_410_relist(api: FakeEndpointSliceApi) -> None:
    api.put(
        endpoint_slice(
            "triton-abc", [endpoint("t-0", "10.0.0.1"), endpoint("t-1", "10.0.0.2", ready=False)]
        )
    )
    config = DiscoveryConfig(
        kind=DiscoveryKind.KUBERNETES,
        namespace=NAMESPACE,
        label_selector=SELECTOR,
        api_server=api.url,
        watch_timeout_s=1,
        memory_budget_bytes=1024,
    )
    discovery = KubernetesDiscovery(config)
    discovery.start()
    try:
        assert discovery.synced.wait(10)
        assert discovery.instances() == (
            InstanceConfig("t-0", "10.0.0.1:8001", "http://10.0.0.1:8002/metrics", 1024),
        )
        # A pod becomes ready: a MODIFIED event, no re-list.
        api.put(
            endpoint_slice("triton-abc", [endpoint("t-0", "10.0.0.1"), endpoint("t-1", "10.0.0.2")])
        )
        wait_for(lambda: ids(discovery.instances()) == ["t-0", "t-1"])
        # A pod starts terminating: it leaves at once (drained from the route tables).
        api.put(
            endpoint_slice(
                "triton-abc",
                [
                    endpoint("t-0", "10.0.0.1", ready=False, terminating=True),
                    endpoint("t-1", "10.0.0.2"),
                ],
            )
        )
        wait_for(lambda: ids(discovery.instances()) == ["t-1"])
        assert discovery.lists == 1
        # The watch resumed from the versions it saw, never from scratch.
        watches = [q for q in api.requests if q.get("watch") == ["true"]]
        assert all("resourceVersion" in q for q in watches)
        assert all(q.get("allowWatchBookmarks") == ["true"] for q in watches)
        # History compacted while a change went unrecorded: only a re-list after 410 sees it.
        api.put_and_compact(endpoint_slice("triton-def", [endpoint("t-2", "10.0.0.3")]))
        wait_for(lambda: ids(discovery.instances()) == ["t-1", "t-2"])
        assert discovery.lists == 2
        # A deleted slice takes its instances with it.
        api.delete("triton-abc")
        wait_for(lambda: ids(discovery.instances()) == ["t-2"])
    finally:
        discovery.stop()


@pytest.mark.timeout(60)
def test_api_server_down_keeps_the_last_view() -> None:
    with FakeEndpointSliceApi() as api:
        api.put(endpoint_slice("s", [endpoint("t-0", "10.0.0.1")]))
        config = DiscoveryConfig(
            kind=DiscoveryKind.KUBERNETES,
            namespace=NAMESPACE,
            label_selector=SELECTOR,
            api_server=api.url,
            watch_timeout_s=1,
        )
        discovery = KubernetesDiscovery(config)
        discovery.start()
        try:
            assert discovery.synced.wait(10)
            assert ids(discovery.instances()) == ["t-0"]
            api.server.shutdown()
            api.server.server_close()
            time.sleep(1.5)  # the watch ends and reconnecting fails
            assert ids(discovery.instances()) == ["t-0"]
        finally:
            discovery.stop()


# --- wired into `pointsman router` --------------------------------------------------------------


def _list_instances(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        response = stub.ListInstances(pb.ListInstancesRequest(), timeout=5)
    return sorted(i.instance_id for i in response.instances if i.healthy)


@pytest.mark.triton
@pytest.mark.timeout(120)
def test_pointsman_router_discovers_tritons_from_endpointslices(
    fleet: Fleet, tmp_path: Path
) -> None:
    tritons = fleet.tritons[:2]
    api_ctx = FakeEndpointSliceApi()
    with api_ctx as api:
        api.put(
            endpoint_slice(
                "triton-xyz",
                [endpoint(f"pod-{tritons[0].instance_id}", "127.0.0.1")],
                grpc_port=tritons[0].grpc_port,
                metrics_port=tritons[0].metrics_port,
            )
        )
        listen = f"127.0.0.1:{free_port()}"
        metrics_listen = f"127.0.0.1:{free_port()}"
        (tmp_path / "policy.yaml").write_text("placement: {enabled: false}\n")
        (tmp_path / "router.yaml").write_text(
            yaml.safe_dump(
                {
                    "listen": listen,
                    "metrics_listen": metrics_listen,
                    "policy_file": "policy.yaml",
                    "discovery": {
                        "kind": "kubernetes",
                        "namespace": NAMESPACE,
                        "label_selector": SELECTOR,
                        "api_server": api.url,
                        "watch_timeout_s": 2,
                    },
                }
            )
        )
        router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "router",
                "--config",
                str(tmp_path / "router.yaml"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            expected_first = [f"pod-{tritons[0].instance_id}"]
            wait_for(lambda: _try_list(listen) == expected_first, timeout_s=30)
            # The autoscaling signal is served (figures come with placement's rounds, off here).
            scraped = httpx.get(f"http://{metrics_listen}/metrics", timeout=5).text
            assert "# TYPE pointsman_router_desired_replicas gauge" in scraped
            assert "# TYPE pointsman_router_model_desired_copies gauge" in scraped
            # The second Triton arrives in a slice of its own (its own port, as in a test fleet).
            api.put(
                endpoint_slice(
                    "triton-uvw",
                    [endpoint(f"pod-{tritons[1].instance_id}", "127.0.0.1")],
                    grpc_port=tritons[1].grpc_port,
                    metrics_port=tritons[1].metrics_port,
                )
            )
            both = sorted([*expected_first, f"pod-{tritons[1].instance_id}"])
            wait_for(lambda: _try_list(listen) == both, timeout_s=30)
            # Terminating: the router stops listing it.
            api.put(
                endpoint_slice(
                    "triton-uvw",
                    [
                        endpoint(
                            f"pod-{tritons[1].instance_id}",
                            "127.0.0.1",
                            ready=False,
                            terminating=True,
                        )
                    ],
                    grpc_port=tritons[1].grpc_port,
                    metrics_port=tritons[1].metrics_port,
                )
            )
            wait_for(lambda: _try_list(listen) == expected_first, timeout_s=30)
        finally:
            router.terminate()
            try:
                router.wait(15)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(5)
            output = router.stdout.read() if router.stdout else ""
    assert router.returncode == 0, output


def _try_list(address: str) -> list[str] | None:
    try:
        return _list_instances(address)
    except grpc.RpcError:
        return None


def test_pointsman_router_without_credentials_exits_2_saying_why(tmp_path: Path) -> None:
    (tmp_path / "router.yaml").write_text(
        yaml.safe_dump({"discovery": {"kind": "kubernetes", "namespace": NAMESPACE}})
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    result = subprocess.run(
        [sys.executable, "-m", "app", "router", "--config", str(tmp_path / "router.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "discovery: no Kubernetes API credentials" in result.stderr
