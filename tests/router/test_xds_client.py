"""What a stock gRPC client (grpcio's own xDS client, in a subprocess) does with the router's
xDS: the request split follows the route weights, a route change moves traffic within 250 ms,
retries on UNAVAILABLE and outlier ejection are honoured, a stopped instance is avoided.

The xDS side is the router's own (XdsCache + XdsService on a grpc.aio server) fed by a fake
route book; the instances are small grpc.health.v1 servers that count who answered.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.routes import ModelRoutes, RouteEntry
from router.xds.bootstrap import BootstrapTls, write_bootstrap
from router.xds.cache import XdsCache
from router.xds.resources import XdsSettings
from router.xds.service import XdsService, add_xds_service
from tests.support.certs import make_pki
from tests.support.fakes import FakeRouteBook
from tests.support.loop_thread import LoopThread
from tests.support.proxyless_client import records, spawn, wait_for

MODEL = "codegen"


class _Instance(health.HealthServicer):
    """Answers Check with `answer` (OK, or an error status) and notes when."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        super().__init__()
        self.answer = grpc.StatusCode.OK
        self.calls: list[float] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.calls.append(time.monotonic())
        if self.answer != grpc.StatusCode.OK:
            context.abort(self.answer, "told to fail")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def share(self, total: int, since: float = 0.0) -> float:
        return sum(1 for t in self.calls if t >= since) / total if total else 0.0


@dataclass
class XdsRig:
    loop: LoopThread
    book: FakeRouteBook
    bootstrap: Path
    instances: dict[str, _Instance]
    servers: list[grpc.aio.Server] = field(default_factory=list)

    def routes(self, **weights: float) -> ModelRoutes:
        entries = tuple(
            RouteEntry(name, self.instances[name].address, ("1",), weight)
            for name, weight in sorted(weights.items())
        )
        return ModelRoutes(MODEL, entries, "1", 1)

    def publish(self, **weights: float) -> None:
        table = self.routes(**weights)
        self.loop.loop.call_soon_threadsafe(self.book.publish, table)

    def client(self, *args: str) -> subprocess.Popen[str]:
        return spawn(self.bootstrap, f"xds:///{MODEL}", *args)


