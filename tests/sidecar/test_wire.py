"""sidecar.wire.peek_model against real serialized ModelInferRequests and malformed bytes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from pointsman.errors import InvalidRequestError
from sidecar.wire import (
    RequestHead,
    int64_parameter_field,
    model_version_field,
    peek_model,
    peek_request,
    uint64_parameter_field,
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _string(number: int, text: bytes) -> bytes:
    return _field(number, 2, _varint(len(text)) + text)


def _request(
    name: str = "",
    version: str = "",
    request_id: str = "",
    tensor_bytes: int = 0,
    inputs: int = 1,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=request_id)
    request.parameters["priority"].uint64_param = 1
    request.parameters["sequence_id"].int64_param = -7
    for k in range(inputs):
        tensor = request.inputs.add(name=f"INPUT{k}", datatype="FP32", shape=[tensor_bytes // 4])
        tensor.parameters["binary_data_size"].int64_param = tensor_bytes
        request.raw_input_contents.append(b"\x01" * tensor_bytes)
    request.outputs.add(name="OUTPUT0")
    return request


VALID_CASES = [
    ("name only", _request("echo"), ("echo", "", "")),
    ("name and version", _request("codegen", "2"), ("codegen", "2", "")),
    ("name, version and id", _request("codegen", "1", "req-42"), ("codegen", "1", "req-42")),
    ("no tensors", pb.ModelInferRequest(model_name="m"), ("m", "", "")),
    ("unicode name", _request("modèle-名前"), ("modèle-名前", "", "")),
    ("long name (2-byte length)", _request("n" * 300), ("n" * 300, "", "")),
    ("1 MiB tensor", _request("big", "3", tensor_bytes=1 << 20), ("big", "3", "")),
    ("many inputs", _request("multi", inputs=20, tensor_bytes=64), ("multi", "", "")),
]


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [pytest.param(message, expected, id=name) for name, message, expected in VALID_CASES],
)
def test_peek_matches_protobuf(
    request_message: pb.ModelInferRequest, expected: tuple[str, ...]
) -> None:
    data = request_message.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(data)
    assert (parsed.model_name, parsed.model_version, parsed.id) == expected
    assert peek_model(data) == expected[:2]
    assert peek_request(data)[:3] == RequestHead(*expected)[:3]
    # Bytes-likes other than bytes work the same.
    assert peek_model(memoryview(data)) == expected[:2]  # type: ignore[arg-type]


def _unusual_order() -> list[tuple[str, bytes, tuple[str, str, str]]]:
    """Hand-built encodings a protobuf parser accepts but serializers rarely produce."""
    big = b"\x00" * (1 << 20)
    tensor = pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="BYTES", shape=[1])
    tensor_bytes = tensor.SerializeToString()
    return [
        (
            "name after the big tensor",
            _string(7, big) + _string(5, tensor_bytes) + _string(2, b"4") + _string(1, b"late"),
            ("late", "4", ""),
        ),
        (
            "id first, version last",
            _string(3, b"the-id") + _string(1, b"m") + _string(7, b"xyz") + _string(2, b"9"),
            ("m", "9", "the-id"),
        ),
        (
            "repeated name: the last wins",
            _string(1, b"first") + _string(1, b"second"),
            ("second", "", ""),
        ),
        (
            "unknown fields of every wire type are skipped",
            _field(15, 0, _varint(2**63))
            + _field(16, 1, b"\x00" * 8)
            + _field(17, 5, b"\x00" * 4)
            + _string(1000, b"future field")
            + _string(1, b"m"),
            ("m", "", ""),
        ),
        (
            "non-minimal varint length",
            _field(1, 2, b"\x81\x00") + b"x",
            ("x", "", ""),
        ),
        (
            "explicitly empty version",
            _string(1, b"m") + _string(2, b""),
            ("m", "", ""),
        ),
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [pytest.param(data, expected, id=name) for name, data, expected in _unusual_order()],
)
def test_unusual_encodings_match_protobuf(data: bytes, expected: tuple[str, str, str]) -> None:
    parsed = pb.ModelInferRequest.FromString(data)
    assert (parsed.model_name, parsed.model_version, parsed.id) == expected
    assert peek_request(data) == RequestHead(*expected, -1)  # none has parameters


def _malformed() -> list[tuple[str, bytes, str]]:
    good = _request("echo", tensor_bytes=64).SerializeToString()
    return [
        ("empty", b"", "model_name is required"),
        ("no model name", _request("", "1", tensor_bytes=16).SerializeToString(), "model_name"),
        ("empty model name", _string(1, b"") + _string(2, b"1"), "model_name is required"),
        ("truncated in the tensor", good[:-10], "truncated"),
        ("truncated length varint", _field(1, 2, b"\x80"), "truncated length"),
        ("truncated tag varint", _string(1, b"m") + b"\x80", "truncated tag"),
        ("length past the end", _field(1, 2, _varint(100)) + b"short", "truncated"),
        ("huge length", _field(7, 2, _varint(2**62)) + b"x", "truncated"),
        ("truncated fixed64", _string(1, b"m") + _field(9, 1, b"\x00" * 3), "truncated fixed64"),
        ("truncated fixed32", _string(1, b"m") + _field(9, 5, b"\x00"), "truncated fixed32"),
        ("truncated varint field", _string(1, b"m") + _field(9, 0, b"\xff"), "truncated varint"),
        ("varint over 10 bytes", _string(1, b"m") + _field(9, 0, b"\xff" * 11), "too long"),
        ("field number 0", b"\x02\x01m", "invalid field number 0"),
        ("wire type 3 (group)", _string(1, b"m") + _field(9, 3), "wire type 3"),
        ("wire type 4", _string(1, b"m") + _field(9, 4), "wire type 4"),
        ("wire type 6", _string(1, b"m") + _field(9, 6), "wire type 6"),
        ("wire type 7", _string(1, b"m") + _field(9, 7), "wire type 7"),
        ("model_name as a varint", _field(1, 0, b"\x05"), "model_name has wire type 0"),
        ("version as fixed32", _string(1, b"m") + _field(2, 5, b"abcd"), "model_version"),
        ("tag over 5 bytes", b"\xff\xff\xff\xff\xff\x01", "bad tag"),
        ("field number over 2^29-1", _varint(1 << 32 | 2) + b"\x00", "invalid field number"),
        ("invalid UTF-8 name", _string(1, b"\xff\xfe"), "model_name is not valid UTF-8"),
        ("invalid UTF-8 version", _string(1, b"m") + _string(2, b"\xc3"), "model_version"),
        ("text, not protobuf", b"GET / HTTP/1.1\r\n\r\n", "malformed request"),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(data, message, id=name) for name, data, message in _malformed()],
)
def test_malformed_raises_invalid_request(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        peek_model(data)


# Cases a protobuf parser accepts, which the peek rejects on purpose: a request with no model
# name cannot be routed, and a model name or version sent with another wire type (which a
# parser files as an unknown field) is a client bug better reported than routed by accident.
_STRICTER_THAN_PROTOBUF = {
    "empty",
    "no model name",
    "empty model name",
    "model_name as a varint",
    "version as fixed32",
}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(data, id=name)
        for name, data, _ in _malformed()
        if name not in _STRICTER_THAN_PROTOBUF
    ],
)
def test_what_peek_rejects_protobuf_rejects_too(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data)


def test_optional_name_for_statistics() -> None:
    data = pb.ModelStatisticsRequest(name="", version="").SerializeToString()
    assert peek_model(data, require_name=False) == ("", "")
    data = pb.ModelStatisticsRequest(name="echo", version="1").SerializeToString()
    assert peek_model(data, require_name=False) == ("echo", "1")
    with pytest.raises(InvalidRequestError):
        peek_model(b"\x0a\x05ab", require_name=False)


@pytest.mark.parametrize(
    "message",
    [
        pb.ModelReadyRequest(name="codegen", version="2"),
        pb.ModelMetadataRequest(name="codegen", version="2"),
        pb.ModelConfigRequest(name="codegen", version="2"),
        pb.ModelStatisticsRequest(name="codegen", version="2"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_other_model_requests_share_the_layout(message: object) -> None:
    assert peek_model(message.SerializeToString()) == ("codegen", "2")  # type: ignore[attr-defined]


def test_peek_of_a_1mib_request_takes_microseconds() -> None:
    data = _request("echo", "1", tensor_bytes=1 << 20).SerializeToString()
    assert len(data) > 1 << 20
    rounds = 2000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            peek_model(data)
        best = min(best, (time.perf_counter() - start) / rounds)
    # The tensor is skipped by its length, never copied: a few microseconds at most, far from
    # the ~100 us a copy of 1 MiB would cost. Generous bound for loaded CI machines.
    assert best < 50e-6, f"peek took {best * 1e6:.1f} us"
    # And it is no slower than a small request by more than a constant.
    small = _request("echo", "1", tensor_bytes=16).SerializeToString()
    start = time.perf_counter()
    for _ in range(rounds):
        peek_model(small)
    small_time = (time.perf_counter() - start) / rounds
    assert best < small_time * 10 + 5e-6


def test_numpy_tensor_request_as_tritonclient_builds_it() -> None:
    """A request built by tritonclient's own helpers, as a stock client sends it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc._utils import _get_inference_request

    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    request = _get_inference_request(
        model_name="echo",
        inputs=[tensor],
        model_version="1",
        request_id="abc",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    assert peek_request(request.SerializeToString()) == RequestHead("echo", "1", "abc")


@pytest.mark.parametrize(
    ("version_before", "version_after"),
    [("", "2"), ("1", "2"), ("", "v" * 300), ("7", "")],
    ids=["unset", "replaced", "long-varint-length", "cleared"],
)
def test_with_model_version_sets_the_version_protobuf_reads(
    version_before: str, version_after: str
) -> None:
    request = pb.ModelInferRequest(model_name="codegen", model_version=version_before, id="r1")
    request.raw_input_contents.append(b"\x00" * 1000)
    data = request.SerializeToString() + model_version_field(version_after)
    parsed = pb.ModelInferRequest.FromString(data)
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("codegen", version_after, "r1")
    assert parsed.raw_input_contents == request.raw_input_contents
    assert peek_model(data) == ("codegen", version_after)


@pytest.mark.parametrize(
    ("key", "value", "already"),
    [
        ("priority", 1, None),
        ("priority", 2, 9),  # the appended entry overrides one the caller set
        ("priority", 2**64 - 1, None),
        ("timeout", 0, None),
        ("timeout", 30_000_000, 5),
    ],
)
def test_parameters_appended_are_what_protobuf_reads(
    key: str, value: int, already: int | None
) -> None:
    request = pb.ModelInferRequest(model_name="codegen", id="req-1")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    if already is not None:
        request.parameters[key].uint64_param = already
    data = request.SerializeToString()
    if key == "priority":
        out = pb.ModelInferRequest.FromString(data + uint64_parameter_field(key, value))
        assert out.parameters[key].uint64_param == value
    else:
        out = pb.ModelInferRequest.FromString(data + int64_parameter_field(key, value))
        assert out.parameters[key].int64_param == value
    assert (out.model_name, out.id, len(out.inputs)) == ("codegen", "req-1", 1)
    assert peek_model(data + int64_parameter_field("timeout", 1)) == ("codegen", "")


def test_negative_uint64_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="priority"):
        uint64_parameter_field("priority", -1)
