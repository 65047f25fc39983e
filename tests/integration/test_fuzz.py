"""Fuzzing (hypothesis) against the session fleet's real sidecar, router and Tritons.

Arbitrary bytes and structured-but-mangled ModelInferRequests to every unary method of the
sidecar, random values of the headers it reads, mangled message sequences on ModelStreamInfer,
and the router's RPCs with random field values (and raw bytes). Every call must end with a gRPC
status within its deadline, never an uncaught exception's INTERNAL "internal error: ..." or
UNKNOWN, and the processes must stay up.

Examples are derandomized (a fixed seed per test, no example database) and few, so the file
runs in well under a minute and the same inputs are tried on every CI run.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from app.fleet import Fleet
from pointsman.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.triton

SIDECAR_SERVICE = "/inference.GRPCInferenceService/"
ROUTER_SERVICE = "/pointsman.router.v1.RouterService/"
# A call that takes longer than this has hung (every fuzzed request is tiny).
CALL_TIMEOUT_S = 10.0

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,  # real RPCs: timing is bounded by CALL_TIMEOUT_S, not by hypothesis
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# Codes a fuzzed call may end with; UNKNOWN (an escaped exception) and DEADLINE_EXCEEDED (a
# hang: nothing here should take CALL_TIMEOUT_S) are not among them.
ACCEPTED = frozenset(grpc.StatusCode) - {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}

UNARY_METHODS = (
    "ModelInfer",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "RepositoryModelLoad",
    "SystemSharedMemoryStatus",
    "TraceSetting",
)
# Never MAX_TOKENS: a valid huge value would make codegen generate for a long time.
INPUT_NAMES = ("PROMPT", "INPUT0", "TEXT", "")
DATATYPES = ("BYTES", "FP32", "INT32", "INT64", "UINT8", "BOOL", "FP16", "nonsense", "")
MODEL_NAMES = st.sampled_from(("codegen", "codegen_stream", "echo", "", "no_such_model")) | st.text(
    max_size=12
)


def assert_status(error: grpc.RpcError, what: object) -> None:
    code, details = error.code(), error.details() or ""
    assert code in ACCEPTED, (code, details, what)
    # status_of's answer for an exception nobody expected: a crash turned into a status.
    assert not (code == grpc.StatusCode.INTERNAL and details.startswith("internal error")), (
        details,
        what,
    )


@pytest.fixture(scope="module")
def sidecar_channel(fleet: Fleet) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fleet.sidecar_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def router_channel(fleet: Fleet) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fleet.router_address) as channel:
        yield channel


@pytest.fixture(autouse=True)
def still_alive(fleet: Fleet) -> Iterator[None]:
    """After each fuzz test: no process died, the sidecar is live, the router answers."""
    yield
    assert fleet.check_children() == []
    with grpc.insecure_channel(fleet.sidecar_address) as channel:
        live = channel.unary_unary(
            SIDECAR_SERVICE + "ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        assert live(pb.ServerLiveRequest(), timeout=5).live
    with grpc.insecure_channel(fleet.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models


def _raw_unary(channel: grpc.Channel, path: str, request: bytes) -> None:
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert_status(error, (path, request[:80]))


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    """A ModelInferRequest with random fields, serialized, then maybe mangled."""
    inputs = [
        pb.ModelInferRequest.InferInputTensor(
            name=draw(st.sampled_from(INPUT_NAMES)),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-3, 2**40), max_size=3)),
        )
        for _ in range(draw(st.integers(0, 2)))
    ]
    request = pb.ModelInferRequest(
        model_name=draw(MODEL_NAMES),
        model_version=draw(st.sampled_from(("", "1", "2", "-1", "x"))),
        id=draw(st.text(max_size=8)),
        inputs=inputs,
        raw_input_contents=draw(st.lists(st.binary(max_size=64), max_size=2)),
    )
    for key in draw(st.lists(st.sampled_from(("priority", "timeout", "x")), max_size=2)):
        request.parameters[key].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    data = request.SerializeToString()
    mangle = draw(st.sampled_from(("none", "truncate", "flip", "append")))
    if mangle == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mangle == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif mangle == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    return data


@FUZZ
@given(method=st.sampled_from(UNARY_METHODS), request=st.binary(max_size=256) | infer_requests())
def test_sidecar_unary_methods_answer_any_bytes_with_a_status(
    sidecar_channel: grpc.Channel, method: str, request: bytes
) -> None:
    _raw_unary(sidecar_channel, SIDECAR_SERVICE + method, request)


# Headers the sidecar reads (version pin, priority class, request id, trace context) and one
# it does not; values are printable ASCII, as grpc requires of non-binary metadata.
HEADER_KEYS = ("x-model-version", "x-priority", "x-request-id", "traceparent", "x-canary", "x-a")
HEADER_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


# A request codegen runs (one token: cheap), so header handling past the routing is reached.
VALID_CODEGEN = pb.ModelInferRequest(
    model_name="codegen",
    inputs=[
        pb.ModelInferRequest.InferInputTensor(name="PROMPT", datatype="BYTES", shape=[1, 1]),
        pb.ModelInferRequest.InferInputTensor(name="MAX_TOKENS", datatype="INT32", shape=[1, 1]),
    ],
    raw_input_contents=[
        len(b"def f():").to_bytes(4, "little") + b"def f():",
        (1).to_bytes(4, "little"),
    ],
).SerializeToString()


@settings(FUZZ, max_examples=40)
@given(
    metadata=st.lists(st.tuples(st.sampled_from(HEADER_KEYS), HEADER_VALUES), max_size=4),
    request=st.just(VALID_CODEGEN) | infer_requests(),
)
def test_sidecar_infer_answers_any_headers_with_a_status(
    sidecar_channel: grpc.Channel, metadata: list[tuple[str, str]], request: bytes
) -> None:
    call = sidecar_channel.unary_unary(
        SIDECAR_SERVICE + "ModelInfer", request_serializer=None, response_deserializer=None
    )
    try:
        call(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as error:
        assert_status(error, (metadata, request[:80]))
        # The well-formed request without headers must be served (else this fuzzes nothing).
        assert request != VALID_CODEGEN or metadata, error


@FUZZ
@given(messages=st.lists(st.binary(max_size=128) | infer_requests(), min_size=0, max_size=3))
def test_sidecar_stream_answers_any_messages_with_a_status(
    sidecar_channel: grpc.Channel, messages: list[bytes]
) -> None:
    call = sidecar_channel.stream_stream(
        SIDECAR_SERVICE + "ModelStreamInfer", request_serializer=None, response_deserializer=None
    )
    try:
        for _ in call(iter(messages), timeout=CALL_TIMEOUT_S):
            pass
    except grpc.RpcError as error:
        assert_status(error, messages)


@FUZZ
@given(
    model=MODEL_NAMES,
    version=st.text(max_size=6),
    headers=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3),
    wait_ms=st.integers(0, 2**32 - 1),
)
def test_router_pick_target_answers_random_fields_with_a_status(
    router_channel: grpc.Channel, model: str, version: str, headers: dict[str, str], wait_ms: int
) -> None:
    stub = router_pb2_grpc.RouterServiceStub(router_channel)  # type: ignore[no-untyped-call]
    # A cold wait is only allowed for names no instance knows (they end NOT_FOUND at once):
    # a cold load of a fleet model would change the session fleet the other tests share.
    known = model in ("codegen", "codegen_stream", "echo")
    request = router_pb2.PickTargetRequest(
        model_name=model,
        model_version=version,
        headers=headers,
        wait_for_load_ms=0 if known else wait_ms,
    )
    try:
        stub.PickTarget(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert_status(error, request)


@FUZZ
@given(
    method=st.sampled_from(("ListModels", "ListInstances", "GetPolicy", "PickTarget")),
    request=st.binary(max_size=128),
)
def test_router_unary_rpcs_answer_any_bytes_with_a_status(
    router_channel: grpc.Channel, method: str, request: bytes
) -> None:
    _raw_unary(router_channel, ROUTER_SERVICE + method, request)


@settings(FUZZ, max_examples=20)
@given(
    models=st.lists(MODEL_NAMES, max_size=3),
    client_id=st.text(max_size=16),
    raw=st.none() | st.binary(max_size=64),
)
def test_router_watch_routes_answers_random_requests(
    router_channel: grpc.Channel, models: list[str], client_id: str, raw: bytes | None
) -> None:
    """The first message is a full snapshot (for a parseable request), or a status."""
    request = (
        raw
        if raw is not None
        else router_pb2.WatchRoutesRequest(
            client_id=client_id, model_names=models
        ).SerializeToString()
    )
    call = router_channel.unary_stream(
        ROUTER_SERVICE + "WatchRoutes", request_serializer=None, response_deserializer=None
    )
    stream = call(request, timeout=CALL_TIMEOUT_S)
    try:
        first = router_pb2.WatchRoutesResponse.FromString(next(stream))
        assert first.full_snapshot
        if raw is None and models:  # a watch of some models gets only their tables
            assert {t.model_name for t in first.tables} <= set(models)
    except grpc.RpcError as error:
        assert_status(error, request)
    finally:
        stream.cancel()