def _rig(
    tmp_path: Path, settings: XdsSettings, *, mutual_tls: bool, **weights: float
) -> Iterator[XdsRig]:
    loop = LoopThread()
    credentials, tls = None, None
    if mutual_tls:  # the router's port and every instance require a client certificate
        pki = make_pki(tmp_path)
        credentials = grpc.ssl_server_credentials(
            [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
        tls = BootstrapTls(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    instances = {name: _Instance(credentials) for name in weights}
    rig = XdsRig(loop, FakeRouteBook(), tmp_path / "bootstrap.json", instances)
    rig.book.tables[MODEL] = rig.routes(**weights)

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()

        async def ready() -> None:
            return None

        add_xds_service(XdsService(XdsCache(rig.book, settings), ready=ready), server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        # The same files serve both hops here: `tls` for the router (A65), `triton_tls` for
        # the instances (A29 certificate provider).
        write_bootstrap(rig.bootstrap, [f"127.0.0.1:{port}"], tls=tls, triton_tls=tls)
        return server

    rig.servers.append(loop.run(serve()))
    try:
        yield rig
    finally:
        for server in rig.servers:
            loop.run(server.stop(0))
        for instance in instances.values():
            instance.server.stop(None)
        loop.close()


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[XdsRig]:
    settings, mutual_tls, weights = request.param
    yield from _rig(tmp_path, settings, mutual_tls=mutual_tls, **weights)


def _param(
    settings: XdsSettings | None = None, *, mutual_tls: bool = False, **weights: float
) -> object:
    return pytest.param((settings or XdsSettings(), mutual_tls, weights), id="")


@pytest.mark.parametrize("rig", [_param(a=0.5, b=0.3, c=0.2)], indirect=True)
def test_the_split_of_a_stock_client_follows_the_route_weights(rig: XdsRig) -> None:
    done = records(rig.client("--mode", "health", "--count", "3000", "--seconds", "60"))
    assert all(r["code"] == "OK" for r in done)
    total = sum(len(i.calls) for i in rig.instances.values())
    shares = {name: round(i.share(total), 3) for name, i in rig.instances.items()}
    print(f"{total} calls, shares {shares} for weights 0.5 / 0.3 / 0.2")
    # Three binomial standard deviations at n=3000 are under 0.03.
    assert shares["a"] == pytest.approx(0.5, abs=0.03)
    assert shares["b"] == pytest.approx(0.3, abs=0.03)
    assert shares["c"] == pytest.approx(0.2, abs=0.03)


MUTUAL_TLS = XdsSettings(upstream_tls=True, upstream_identity=True)


@pytest.mark.parametrize("rig", [_param(MUTUAL_TLS, mutual_tls=True, a=1.0, b=1.0)], indirect=True)
def test_mutual_tls_to_the_router_and_to_instances_through_xds_credentials(rig: XdsRig) -> None:
    """The router's port and the instances require client certificates: the bootstrap's
    `tls` creds reach the router (A65); the Cluster's UpstreamTlsContext and the bootstrap's
    certificate provider secure the instances for a channel with xDS credentials (A29)."""
    done = records(
        rig.client("--mode", "health", "--xds-creds", "--count", "40", "--seconds", "30")
    )
    assert [r["code"] for r in done] == ["OK"] * 40, done[:1]
    assert sum(len(i.calls) for i in rig.instances.values()) == 40
    # Without xDS credentials the channel falls back to plaintext, which the instances refuse.
    done = records(rig.client("--mode", "health", "--count", "1", "--seconds", "30"))
    assert done[0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("rig", [_param(a=1.0, b=1.0)], indirect=True)
def test_a_route_change_moves_traffic_within_250_ms(rig: XdsRig, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = rig.client("--mode", "health", "--seconds", "3", "--ready-file", str(ready))
    wait_for(ready)
    time.sleep(0.5)
    changed_at = time.monotonic()
    rig.publish(a=1.0)  # b leaves the route table
    done = records(proc)
    late = [t - changed_at for t in rig.instances["b"].calls if t > changed_at]
    moved_after = max(late, default=0.0)
    on_a = sum(1 for t in rig.instances["a"].calls if t > changed_at + 0.25)
    print(f"b's last call {moved_after * 1000:.0f} ms after the change; a took {on_a} after")
    assert all(r["code"] == "OK" for r in done)
    assert moved_after < 0.25
    assert on_a > 50


@pytest.mark.parametrize("rig", [_param(a=1.0, b=1.0)], indirect=True)
def test_a_stopped_instance_is_avoided_without_a_failed_request(
    rig: XdsRig, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    proc = rig.client("--mode", "health", "--seconds", "3", "--ready-file", str(ready))
    wait_for(ready)
    time.sleep(0.5)
    stopped_at = time.monotonic()
    rig.instances["b"].server.stop(None)  # nothing told the router: the client finds out
    done = records(proc)
    failed = [r for r in done if r["code"] != "OK"]
    after = sum(1 for r in done if float(r["t"]) > stopped_at)  # type: ignore[arg-type]
    print(f"{len(done)} calls, {after} after b stopped, {len(failed)} failed: {failed[:3]}")
    assert not failed
    assert after > 50


@pytest.mark.parametrize(
    "rig",
    [_param(XdsSettings(outlier_detection=False), a=1.0, b=1.0)],
    indirect=True,
)
def test_retries_on_unavailable_are_honoured(rig: XdsRig) -> None:
    """b answers UNAVAILABLE to everything. Without retries half the calls would fail; with
    two retries (each a fresh weighted pick) a call fails only when all three land on b."""
    rig.instances["b"].answer = grpc.StatusCode.UNAVAILABLE
    done = records(rig.client("--mode", "health", "--count", "600", "--seconds", "60"))
    failed = sum(1 for r in done if r["code"] != "OK") / len(done)
    print(f"{len(done)} calls, {failed:.1%} failed (1/8 expected with 2 retries, 1/2 without)")
    assert 0.03 < failed < 0.25


@pytest.mark.parametrize("rig", [_param(XdsSettings(retries=0), a=1.0, b=1.0)], indirect=True)
def test_an_instance_that_keeps_failing_is_ejected(rig: XdsRig) -> None:
    """b answers INTERNAL (never retried): outlier detection ejects it within an interval
    or two, after which every call succeeds on a."""
    rig.instances["b"].answer = grpc.StatusCode.INTERNAL
    done = records(rig.client("--mode", "health", "--seconds", "4"))
    start = float(done[0]["t"])  # type: ignore[arg-type]
    late = [r for r in done if float(r["t"]) > start + 2.5]  # type: ignore[arg-type]
    failed = [r for r in done if r["code"] != "OK"]
    print(f"{len(done)} calls, {len(failed)} failed, none of the {len(late)} after 2.5 s")
    assert failed, "b never answered: the test proves nothing"
    assert late and all(r["code"] == "OK" for r in late)
