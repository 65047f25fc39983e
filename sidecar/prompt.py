"""The leading bytes of a request's prompt, read from the serialized request without parsing it.

Prefix-affinity routing keys a ModelInferRequest by the first blocks of its prompt (see
`pointsman.prefix`). The prompt is a BYTES tensor, carried one of two ways:
- in `raw_input_contents` (field 7, one entry per input, in the order of `inputs`): each
  element a 4-byte little-endian length, then that many bytes;
- in the input's own `contents.bytes_contents` (InferInputTensor field 5, then
  InferTensorContents field 8, one entry per element).
Only the first element (the first prompt row) is read, and of it only the bytes that can
matter. Tensor contents are skipped by their length, never copied: the cost does not grow
with the request's size. The walk stops as soon as the prompt is found.

Malformed bytes raise InvalidRequestError, never anything else, and every loop consumes
input, so no input can make it hang. Unlike `sidecar.wire`, which reads only a top level it
has checked, this also reads nested messages, so its varints are bounded (at most 10 bytes):
an unbounded one would let a long run of 0x80 bytes build a huge integer, slowly.
"""

from __future__ import annotations

from pointsman.errors import InvalidRequestError
from pointsman.prefix import PrefixBlocks, prefix_chain, prefix_key
from sidecar.wire import _read_varint

__all__ = ["peek_prompt", "prompt_prefix_chain", "prompt_prefix_key"]

# ModelInferRequest: inputs = 5, raw_input_contents = 7. InferInputTensor: name = 1,
# datatype = 2, contents = 5. InferTensorContents: bytes_contents = 8.
_INPUTS, _RAW_CONTENTS = 5, 7
_NAME, _DATATYPE, _CONTENTS = 1, 2, 5
_BYTES_CONTENTS = 8
_BYTES = b"BYTES"
_MAX_VARINT_BYTES = 10
_LENGTH_PREFIX = 4  # a BYTES element in raw contents: uint32 little-endian length, then data
_NO_ELEMENT = (-1, -1)


def _malformed(what: str, offset: int) -> InvalidRequestError:
    return InvalidRequestError(f"malformed request: {what} at byte {offset}")


def _varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    """The varint at data[i] (within data[:end]) and the offset after it. Read from a slice
    of at most 10 bytes: `wire._read_varint` itself would run on through any 0x80 bytes."""
    try:
        value, used = _read_varint(data[i : min(end, i + _MAX_VARINT_BYTES)], 0)
    except IndexError:
        raise _malformed("truncated or overlong varint", i) from None
    return value, i + used


