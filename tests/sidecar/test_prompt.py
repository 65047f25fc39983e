"""sidecar/prompt.py: the prompt's leading bytes from a serialized ModelInferRequest.

Requests are built as tritonclient sends them (its own request builder) and with the
protobuf classes (inline contents, other field orders); the truth is a full protobuf parse.
Hypothesis throws random, truncated and mutated bytes at the peek: it answers or raises
InvalidRequestError, nothing else, within a deadline.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb

from pointsman.errors import InvalidRequestError
from pointsman.prefix import PrefixBlocks, prefix_chain, prefix_key
from sidecar.prompt import peek_prompt, prompt_prefix_chain, prompt_prefix_key

CONTEXT = b"# repository context\nimport os\n" * 64


def client_request(prompts: list[bytes], max_tokens: int | None = 16, **extra: object) -> bytes:
    """The bytes tritonclient sends for codegen's inputs (raw contents)."""
    prompt = grpcclient.InferInput("PROMPT", [len(prompts), 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p] for p in prompts], dtype=np.object_))
    inputs = [prompt]
    if max_tokens is not None:
        tokens = grpcclient.InferInput("MAX_TOKENS", [len(prompts), 1], "INT32")
        tokens.set_data_from_numpy(np.full((len(prompts), 1), max_tokens, dtype=np.int32))
        inputs = [tokens, prompt] if extra.pop("tokens_first", False) else [prompt, tokens]
    options: dict[str, object] = {
        "model_version": "",
        "request_id": "r-1",
        "outputs": [grpcclient.InferRequestedOutput("TEXT")],
        "sequence_id": 0,
        "sequence_start": False,
        "sequence_end": False,
        "priority": 0,
        "timeout": None,
        "parameters": None,
    }
    options.update(extra)
    request = triton_utils._get_inference_request(model_name="codegen", inputs=inputs, **options)
    data: bytes = request.SerializeToString()
    return data


def inline_request(prompts: list[bytes], datatype: str = "BYTES") -> bytes:
    """PROMPT in its own contents.bytes_contents, as some clients send it."""
    request = triton_pb.ModelInferRequest(model_name="codegen")
    tensor = request.inputs.add(name="PROMPT", datatype=datatype, shape=[len(prompts), 1])
    tensor.contents.bytes_contents.extend(prompts)
    data: bytes = request.SerializeToString()
    return data


def truth(data: bytes, name: str = "PROMPT") -> bytes | None:
    """The first element of input `name`, by a full parse."""
    request = triton_pb.ModelInferRequest.FromString(data)
    for index, tensor in enumerate(request.inputs):
        if tensor.name != name:
            continue
        if tensor.datatype != "BYTES":
            return None
        if tensor.HasField("contents"):
            contents = tensor.contents.bytes_contents
            return bytes(contents[0]) if contents else None
        if index >= len(request.raw_input_contents):
            return None
        raw = request.raw_input_contents[index]
        if not raw:
            return None
        length = int.from_bytes(raw[:4], "little")
        return bytes(raw[4 : 4 + length])
    return None


@pytest.mark.parametrize(
    ("case", "data", "name", "expected"),
    [
        ("raw contents", client_request([b"def f(x):"]), "PROMPT", b"def f(x):"),
        ("first of several rows", client_request([b"row one", b"row two"]), "PROMPT", b"row one"),
        (
            "prompt not the first input",
            client_request([b"second"], tokens_first=True),
            "PROMPT",
            b"second",
        ),
        ("only the prompt", client_request([b"alone"], max_tokens=None), "PROMPT", b"alone"),
        (
            "with parameters and a priority",
            client_request([b"p"], priority=1, timeout=5_000_000, parameters={"k": "v"}),
            "PROMPT",
            b"p",
        ),
        ("inline bytes_contents", inline_request([b"inline", b"second"]), "PROMPT", b"inline"),
        ("empty first element", client_request([b"", b"x"]), "PROMPT", b""),
        ("no such input", client_request([b"def f():"]), "CONTEXT", None),
        ("input is not BYTES", client_request([b"def f():"]), "MAX_TOKENS", None),
        ("inline but declared FP32", inline_request([b"x"], datatype="FP32"), "PROMPT", None),
        ("inline with no element", inline_request([]), "PROMPT", None),
        (
            "no inputs at all",
            triton_pb.ModelInferRequest(model_name="m").SerializeToString(),
            "PROMPT",
            None,
        ),
        ("empty bytes", b"", "PROMPT", None),
    ],
)
def test_peek_prompt_reads_the_first_element(
    case: str, data: bytes, name: str, expected: bytes | None
) -> None:
    assert peek_prompt(data, name, 1 << 20) == expected, case
    assert truth(data, name) == expected, case  # the table agrees with a full parse


def test_only_max_bytes_are_returned_and_size_does_not_matter() -> None:
    big = CONTEXT * 512  # about 1 MiB
    data = client_request([big])
    assert len(data) > 1_000_000
    assert peek_prompt(data, "PROMPT", 100) == big[:100]
    assert peek_prompt(data, "PROMPT", 0) == b""
    assert peek_prompt(data, "PROMPT", len(big) + 10) == big


