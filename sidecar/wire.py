"""Reading the model name from a serialized request without parsing it.

The sidecar forwards ModelInfer requests as raw bytes. To route one it needs only the model
name and version, fields 1 and 2 of ModelInferRequest (and of ModelReadyRequest,
ModelMetadataRequest, ModelConfigRequest and ModelStatisticsRequest, which share that layout).
`peek_model` walks the top-level tags of the protobuf wire format, skips every other field by
its length (tensor contents are never copied) and checks the top-level structure as it goes:
a request that a protobuf parser would reject is rejected here too, with InvalidRequestError.
Nested messages (inputs, parameters) are not looked into; the walk notes where the first
parameters entry starts (`RequestHead.parameters_at`), so that `sidecar.sequence_wire` reads
a sequence's parameters only from requests that have some.

Wire format: each field is a varint tag `(field_number << 3) | wire_type` followed by
    0 VARINT  a varint            1 I64  8 bytes
    2 LEN     a varint length, then that many bytes
    5 I32     4 bytes             3, 4 (groups), 6, 7: not used by Triton's messages, rejected.
When a string field occurs more than once the last occurrence wins, as in protobuf.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from pointsman.errors import InvalidRequestError

__all__ = [
    "RequestHead",
    "int64_parameter_field",
    "model_version_field",
    "peek_model",
    "peek_request",
    "sets_parameter",
    "uint64_parameter_field",
]

_MAX_FIELD_NUMBER = (1 << 29) - 1
# Field numbers of the strings we read; their wire type must be LEN. ModelInferRequest's
# parameters (field 4) is a map<string, InferParameter>: LEN entries too.
_NAME, _VERSION, _ID, _PARAMETERS = 1, 2, 3, 4
_FIELD_NAMES = {_NAME: "model_name", _VERSION: "model_version", _ID: "id"}


class RequestHead(NamedTuple):
    """The routing-relevant strings of a request: model name, version and request id, and
    where its first parameters entry starts (-1: the request has no parameters)."""

    model_name: str
    model_version: str
    request_id: str
    parameters_at: int = -1


def _truncated(what: str, offset: int) -> InvalidRequestError:
    return InvalidRequestError(f"malformed request: truncated {what} at byte {offset}")


def _walk(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """Offsets (start, end) of the last model_name, model_version and id, and of the first
    parameters entry's tag; -1 when absent.

    Raises InvalidRequestError when the top-level structure is not valid protobuf.
    """
    n = len(data)
    i = 0
    ns = ne = vs = ve = is_ = ie = ps = -1
    while i < n:
        # Tag varint; most tags are one byte, so that path comes first.
        start = i
        b = data[i]
        i += 1
        if b < 0x80:
            tag = b
        else:
            tag = b & 0x7F
            shift = 7
            while True:
                if i >= n:
                    raise _truncated("tag", start)
                b = data[i]
                i += 1
                tag |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift >= 35:  # a tag is at most 5 bytes (32 bits)
                    raise InvalidRequestError(f"malformed request: bad tag at byte {start}")
        field = tag >> 3
        wire_type = tag & 7
        if field == 0 or field > _MAX_FIELD_NUMBER:
            raise InvalidRequestError(
                f"malformed request: invalid field number {field} at byte {start}"
            )
        if wire_type == 2:
            if i < n and data[i] < 0x80:
                length = data[i]
                i += 1
            else:
                length = 0
                shift = 0
                while True:
                    if i >= n:
                        raise _truncated("length", start)
                    b = data[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                    if shift >= 64:
                        raise InvalidRequestError(f"malformed request: bad length at byte {start}")
            end = i + length
            if end > n:
                raise _truncated(f"field {field} ({length} bytes)", start)
            if field <= _PARAMETERS:
                if field == _NAME:
                    ns, ne = i, end
                elif field == _VERSION:
                    vs, ve = i, end
                elif field == _ID:
                    is_, ie = i, end
                elif ps < 0:
                    ps = start
            i = end
            continue
        if field <= _ID:
            raise InvalidRequestError(
                f"malformed request: {_FIELD_NAMES[field]} has wire type {wire_type}, not 2"
            )
        if wire_type == 0:
            # Skip a varint of at most 10 bytes.
            for _ in range(10):
                if i >= n:
                    raise _truncated("varint", start)
                b = data[i]
                i += 1
                if b < 0x80:
                    break
            else:
                raise InvalidRequestError(f"malformed request: varint too long at byte {start}")
        elif wire_type == 1:
            i += 8
            if i > n:
                raise _truncated("fixed64", start)
        elif wire_type == 5:
            i += 4
            if i > n:
                raise _truncated("fixed32", start)
        else:
            raise InvalidRequestError(
                f"malformed request: unsupported wire type {wire_type} at byte {start}"
            )
    return ns, ne, vs, ve, is_, ie, ps


def _text(data: bytes, start: int, end: int, field: str) -> str:
    if start < 0:
        return ""
    try:
        return str(data[start:end], "utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"malformed request: {field} is not valid UTF-8") from None


def peek_model(data: bytes, *, require_name: bool = True) -> tuple[str, str]:
    """(model_name, model_version) of a serialized request, reading only the top-level tags.

    Raises InvalidRequestError for malformed bytes, invalid UTF-8 in either string, or
    (when `require_name`) a missing or empty model name.
    """
    ns, ne, vs, ve, _, _, _ = _walk(data)
    if ns < 0 or ns == ne:
        if require_name:
            raise InvalidRequestError("malformed request: model_name is required")
        name = ""
    else:
        name = _text(data, ns, ne, "model_name")
    version = "" if vs < 0 else _text(data, vs, ve, "model_version")
    return name, version


def peek_request(data: bytes, *, require_name: bool = True) -> RequestHead:
    """Like `peek_model`, with the request id as well (for logs and errors, not the hot path)."""
    ns, ne, vs, ve, is_, ie, ps = _walk(data)
    if require_name and (ns < 0 or ns == ne):
        raise InvalidRequestError("malformed request: model_name is required")
    return RequestHead(
        _text(data, ns, ne, "model_name"),
        _text(data, vs, ve, "model_version"),
        _text(data, is_, ie, "id"),
        ps,
    )


# One-byte varints (0..127: lengths of small fields, tags), ready made.
_SMALL_VARINTS = tuple(bytes((v,)) for v in range(0x80))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


# Fields the sidecar sets are appended to the request's bytes, never spliced in: protobuf
# parsers (Triton's too) keep the last occurrence of a field and, for a repeated map key, the
# last entry. So the bytes to append can be built apart from the request (and cached), and
# several fields cost one copy of the request between them.


def model_version_field(version: str) -> bytes:
    """The bytes that, appended to a request, set its model_version (field 2) to `version`."""
    return _len_field(_VERSION, version.encode())


# ModelInferRequest.parameters is field 4, a map<string, InferParameter>; a map entry is a
# message with the key as field 1 and the value as field 2. In InferParameter, int64_param is
# field 2 and uint64_param field 5 (both varints).
_INT64_PARAM, _UINT64_PARAM = 2, 5


# A map entry of ModelInferRequest.parameters (field 4, LEN) starts with its key (field 1).
_PARAMETERS_TAG = _PARAMETERS << 3 | 2
_PARAMETERS_TAG_BYTES = _varint(_PARAMETERS_TAG)


@lru_cache(maxsize=64)
def _entry_parts(key: str, param_field: int) -> tuple[bytes, bytes]:
    """What does not vary with the value: the entry's key and value tag, the parameter's tag."""
    return _len_field(1, key.encode()) + _varint(2 << 3 | 2), _varint(param_field << 3)


def _parameter_field(key: str, param_field: int, value: int) -> bytes:
    entry_head, value_tag = _entry_parts(key, param_field)
    parameter = value_tag + _varint(value & 0xFFFFFFFFFFFFFFFF)
    entry = entry_head + _varint(len(parameter)) + parameter
    return _PARAMETERS_TAG_BYTES + _varint(len(entry)) + entry


def uint64_parameter_field(key: str, value: int) -> bytes:
    """The bytes that, appended to a ModelInferRequest, set `parameters[key].uint64_param`;
    Triton reads the request's "priority" this way."""
    if value < 0:
        raise ValueError(f"uint64 parameter {key!r} must be >= 0, got {value}")
    return _parameter_field(key, _UINT64_PARAM, value)


