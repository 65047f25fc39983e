"""The policy's `sessions:` section: read, validated, and published to sidecars on WatchRoutes
(on every full snapshot and again after a reload changes it), as the sidecar's RouteCache
applies it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from app.processes import free_port
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.sessions import SessionPolicy
from router.config import parse_router_config
from router.policy import parse_policy, parse_policy_text
from router.proto_convert import session_policy_to_proto
from router.server import start_router
from sidecar.routes import RouteCache
from sidecar.upstream import UpstreamPool
from tests.support.loop_thread import LoopThread


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, SessionPolicy("x-session-id", 8, 600.0)),
        ({"sessions": {"header": "x-conversation"}}, SessionPolicy("x-conversation", 8, 600.0)),
        ({"sessions": {"header": ""}}, SessionPolicy("", 8, 600.0)),
        ({"sessions": {"max_in_flight": 2, "move_ttl_s": 30}},
         SessionPolicy("x-session-id", 2, 30.0)),
    ],
)  # fmt: skip
def test_sessions_section(data: dict[str, object], expected: SessionPolicy) -> None:
    policy = parse_policy(data)
    assert policy.sessions == expected
    # The effective YAML writes it out, and reads back to the same policy.
    assert parse_policy_text(policy.effective_yaml()).version == policy.version


@pytest.mark.parametrize(
    ("sessions", "message"),
    [
        ({"header": "X-Session"}, "sessions.header: must be lower case"),
        ({"header": "x session"}, "sessions.header: a metadata key has only"),
        ({"max_in_flight": 0}, "sessions.max_in_flight: must be"),
        ({"move_ttl_s": 0}, "sessions.move_ttl_s: must be"),
        ({"sticky": True}, "sessions"),
    ],
)
def test_bad_sessions_are_refused_naming_the_field(
    sessions: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy({"sessions": sessions})


def test_the_sidecar_reads_what_the_router_sends() -> None:
    policy = parse_policy({"sessions": {"header": "x-conv", "max_in_flight": 3}})
    message = session_policy_to_proto(policy)
    assert (message.header, message.max_in_flight, message.move_ttl_s) == ("x-conv", 3, 600.0)
    cache = RouteCache(UpstreamPool(max_message_bytes=1024, idle_close_s=60))
    assert cache.sessions == SessionPolicy()  # the defaults until a router says otherwise
    cache.apply(pb.WatchRoutesResponse(full_snapshot=True, session_policy=message))
    assert cache.sessions == SessionPolicy("x-conv", 3, 600.0)
    cache.apply(pb.WatchRoutesResponse(generation=2))  # a heartbeat keeps it
    assert cache.sessions.header == "x-conv"


@pytest.mark.timeout(60)
def test_watch_routes_sends_the_session_policy_and_resends_it_on_reload(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("sessions: {header: x-first}\n")
    listen = f"127.0.0.1:{free_port()}"
    config = parse_router_config(
        {"listen": listen, "instances": [], "policy_file": str(policy_file)}
    )
    loop = LoopThread()
    router = loop.run(start_router(config, registry=CollectorRegistry()))

    async def watch() -> tuple[pb.SessionPolicy, pb.SessionPolicy]:
        async with grpc.aio.insecure_channel(listen) as channel:
            stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            stream = stub.WatchRoutes(pb.WatchRoutesRequest(client_id="test"))
            first = await stream.read()
            assert first.full_snapshot and first.HasField("session_policy")
            policy_file.write_text("sessions: {header: x-second, max_in_flight: 2}\n")
            await stub.ReloadPolicy(pb.ReloadPolicyRequest())
            while True:
                message = await asyncio.wait_for(stream.read(), 5)
                if message.HasField("session_policy"):
                    stream.cancel()
                    return first.session_policy, message.session_policy

    try:
        before, after = asyncio.run(watch())
    finally:
        loop.run(router.stop(0.1))
        loop.close()
    assert (before.header, before.max_in_flight) == ("x-first", 8)
    assert (after.header, after.max_in_flight) == ("x-second", 2)
