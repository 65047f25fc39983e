"""The placement Lease: one router replica places, another takes over when it stops.

No cluster here, so an in-test HTTP server speaks the part of the Kubernetes API the official
client's leader election uses: a `coordination.k8s.io/v1` Lease read (404 when absent),
created (409 when it exists) and replaced with optimistic concurrency (409 on a stale
resourceVersion, as the API server answers), which is what keeps two candidates from both
winning.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from pointsman.errors import ConfigError
from router.config import RouterConfig, parse_router_config
from router.discovery import StaticDiscovery
from router.election import LeaseElection, LeaseSettings
from router.server import start_router

NAMESPACE = "pointsman"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
FAST = LeaseSettings(
    "pointsman-placement", NAMESPACE, duration_s=3, renew_deadline_s=2, retry_period_s=1
)


class LeaseServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), LeaseHandler)
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.conflicts = 0
        self.lock = threading.Lock()


class LeaseHandler(BaseHTTPRequestHandler):
    server: LeaseServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": reason, "code": code})  # fmt: skip

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0"))
        body: dict[str, Any] = json.loads(self.rfile.read(length))
        return body

    def do_GET(self) -> None:
        name = self.path.split("?")[0].removeprefix(LEASES + "/")
        with self.server.lock:
            lease = self.server.leases.get(name)
        if lease is None:
            self._status(404, "NotFound")
        else:
            self._send(200, lease)

    def do_POST(self) -> None:
        body = self._body()
        name = body["metadata"]["name"]
        with self.server.lock:
            if name in self.server.leases:
                self.server.conflicts += 1
                self._status(409, "AlreadyExists")
                return
            self.server.version += 1
            body["metadata"].update(namespace=NAMESPACE, resourceVersion=str(self.server.version))
            body.update(apiVersion="coordination.k8s.io/v1", kind="Lease")
            self.server.leases[name] = body
        self._send(201, body)

    def do_PUT(self) -> None:
        name = self.path.split("?")[0].removeprefix(LEASES + "/")
        body = self._body()
        with self.server.lock:
            stored = self.server.leases.get(name)
            if stored is None:
                self._status(404, "NotFound")
                return
            if body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
                self.server.conflicts += 1
                self._status(409, "Conflict")
                return
            self.server.version += 1
            body["metadata"]["resourceVersion"] = str(self.server.version)
            self.server.leases[name] = body
        self._send(200, body)


@pytest.fixture
def api() -> Iterator[tuple[LeaseServer, Callable[[], Any]]]:
    server = LeaseServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def api_client() -> Any:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        return client.ApiClient(configuration)

    try:
        yield server, api_client
    finally:
        server.shutdown()
        server.server_close()


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_one_replica_leads_and_another_takes_over_when_it_stops(
    api: tuple[LeaseServer, Callable[[], Any]],
) -> None:
    server, api_client = api
    a = LeaseElection(FAST, "router-a", api_client())
    b = LeaseElection(FAST, "router-b", api_client())
    a.start()
    b.start()
    try:
        assert _wait(lambda: a.is_leader() or b.is_leader(), 5), "nobody took the Lease"
        both_at_once = 0
        deadline = time.monotonic() + 2.5  # more than a lease duration of renewals
        while time.monotonic() < deadline:
            both_at_once += a.is_leader() and b.is_leader()
            time.sleep(0.02)
        assert both_at_once == 0
        leader, follower = (a, b) if a.is_leader() else (b, a)
        assert not follower.is_leader()
        holder = server.leases[FAST.name]["spec"]["holderIdentity"]
        assert holder == leader.identity
        leader.stop()  # as a replica that exits: the Lease is left to expire
        assert not leader.is_leader()
        taken = _wait(follower.is_leader, FAST.duration_s + 3 * FAST.retry_period_s + 1)
        assert taken, "the follower did not take the expired Lease"
        assert server.leases[FAST.name]["spec"]["holderIdentity"] == follower.identity
    finally:
        a.stop()
        b.stop()


def test_an_unreachable_api_server_makes_no_leader(
    api: tuple[LeaseServer, Callable[[], Any]],
) -> None:
    _, api_client = api
    unreachable = api_client()
    unreachable.configuration.host = "http://127.0.0.1:9"  # discard port: refused
    election = LeaseElection(FAST, "router-c", unreachable)
    election.start()
    try:
        time.sleep(1.5)
        assert not election.is_leader()
    finally:
        election.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"retry_period_s": 0}, "retry_period_s"),
        ({"renew_deadline_s": 2, "retry_period_s": 2}, "renew_deadline_s"),
        ({"duration_s": 10, "renew_deadline_s": 10}, "duration_s"),
    ],
)
def test_lease_timing_is_validated(fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeaseSettings("lease", "ns", **fields)


def _router_config(api_server: str, **lease: object) -> RouterConfig:
    return parse_router_config(
        {
            "listen": "127.0.0.1:0",
            "discovery": {"kind": "kubernetes", "namespace": NAMESPACE, "api_server": api_server},
            "placement_lease": {"name": "pointsman-placement", "duration_s": 3,
                                "renew_deadline_s": 2, "retry_period_s": 1, **lease},
        }
    )  # fmt: skip


@pytest.mark.asyncio
async def test_routers_place_only_while_they_hold_the_lease(
    api: tuple[LeaseServer, Callable[[], Any]],
) -> None:
    """Two routers (an empty fleet: only the election matters here) run for one Lease."""
    server, _ = api
    config = _router_config(f"http://127.0.0.1:{server.server_address[1]}")
    assert config.placement_lease == FAST
    a = await start_router(config, discovery=StaticDiscovery(()))
    b = await start_router(config, discovery=StaticDiscovery(()))
    stopped = []
    try:

        async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
            deadline = time.monotonic() + timeout_s
            while not condition() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return condition()

        assert await until(lambda: a.places_models() or b.places_models(), 5)
        assert not (a.places_models() and b.places_models())
        leader, follower = (a, b) if a.places_models() else (b, a)
        assert leader.election is not None
        assert server.leases[FAST.name]["spec"]["holderIdentity"] == leader.election.identity
        await leader.stop(0)
        stopped.append(leader)
        assert await until(follower.places_models, FAST.duration_s + 4)
    finally:
        for router in (a, b):
            if router not in stopped:
                await router.stop(0)


@pytest.mark.parametrize(
    ("lease", "discovery", "field"),
    [
        ({"name": "Bad_Name"}, {"kind": "kubernetes", "namespace": "ns"}, "placement_lease.name"),
        ({"name": "p", "ttl": 3}, {"kind": "kubernetes", "namespace": "ns"}, "placement_lease.ttl"),
        ({"name": "p"}, {"kind": "kubernetes"}, "placement_lease.namespace"),
        ("p", None, "placement_lease"),  # static discovery: no API server to hold it
        (
            {"name": "p", "duration_s": 0},
            {"kind": "kubernetes", "namespace": "ns"},
            "placement_lease.duration_s",
        ),
        (
            {"name": "p", "duration_s": 5},
            {"kind": "kubernetes", "namespace": "ns"},
            "placement_lease",
        ),  # the duration must pass the default 10 s renew deadline
    ],
)
def test_placement_lease_config_errors_name_the_field(
    lease: object, discovery: dict[str, str] | None, field: str
) -> None:
    data: dict[str, object] = {"placement_lease": lease}
    if discovery is not None:
        data["discovery"] = discovery
    with pytest.raises(ConfigError) as info:
        parse_router_config(data)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_a_lease_name_alone_takes_the_discovery_namespace_and_default_timing() -> None:
    config = parse_router_config(
        {"discovery": {"kind": "kubernetes", "namespace": "prod"}, "placement_lease": "placer"}
    )
    assert config.placement_lease == LeaseSettings("placer", "prod")