def int64_parameter_field(key: str, value: int) -> bytes:
    """The bytes that, appended to a ModelInferRequest, set `parameters[key].int64_param`;
    Triton reads the request's queue "timeout" (microseconds) this way."""
    return _parameter_field(key, _INT64_PARAM, value)


# Below this size a byte search for the key (C speed, about 0.2 us) rules it out faster than
# the field walk (about 3 us); above it the walk wins, since it skips tensors by length.
_SEARCH_BELOW = 64 * 1024


def sets_parameter(data: bytes, key: str) -> bool:
    """Whether the serialized ModelInferRequest `data` has `parameters[key]`.

    Walks the top-level fields only (tensor contents are skipped by length). Every protobuf
    serializer writes a map entry's key first, which is all this looks at. `data` has already
    passed `peek_model`; anything it cannot read answers False.
    """
    if len(key) >= 0x80:
        return False
    wanted = b"\x0a" + bytes([len(key)]) + key.encode()
    if len(data) < _SEARCH_BELOW and wanted not in data:
        return False
    n = len(data)
    i = 0
    try:
        while i < n:
            tag, i = _read_varint(data, i)
            wire_type = tag & 7
            if wire_type == 2:
                length, i = _read_varint(data, i)
                if tag == _PARAMETERS_TAG and data.startswith(wanted, i, i + length):
                    return True
                i += length
            elif wire_type == 0:
                _, i = _read_varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            else:
                return False
    except IndexError:
        return False
    return False


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
