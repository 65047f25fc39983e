"""A request's place in a Triton sequence, read from its serialized bytes without parsing it.

Triton's sequence batcher reads three entries of ModelInferRequest.parameters (field 4, a
map<string, InferParameter>): `sequence_id` (int64, uint64 or string), `sequence_start` and
`sequence_end` (bool). `peek_sequence` reads them in `sidecar.wire`'s style: top-level fields
skipped by their length, and only the parameters entries looked into, with the bounded field
reader of `sidecar.prompt` (nested messages are not checked by `wire`'s walk, so a run of 0x80
bytes must not build a huge integer). A request below 64 KiB without the key bytes costs one
byte search; the request head (`wire.RequestHead.parameters_at`) lets a request without
parameters skip this module at all.
"""

from __future__ import annotations

from typing import NamedTuple

from pointsman.errors import InvalidRequestError
from sidecar.prompt import _next_field, _varint
from sidecar.wire import _PARAMETERS_TAG, _SEARCH_BELOW

__all__ = ["MAX_SEQUENCE_ID_CHARS", "SequenceStep", "peek_sequence"]

# InferParameter's oneof: bool_param = 1, int64_param = 2, string_param = 3, uint64_param = 5.
_BOOL_PARAM, _INT64_PARAM, _STRING_PARAM, _UINT64_PARAM = 1, 2, 3, 5

# Triton's own limit on a string correlation id (2.51 answers UNIMPLEMENTED "string correlation
# ID cannot be longer than 128 characters"); the sidecar refuses longer ids before routing.
MAX_SEQUENCE_ID_CHARS = 128
_SEQUENCE_ID, _SEQUENCE_START, _SEQUENCE_END = b"sequence_id", b"sequence_start", b"sequence_end"
# A parameters entry whose key is "sequence_id" starts with these bytes (key field, length 11).
_SEQUENCE_ID_KEY = b"\x0a\x0b" + _SEQUENCE_ID
_MASK64 = (1 << 64) - 1


class SequenceStep(NamedTuple):
    """A request's place in a Triton sequence: the sequence's id (an unsigned 64-bit integer,
    or a string of at most MAX_SEQUENCE_ID_CHARS characters) and its start and end flags."""

    sequence_id: int | str
    start: bool
    end: bool


def peek_sequence(data: bytes, start: int = 0) -> SequenceStep | None:
    """The sequence parameters of a serialized ModelInferRequest that passed `peek_model`.

    Reads the top-level fields from `start` (a field's first byte: `RequestHead.parameters_at`
    skips what comes before the parameters) and, in the parameters entries among them, the keys
    `sequence_id` (int64, uint64 or string, as Triton takes it), `sequence_start` and
    `sequence_end` (bool); a later entry of a key wins, as in protobuf. None when the request
    names no sequence (no `sequence_id`, or 0 or "", which Triton reads as none). Raises
    InvalidRequestError for an entry it cannot read, a value of another type, or a string id
    that is not UTF-8 or longer than MAX_SEQUENCE_ID_CHARS.
    """
    n = len(data)
    if n - start < _SEARCH_BELOW and data.find(_SEQUENCE_ID_KEY, start) < 0:
        return None  # the common case, at C speed: no such key anywhere
    values: dict[bytes, tuple[int, int, int]] = {}
    i = start
    while i < n:
        tag, value_start, i = _next_field(data, i, n)
        if tag == _PARAMETERS_TAG:
            key, parameter = _map_entry(data, value_start, i)
            if key in (_SEQUENCE_ID, _SEQUENCE_START, _SEQUENCE_END):
                values[key] = parameter
    if _SEQUENCE_ID not in values:
        return None
    sequence_id = _sequence_id(data, values[_SEQUENCE_ID])
    if sequence_id == 0 or sequence_id == "":
        return None
    return SequenceStep(
        sequence_id,
        _flag(data, values.get(_SEQUENCE_START), "sequence_start"),
        _flag(data, values.get(_SEQUENCE_END), "sequence_end"),
    )


# A map entry: key = field 1 (LEN), value = field 2 (LEN, an InferParameter).
_ENTRY_KEY_TAG, _ENTRY_VALUE_TAG = 1 << 3 | 2, 2 << 3 | 2


def _map_entry(data: bytes, i: int, end: int) -> tuple[bytes, tuple[int, int, int]]:
    """The key of the parameters entry in data[i:end] and its value's last set field, as
    (InferParameter field number, start, end); (0, -1, -1) when the value sets none."""
    key = b""
    parameter = (0, -1, -1)
    while i < end:
        tag, start, i = _next_field(data, i, end)
        if tag == _ENTRY_KEY_TAG:
            key = data[start:i]
        elif tag == _ENTRY_VALUE_TAG:
            j = start
            while j < i:  # InferParameter is a oneof: the last field set wins
                value_tag, value_start, j = _next_field(data, j, i)
                parameter = (value_tag >> 3, value_start, j)
    return key, parameter


def _sequence_id(data: bytes, parameter: tuple[int, int, int]) -> int | str:
    kind, start, end = parameter
    if kind in (_INT64_PARAM, _UINT64_PARAM):
        # An int64 id is read as Triton reads it: the same 64 bits, unsigned.
        return _varint(data, start, end)[0] & _MASK64
    if kind == _STRING_PARAM:
        if end - start > 4 * MAX_SEQUENCE_ID_CHARS:
            chars = end - start  # too long whatever its encoding: not decoded
        else:
            try:
                text = str(data[start:end], "utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError("sequence_id: a string id must be UTF-8") from None
            if len(text) <= MAX_SEQUENCE_ID_CHARS:
                return text
            chars = len(text)
        raise InvalidRequestError(
            f"sequence_id: a string id may be at most {MAX_SEQUENCE_ID_CHARS} characters "
            f"(Triton's limit), got {chars}"
        )
    raise InvalidRequestError("sequence_id: must be an int64, uint64 or string parameter")


def _flag(data: bytes, parameter: tuple[int, int, int] | None, key: str) -> bool:
    if parameter is None:
        return False
    kind, start, end = parameter
    if kind != _BOOL_PARAM:
        raise InvalidRequestError(f"{key}: must be a bool parameter")
    return _varint(data, start, end)[0] != 0
