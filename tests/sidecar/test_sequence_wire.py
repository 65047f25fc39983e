"""sidecar.sequence_wire.peek_sequence against protobuf's own encoding and malformed bytes."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from pointsman.errors import InvalidRequestError
from sidecar.head import read_head
from sidecar.sequence_wire import MAX_SEQUENCE_ID_CHARS, SequenceStep, peek_sequence
from sidecar.wire import peek_request, uint64_parameter_field


def request(tensor_bytes: int = 16, **parameters: tuple[str, object]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="accumulate")
    message.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    message.raw_input_contents.append(b"\x80" * tensor_bytes)  # varint-like bytes, skipped
    for key, (kind, value) in parameters.items():
        setattr(message.parameters[key], kind, value)
    return message


I64, U64, STR, BOOL = "int64_param", "uint64_param", "string_param", "bool_param"
LONGEST = "é" * MAX_SEQUENCE_ID_CHARS
CASES = [
    ("no parameters", request(), None),
    ("other parameters only", request(priority=(U64, 1)), None),
    ("int64 id, start", request(sequence_id=(I64, 42), sequence_start=(BOOL, True)),
     SequenceStep(42, True, False)),
    ("uint64 id, end", request(sequence_id=(U64, 2**64 - 1), sequence_end=(BOOL, True)),
     SequenceStep(2**64 - 1, False, True)),
    ("negative int64 id is the same 64 bits", request(sequence_id=(I64, -1)),
     SequenceStep(2**64 - 1, False, False)),
    ("string id", request(sequence_id=(STR, "conv-7"), sequence_start=(BOOL, False)),
     SequenceStep("conv-7", False, False)),
    ("longest string id", request(sequence_id=(STR, LONGEST)),
     SequenceStep(LONGEST, False, False)),
    ("id 0 is no sequence", request(sequence_id=(I64, 0), sequence_start=(BOOL, True)), None),
    ('id "" is no sequence', request(sequence_id=(STR, "")), None),
    ("1 MiB tensor", request(1 << 20, sequence_id=(I64, 9)), SequenceStep(9, False, False)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("message", "expected"), [pytest.param(m, e, id=name) for name, m, e in CASES]
)
def test_peek_sequence_reads_what_triton_reads(
    message: pb.ModelInferRequest, expected: SequenceStep | None
) -> None:
    data = message.SerializeToString()
    assert peek_sequence(data) == expected
    # From the head's offset too: the first parameters entry, -1 when there is none.
    at = peek_request(data).parameters_at
    assert (at >= 0) == bool(message.parameters)
    if at >= 0:
        assert peek_sequence(data, at) == expected
    assert read_head(data, ()).sequence == expected


def test_sequence_parameters_after_the_tensors_and_repeated_keys() -> None:
    late = request(1 << 17)  # above the byte-search size: the walk alone decides
    late.parameters["sequence_id"].int64_param = 1
    data = late.SerializeToString()
    moved = pb.ModelInferRequest(parameters={"sequence_id": late.parameters["sequence_id"]})
    # A later entry of a key wins, as in protobuf; the flag is appended the way the sidecar
    # appends its own fields.
    data += moved.SerializeToString().replace(b"\x10\x01", b"\x10\x05")
    data += uint64_parameter_field("priority", 1)
    expected = pb.ModelInferRequest.FromString(data).parameters["sequence_id"].int64_param
    assert expected == 5 and peek_sequence(data) == SequenceStep(5, False, False)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (request(sequence_id=("string_param", "x" * 10240)), "at most 128 characters"),
        (request(sequence_id=("string_param", "x" * 129)), "got 129"),
        (request(sequence_id=("bool_param", True)), "sequence_id: must be"),
        (request(sequence_id=("double_param", 1.0)), "sequence_id: must be"),
        (request(sequence_id=("int64_param", 1), sequence_end=("string_param", "yes")),
         "sequence_end: must be a bool"),
    ],
)  # fmt: skip
def test_ids_and_flags_triton_would_refuse_are_refused(
    message: pb.ModelInferRequest, words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        peek_sequence(message.SerializeToString())


@pytest.mark.parametrize(
    "data",
    [
        # parameters entry (tag 0x22) whose value's string runs past the entry
        b"\x22\x12\x0a\x0bsequence_id\x12\x03\x1a\x09ab",
        # an entry longer than the request
        b"\x22\x7f\x0a\x0bsequence_id",
        # an overlong varint inside the entry
        b"\x22\x19\x0a\x0bsequence_id\x12\x0a\x10" + b"\x80" * 9,
        # a string id that is not UTF-8
        b"\x22\x13\x0a\x0bsequence_id\x12\x04\x1a\x02\xff\xfe",
    ],
)
def test_malformed_entries_raise_invalid_request(data: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        peek_sequence(data)