def test_raw_contents_before_the_inputs_are_found_too() -> None:
    # Field order is the serializer's choice; a parser accepts any. Re-emit fields reversed.
    data = client_request([b"reordered"])
    request = triton_pb.ModelInferRequest.FromString(data)
    raw_only = triton_pb.ModelInferRequest(raw_input_contents=request.raw_input_contents)
    rest = triton_pb.ModelInferRequest()
    rest.CopyFrom(request)
    del rest.raw_input_contents[:]
    reordered = raw_only.SerializeToString() + rest.SerializeToString()
    assert triton_pb.ModelInferRequest.FromString(reordered) == request
    assert peek_prompt(reordered, "PROMPT", 64) == b"reordered"


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("truncated length prefix", client_request([b"abc"])[:-8]),
        ("varint runs off the end", b"\x2a\xff\xff"),
        ("overlong varint", b"\x2a" + b"\x80" * 20 + b"\x01"),
        ("group wire type", b"\x2b\x00"),
        ("field longer than the message", b"\x2a\x10PROMPT"),
    ],
)
def test_malformed_requests_raise_invalid_request(case: str, data: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="malformed request"):
        peek_prompt(data, "PROMPT", 64)


def test_a_bytes_element_longer_than_its_tensor_is_malformed() -> None:
    request = triton_pb.ModelInferRequest(model_name="codegen")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append((100).to_bytes(4, "little") + b"short")
    with pytest.raises(InvalidRequestError, match="runs past its tensor"):
        peek_prompt(request.SerializeToString(), "PROMPT", 64)
    request.raw_input_contents[0] = b"\x01\x00"
    with pytest.raises(InvalidRequestError, match="shorter than its length prefix"):
        peek_prompt(request.SerializeToString(), "PROMPT", 64)


def test_the_prefix_key_is_the_kernels_key_of_the_prompt() -> None:
    blocks = PrefixBlocks(block_bytes=64, max_blocks=8)
    for prompts in ([CONTEXT + b"def a():"], [CONTEXT[:100]], [b"short"]):
        for data in (client_request(prompts), inline_request(prompts)):
            assert prompt_prefix_key(data, "PROMPT", blocks) == prefix_key(prompts[0], blocks)
            assert prompt_prefix_chain(data, "PROMPT", blocks) == prefix_chain(prompts[0], blocks)
    assert prompt_prefix_key(client_request([b"short"]), "PROMPT", blocks) is None
    assert prompt_prefix_key(client_request([CONTEXT]), "NOPE", blocks) is None
    assert prompt_prefix_chain(client_request([CONTEXT]), "NOPE", blocks) == ()
    # Two requests of one repository: same key, whatever follows the shared context.
    a = prompt_prefix_key(client_request([CONTEXT + b"def a():"]), "PROMPT", blocks)
    b = prompt_prefix_key(client_request([CONTEXT + b"class B:"], max_tokens=3), "PROMPT", blocks)
    assert a == b is not None


# --- fuzzing ------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=400,
    deadline=250,  # milliseconds per example: a hang or a quadratic walk fails here
    suppress_health_check=[HealthCheck.too_slow],
)


def _peek_or_invalid(data: bytes) -> bytes | None:
    try:
        return peek_prompt(data, "PROMPT", 256)
    except InvalidRequestError:
        return None


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_answer_or_raise_invalid_request(data: bytes) -> None:
    _peek_or_invalid(data)


prompts_strategy = st.lists(st.binary(max_size=300), min_size=1, max_size=3)


@FUZZ
@given(prompts_strategy, st.booleans(), st.data())
def test_truncated_requests_answer_or_raise_invalid_request(
    prompts: list[bytes], inline: bool, data: st.DataObject
) -> None:
    whole = inline_request(prompts) if inline else client_request(prompts)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole)))
    _peek_or_invalid(whole[:cut])


@FUZZ
@given(prompts_strategy, st.booleans(), st.data())
def test_mutated_requests_agree_with_a_full_parse_when_it_succeeds(
    prompts: list[bytes], inline: bool, data: st.DataObject
) -> None:
    whole = bytearray(inline_request(prompts) if inline else client_request(prompts))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))
        whole[at] = data.draw(st.integers(min_value=0, max_value=255))
    mutated = bytes(whole)
    try:
        got = peek_prompt(mutated, "PROMPT", 1 << 20)
    except InvalidRequestError:
        return
    try:
        expected = truth(mutated)
    except DecodeError:
        return  # protobuf rejects something the peek did not need to read
    if got is not None and expected is not None:
        assert got == expected


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.binary(max_size=40_000))
def test_a_long_run_of_continuation_bytes_is_refused_quickly(head: bytes, tail: bytes) -> None:
    _peek_or_invalid(head + b"\x80" * 50_000 + tail)


@FUZZ
@given(prompts_strategy)
def test_well_formed_requests_give_exactly_the_parsed_prompt(prompts: list[bytes]) -> None:
    for data in (client_request(prompts), inline_request(prompts)):
        assert peek_prompt(data, "PROMPT", 1 << 20) == truth(data) == prompts[0]