def _next_field(data: bytes, i: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, offset after the field) of the field at data[i], within data[:end].

    For a length-delimited field the value is data[value start:offset after]; fields of the
    other wire types are checked and skipped.
    """
    at = i
    tag = data[i]
    if tag < 0x80:  # nearly every tag is one byte
        i += 1
    else:
        tag, i = _varint(data, i, end)
    wire_type = tag & 7
    if wire_type == 2:
        if i < end and data[i] < 0x80:
            length = data[i]
            i += 1
        else:
            length, i = _varint(data, i, end)
        stop = i + length
    elif wire_type == 0:
        _, stop = _varint(data, i, end)
    elif wire_type == 1 or wire_type == 5:
        stop = i + (8 if wire_type == 1 else 4)
    else:
        raise _malformed(f"unsupported wire type {wire_type}", at)
    if stop > end:
        raise _malformed(f"field {tag >> 3} runs past its message", at)
    return tag, i, stop


# Tags (field number << 3 | wire type 2) of the length-delimited fields read here.
_INPUTS_TAG, _RAW_CONTENTS_TAG = _INPUTS << 3 | 2, _RAW_CONTENTS << 3 | 2
_NAME_TAG, _DATATYPE_TAG, _CONTENTS_TAG = _NAME << 3 | 2, _DATATYPE << 3 | 2, _CONTENTS << 3 | 2
_BYTES_CONTENTS_TAG = _BYTES_CONTENTS << 3 | 2


def _input_tensor(data: bytes, i: int, end: int) -> tuple[bytes, bytes, tuple[int, int] | None]:
    """(name, datatype, first inline element) of the InferInputTensor in data[i:end]; the
    element is (-1, -1) when the tensor has contents but no BYTES element, None when it has
    no contents. Later fields win, and repeated contents merge, as protobuf parsers do."""
    name = datatype = b""
    inline: tuple[int, int] | None = None
    while i < end:
        tag, start, i = _next_field(data, i, end)
        if tag == _NAME_TAG:
            name = data[start:i]
        elif tag == _DATATYPE_TAG:
            datatype = data[start:i]
        elif tag == _CONTENTS_TAG and (inline is None or inline[0] < 0):
            inline = _first_bytes_element(data, start, i) or _NO_ELEMENT
    return name, datatype, inline


def _first_bytes_element(data: bytes, i: int, end: int) -> tuple[int, int] | None:
    while i < end:
        tag, start, i = _next_field(data, i, end)
        if tag == _BYTES_CONTENTS_TAG:
            return start, i
    return None


def _first_raw_element(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    if start == end:
        return None  # an empty tensor
    if end - start < _LENGTH_PREFIX:
        raise _malformed("BYTES tensor element shorter than its length prefix", start)
    length = int.from_bytes(data[start : start + _LENGTH_PREFIX], "little")
    first = start + _LENGTH_PREFIX
    if first + length > end:
        raise _malformed("BYTES tensor element runs past its tensor", start)
    return first, first + length


def peek_prompt(data: bytes, input_name: str, max_bytes: int) -> bytes | None:
    """The first `max_bytes` bytes (or fewer) of the first element of input `input_name`.

    None when the request has no such input, the input is not BYTES, or it carries no
    element. Raises InvalidRequestError when the bytes on the way are not valid protobuf or
    the element is malformed.
    """
    wanted = input_name.encode()
    n = len(data)
    i = 0
    target = -1  # index of the wanted input among `inputs`
    inputs = 0
    datatype = b""
    element: tuple[int, int] | None = None
    raw: list[tuple[int, int]] = []
    while i < n:
        # The common case inline (a one-byte tag and length): most fields of a request are
        # that, and a call per field would double the cost.
        tag = data[i]
        if tag & 0x87 == 2 and i + 1 < n and data[i + 1] < 0x80:
            start = i + 2
            i = start + data[i + 1]
            if i > n:
                raise _malformed(f"field {tag >> 3} runs past its message", start)
        else:
            tag, start, i = _next_field(data, i, n)
        if tag == _INPUTS_TAG:
            if target < 0:
                name, datatype, element = _input_tensor(data, start, i)
                if name == wanted:
                    target = inputs
                    if element is not None:
                        break
            inputs += 1
        elif tag == _RAW_CONTENTS_TAG:
            raw.append((start, i))
        if 0 <= target < len(raw):
            break
    if target < 0 or datatype != _BYTES:
        return None
    if element is None:
        if target >= len(raw):
            return None
        element = _first_raw_element(data, *raw[target])
        if element is None:
            return None
    start, end = element
    if start < 0:
        return None
    return data[start : min(end, start + max_bytes)]


def prompt_prefix_chain(data: bytes, input_name: str, blocks: PrefixBlocks) -> tuple[int, ...]:
    """`pointsman.prefix.prefix_chain` of the request's prompt; empty when it has none."""
    prompt = peek_prompt(data, input_name, blocks.span_bytes)
    return () if prompt is None else prefix_chain(prompt, blocks)


def prompt_prefix_key(data: bytes, input_name: str, blocks: PrefixBlocks) -> int | None:
    """`pointsman.prefix.prefix_key` of the request's prompt; None when it has none."""
    prompt = peek_prompt(data, input_name, blocks.span_bytes)
    return None if prompt is None else prefix_key(prompt, blocks)
