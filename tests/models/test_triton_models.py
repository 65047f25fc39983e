"""The model repository `triton_models/` served by one real Triton server.

Expected outputs come from the same model code run in-process (the Decoder needs only numpy),
so these tests also pin down that outputs do not depend on how requests were batched, nor on
what the prefix cache held. The cache's counters are read from Triton's /metrics (custom
metrics of the Python backend), and every model's stub process is checked to hold the memory
its config declares.
"""

from __future__ import annotations

import importlib.util
import queue
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from app.processes import ManagedProcess
from app.triton import (
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from sidecar.sequence_wire import MAX_SEQUENCE_ID_CHARS
from sidecar.sequences import NOT_STARTED

REPO = Path(__file__).resolve().parents[2] / "triton_models"
MODELS = ("codegen", "codegen_stream", "echo", "slow", "add_one", "accumulate")
MiB = 1 << 20
DEFAULT_TOKENS = 24
MAX_TOKENS_CAP = 256


def _load_model_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_pointsman_codegen_model", REPO / "codegen" / "1" / "model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


model_py = _load_model_module()


@pytest.fixture(scope="module")
def decoders() -> dict[int, Any]:
    return {v: model_py.Decoder(2048, MAX_TOKENS_CAP, 20240607, v) for v in (1, 2)}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonSpec, ManagedProcess]]:
    log = tmp_path_factory.mktemp("triton-models") / "triton.log"
    spec = TritonSpec.on_free_ports(
        "triton-models-test", model_repository=REPO, load_models=MODELS, log_path=log
    )
    proc = triton_process(spec, prepare_installation())
    proc.start()
    try:
        wait_until_ready(spec.grpc_address, MODELS, timeout_s=60, process=proc)
        yield spec, proc
    finally:
        proc.send_stop()
        if proc.wait(15) is None:
            proc.kill()
            proc.wait(5)
        proc.close()


@pytest.fixture(scope="module")
def server(triton: tuple[TritonSpec, ManagedProcess]) -> TritonSpec:
    return triton[0]


@pytest.fixture
def client(server: TritonSpec) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        yield c
    finally:
        c.close()


def codegen_inputs(
    prompts: str | list[str], max_tokens: int | None = None
) -> list[grpcclient.InferInput]:
    rows = [prompts] if isinstance(prompts, str) else prompts
    prompt = grpcclient.InferInput("PROMPT", [len(rows), 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p.encode()] for p in rows], dtype=np.object_))
    if max_tokens is None:
        return [prompt]
    tokens = grpcclient.InferInput("MAX_TOKENS", [len(rows), 1], "INT32")
    tokens.set_data_from_numpy(np.full((len(rows), 1), max_tokens, dtype=np.int32))
    return [prompt, tokens]


def generate(
    client: grpcclient.InferenceServerClient,
    prompt: str,
    max_tokens: int | None = None,
    version: str = "",
) -> tuple[str, list[int]]:
    result = client.infer("codegen", codegen_inputs(prompt, max_tokens), model_version=version)
    ids = result.as_numpy("TOKEN_IDS")
    text = result.as_numpy("TEXT")
    assert ids.dtype == np.int32 and ids.shape[0] == 1
    assert text.shape == (1, 1)
    return text[0, 0].decode(), ids[0].tolist()


def expected(decoders: dict[int, Any], prompt: str, version: int, n: int) -> list[int]:
    return decoders[version].generate([prompt.encode()], [n])[0].tolist()


def scrape(server: TritonSpec, name: str, model: str, version: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = rf'^{name}{{model="{model}",version="{version}"}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_repository_layout_shares_one_implementation() -> None:
    home = REPO / "codegen" / "1"
    helpers = ("prefix_cache.py", "resident_memory.py", "stream_scheduler.py")
    links = [
        (folder / name, home / name)
        for folder in (REPO / "codegen" / "2", REPO / "codegen_stream" / "1")
        for name in ("model.py", *helpers)
    ] + [(REPO / m / "1" / "resident_memory.py", home / "resident_memory.py")
         for m in ("echo", "slow", "add_one", "accumulate")]  # fmt: skip
    for link, target in links:
        assert link.is_symlink(), link
        assert not Path(link.readlink()).is_absolute()
        assert link.resolve() == target.resolve()


@pytest.mark.triton
def test_configs_as_served(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("codegen", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    batching = config["dynamic_batching"]
    assert batching["preferred_batch_size"] == [4, 8]
    assert int(batching["priority_levels"]) == 2
    policy = batching["default_queue_policy"]
    assert policy.get("timeout_action", "REJECT") == "REJECT"  # the enum's zero is left out
    assert policy["allow_timeout_override"] is True
    assert int(policy["max_queue_size"]) > 0 and int(policy["default_timeout_microseconds"]) > 0
    stream = client.get_model_config("codegen_stream", as_json=True)["config"]
    assert stream["model_transaction_policy"]["decoupled"] is True
    for name in MODELS:
        params = client.get_model_config(name, as_json=True)["config"]["parameters"]
        declared = int(params["pointsman.memory_bytes"]["string_value"])
        assert declared >= 32 << 20  # a Python stub process alone is about 37 MB
    ready = {
        (m["name"], m.get("version", ""))
        for m in client.get_model_repository_index(as_json=True)["models"]
        if m.get("state") == "READY"
    }
    assert {("codegen", "1"), ("codegen", "2"), ("codegen_stream", "1"), ("echo", "1")} <= ready


@pytest.mark.triton
def test_codegen_is_deterministic_and_matches_in_process_decoding(
    client: grpcclient.InferenceServerClient, decoders: dict[int, Any]
) -> None:
    prompt = "def fibonacci(n):"
    text, ids = generate(client, prompt, version="1")
    assert len(ids) == DEFAULT_TOKENS
    assert all(0 <= t < len(model_py.VOCAB) for t in ids)
    assert text == model_py.detokenize(np.array(ids))
    assert (text, ids) == generate(client, prompt, version="1")
    assert ids == expected(decoders, prompt, 1, DEFAULT_TOKENS)
    assert generate(client, "def fibonacci(n): ", version="1")[1] != ids


@pytest.mark.triton
def test_versions_differ_and_the_default_is_the_highest(
    client: grpcclient.InferenceServerClient, decoders: dict[int, Any]
) -> None:
    prompt = "class Stack:"
    v1 = generate(client, prompt, version="1")
    v2 = generate(client, prompt, version="2")
    assert v1 != v2
    assert v2[1] == expected(decoders, prompt, 2, DEFAULT_TOKENS)
    assert generate(client, prompt) == v2
    with pytest.raises(InferenceServerException) as err:
        generate(client, prompt, version="3")
    assert err.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.triton
def test_max_tokens_is_honoured_and_capped(client: grpcclient.InferenceServerClient) -> None:
    prompt = "for i in range(10):"
    full = generate(client, prompt, version="1")[1]
    assert generate(client, prompt, 5, version="1")[1] == full[:5]
    assert len(generate(client, prompt, 40, version="1")[1]) == 40
    assert len(generate(client, prompt, 100_000, version="1")[1]) == MAX_TOKENS_CAP


@pytest.mark.triton
def test_several_prompt_rows_in_one_request(client: grpcclient.InferenceServerClient) -> None:
    prompts = ["import os", "while True:"]
    result = client.infer("codegen", codegen_inputs(prompts, 7), model_version="1")
    ids = result.as_numpy("TOKEN_IDS")
    assert ids.shape == (2, 7)
    for row, prompt in zip(ids.tolist(), prompts, strict=True):
        assert row == generate(client, prompt, 7, version="1")[1]


@pytest.mark.triton
def test_bad_requests_get_their_own_error_and_spare_the_batch(
    client: grpcclient.InferenceServerClient,
) -> None:
    for prompt, max_tokens, message in [
        ("", None, "PROMPT must not be empty"),
        ("x", 0, "MAX_TOKENS must be positive"),
        ("x", -3, "MAX_TOKENS must be positive"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            generate(client, prompt, max_tokens)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in err.value.message()
    # Good and bad requests sent together, so the dynamic batcher mixes them.
    results: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    cases = ["def a():", "", "def b():", "", "def c():", "def d():"]
    for i, prompt in enumerate(cases):
        client.async_infer(
            "codegen",
            codegen_inputs(prompt, 8),
            callback=lambda result, error, i=i: results.put((i, result, error)),
        )
    outcome = dict((i, (r, e)) for i, r, e in (results.get(timeout=30) for _ in cases))
    for i, prompt in enumerate(cases):
        result, error = outcome[i]
        if prompt:
            assert error is None
            assert result.as_numpy("TOKEN_IDS").shape == (1, 8)
        else:
            assert error is not None and "PROMPT must not be empty" in error.message()


@pytest.mark.triton
def test_dynamic_batcher_batches_concurrent_requests(
    client: grpcclient.InferenceServerClient, server: TritonSpec
) -> None:
    def counters() -> tuple[float, float]:
        return (
            scrape(server, "nv_inference_count", "codegen", "1"),
            scrape(server, "nv_inference_exec_count", "codegen", "1"),
        )

    count0, exec0 = counters()
    done: queue.Queue[Any] = queue.Queue()
    n = 16
    started = time.monotonic()
    for i in range(n):
        client.async_infer(
            "codegen",
            codegen_inputs(f"def task_{i}(x):"),
            model_version="1",
            callback=lambda result, error: done.put(error),
        )
    errors = [done.get(timeout=30) for _ in range(n)]
    elapsed = time.monotonic() - started
    assert errors == [None] * n
    deadline = time.monotonic() + 5
    while (counters()[0] - count0) < n and time.monotonic() < deadline:
        time.sleep(0.1)  # counters reach /metrics a moment after the responses
    count, executions = counters()
    assert count - count0 == n
    # One request alone, then batches of up to 8 while it decodes: about 3 or 4 executions.
    assert executions - exec0 <= n / 3, (count - count0, executions - exec0, elapsed)


@pytest.mark.triton
def test_priority_one_overtakes_queued_requests(
    client: grpcclient.InferenceServerClient,
) -> None:
    finished: queue.Queue[tuple[str, Any]] = queue.Queue()
    # The first batch (up to 8) runs; the rest queue behind it, the urgent one sent last.
    # Without priority it would be in the last batch, at index 16 or later.
    for i in range(20):
        client.async_infer(
            "codegen",
            codegen_inputs(f"def low_{i}():"),
            model_version="1",
            callback=lambda result, error, i=i: finished.put((f"low{i}", error)),
        )
    client.async_infer(
        "codegen",
        codegen_inputs("def urgent():"),
        model_version="1",
        priority=1,
        timeout=20_000_000,  # shortens the queue policy's 30 s, as allow_timeout_override permits
        callback=lambda result, error: finished.put(("urgent", error)),
    )
    order = [finished.get(timeout=30) for _ in range(21)]
    assert all(error is None for _, error in order)
    names = [name for name, _ in order]
    assert names.index("urgent") < 16, names  # in the second batch, ahead of queued lows


@pytest.mark.triton
def test_codegen_stream_sends_one_response_per_token_then_final(
    client: grpcclient.InferenceServerClient,
) -> None:
    prompts = [f"def stream_{i}(x):" for i in range(6)]
    counts = [DEFAULT_TOKENS, 3, 12, 1, 30, DEFAULT_TOKENS]
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        # All on one stream at once: the decoder runs them as one continuous batch.
        for i, (prompt, count) in enumerate(zip(prompts, counts, strict=True)):
            client.async_stream_infer(
                "codegen_stream",
                codegen_inputs(prompt, None if count == DEFAULT_TOKENS else count),
                request_id=str(i),
                enable_empty_final_response=True,
            )
        client.async_stream_infer(
            "codegen_stream",
            codegen_inputs("x", 0),
            request_id="bad",
            enable_empty_final_response=True,
        )
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        pieces: dict[str, list[str]] = {str(i): [] for i in range(len(prompts))}
        finished: set[str] = set()
        bad_error = None
        while len(finished) < len(prompts) or bad_error is None:
            result, error = responses.get(timeout=30)
            if error is not None:
                bad_error = error
                continue
            response = result.get_response()
            rid = response.id
            assert rid not in finished, "a response after the final one"
            token = result.as_numpy("TOKEN_ID")
            assert token is not None, "every response carries a token, the last one too"
            assert token.shape == (1, 1) and token.dtype == np.int32
            tokens[rid].append(int(token[0, 0]))
            pieces[rid].append(result.as_numpy("TEXT")[0, 0].decode())
            if response.parameters["triton_final_response"].bool_param:
                finished.add(rid)
    finally:
        client.stop_stream()
    assert "MAX_TOKENS must be positive" in bad_error.message()
    for i, (prompt, count) in enumerate(zip(prompts, counts, strict=True)):
        text, ids = generate(client, prompt, count, version="1")
        assert tokens[str(i)] == ids  # same weights as codegen v1, whatever the batch
        assert "".join(pieces[str(i)]) == text


@pytest.mark.triton
def test_echo_returns_its_input(client: grpcclient.InferenceServerClient) -> None:
    for data in (np.arange(5, dtype=np.float32) * 1.5, np.zeros(0, dtype=np.float32)):
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        out = client.infer("echo", [tensor]).as_numpy("OUTPUT0")
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, data)


# --- the prefix cache ---------------------------------------------------------------------

# About 6 KiB of "repository context", each test's own so no earlier request warmed it.
CONTEXT = "".join(f"def helper_{i}(x):\n    return x * {i}\n" for i in range(180))
BLOCK = 64  # prefix_block_bytes


def cache_counters(server: TritonSpec, model: str, version: str) -> tuple[float, float]:
    return (
        scrape(server, "prefix_cache_lookup_blocks_total", model, version),
        scrape(server, "prefix_cache_hit_blocks_total", model, version),
    )


def served_parameters(
    client: grpcclient.InferenceServerClient, model: str, version: str
) -> dict[str, str]:
    config = client.get_model_config(model, version, as_json=True)["config"]
    return {key: value["string_value"] for key, value in config["parameters"].items()}


def wait_for_counters(
    server: TritonSpec, model: str, version: str, expected: tuple[float, float]
) -> tuple[float, float]:
    deadline = time.monotonic() + 5
    while (got := cache_counters(server, model, version)) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return got


@pytest.mark.triton
def test_the_prefix_cache_counts_hits_and_never_changes_outputs(
    client: grpcclient.InferenceServerClient, server: TritonSpec, decoders: dict[int, Any]
) -> None:
    prompt = "# test: hits and outputs\n" + CONTEXT
    blocks = len(prompt) // BLOCK
    shared = 40  # blocks a variant shares with it
    variant = prompt[: shared * BLOCK] + "# another file\n" + CONTEXT
    want = expected(decoders, prompt, 1, 8)
    lookups, hits = cache_counters(server, "codegen", "1")
    assert generate(client, prompt, 8, version="1")[1] == want  # cold
    assert wait_for_counters(server, "codegen", "1", (lookups + blocks, hits)) == (
        lookups + blocks,
        hits,
    )
    assert generate(client, prompt, 8, version="1")[1] == want  # warm: the same tokens
    lookups, hits = lookups + 2 * blocks, hits + blocks
    assert wait_for_counters(server, "codegen", "1", (lookups, hits)) == (lookups, hits)
    assert generate(client, variant, 8, version="1")[1] == expected(decoders, variant, 1, 8)
    lookups, hits = lookups + len(variant) // BLOCK, hits + shared
    assert wait_for_counters(server, "codegen", "1", (lookups, hits)) == (lookups, hits)
    # Version 2 runs in its own process with its own cache: cold there.
    v2 = cache_counters(server, "codegen", "2")
    generate(client, prompt, 8, version="2")
    assert wait_for_counters(server, "codegen", "2", (v2[0] + blocks, v2[1])) == (
        v2[0] + blocks,
        v2[1],
    )
    used = scrape(server, "prefix_cache_used_blocks", "codegen", "1")
    capacity = scrape(server, "prefix_cache_capacity_blocks", "codegen", "1")
    assert blocks <= used <= capacity == 2048


@pytest.mark.triton
def test_codegen_stream_has_its_cache_too(
    client: grpcclient.InferenceServerClient, server: TritonSpec
) -> None:
    prompt = "# test: streaming\n" + CONTEXT
    blocks = len(prompt) // BLOCK
    lookups, hits = cache_counters(server, "codegen_stream", "1")
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        streamed = []
        for i in range(2):
            client.async_stream_infer(
                "codegen_stream", codegen_inputs(prompt, 5), request_id=str(i)
            )
            tokens = []
            for _ in range(5):
                result, error = responses.get(timeout=30)
                assert error is None
                tokens.append(int(result.as_numpy("TOKEN_ID")[0, 0]))
            streamed.append(tokens)
    finally:
        client.stop_stream()
    assert streamed[0] == streamed[1] == generate(client, prompt, 5, version="1")[1]
    expected_counters = (lookups + 2 * blocks, hits + blocks)
    assert wait_for_counters(server, "codegen_stream", "1", expected_counters) == expected_counters


@pytest.mark.triton
def test_a_cold_prefill_takes_the_configured_time(
    client: grpcclient.InferenceServerClient, server: TritonSpec
) -> None:
    params = served_parameters(client, "codegen", "2")
    # prefill_ratio x (13 decode steps) for the 1469-token reference prompt, per block.
    tokens_per_block = int(params["prefix_block_bytes"]) / float(params["bytes_per_token"])
    per_block = (
        (float(params["prefill_ratio"]) * 13 * float(params["decode_step_ms"]) / 1000)
        * tokens_per_block
        / 1469
    )
    assert scrape(server, "prefill_seconds_per_block", "codegen", "2") == pytest.approx(per_block)
    prompt = ("# test: prefill time\n" + CONTEXT) * 10  # about 60 KiB, some 950 blocks
    busy = scrape(server, "nv_inference_compute_infer_duration_us", "codegen", "2")
    generate(client, prompt, 1, version="2")
    deadline = time.monotonic() + 5
    while (
        spent := scrape(server, "nv_inference_compute_infer_duration_us", "codegen", "2")
    ) == busy:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # A floor, not a timing: the model waits at least this long for the cold prompt.
    assert spent - busy >= 0.99 * 1e6 * per_block * len(prompt) / int(params["prefix_block_bytes"])


# --- honest memory ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after state: ppid
            found.append(int(entry.name))
    return found


def _accumulate(
    client: grpcclient.InferenceServerClient, sid: int | str, n: int, start: bool, end: bool = False
) -> int:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[n]], dtype=np.int32))
    result = client.infer("accumulate", [tensor], sequence_id=sid, sequence_start=start,
                          sequence_end=end, client_timeout=10)  # fmt: skip
    return int(result.as_numpy("OUTPUT")[0][0])


@pytest.mark.triton
def test_accumulate_keeps_a_sum_per_sequence_as_the_sidecar_expects(
    client: grpcclient.InferenceServerClient,
) -> None:
    """The facts sidecar/sequences.py relies on, as this Triton shows them."""
    config = client.get_model_config("accumulate").config
    idle_s = config.sequence_batching.max_sequence_idle_microseconds / 1e6
    assert idle_s == 5.0
    # Interleaved sequences, integer and string ids, each its own sum.
    assert _accumulate(client, 11, 5, start=True) == 5
    assert _accumulate(client, "eleven", 7, start=True) == 7
    assert _accumulate(client, 11, 1, start=False) == 6
    assert _accumulate(client, "eleven", 1, start=False) == 8
    assert _accumulate(client, 11, 4, start=False, end=True) == 10
    # After END, and for a sequence never started, a step without START is refused (not run),
    # with the message the sidecar looks for.
    for sid in (11, 12):
        with pytest.raises(InferenceServerException) as refused:
            _accumulate(client, sid, 1, start=False)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert NOT_STARTED in (refused.value.message() or "")
    # Triton's own limit on string ids, which the sidecar applies before routing.
    with pytest.raises(InferenceServerException, match="cannot be longer than 128"):
        _accumulate(client, "x" * (MAX_SEQUENCE_ID_CHARS + 1), 1, start=True)
    # A sequence idle past max_sequence_idle_microseconds is gone: its next step needs START.
    assert _accumulate(client, 13, 1, start=True) == 1
    time.sleep(idle_s + 0.5)
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        _accumulate(client, 13, 1, start=False)


def _rss_bytes(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.triton
def test_every_model_process_holds_its_declared_memory(
    triton: tuple[TritonSpec, ManagedProcess], client: grpcclient.InferenceServerClient
) -> None:
    # Runs last in this module, after the traffic above: serving memory is included.
    _, proc = triton
    assert proc.pid is not None
    resident: dict[tuple[str, str], int] = {}
    for pid in _children(proc.pid):
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        if not argv[0].endswith(b"triton_python_backend_stub"):
            continue
        model_py = Path(argv[1].decode())  # REPO/<model>/<version>/model.py
        resident[(model_py.parent.parent.name, model_py.parent.name)] = _rss_bytes(pid)
    assert set(resident) == {
        ("codegen", "1"),
        ("codegen", "2"),
        ("codegen_stream", "1"),
        ("echo", "1"),
        ("slow", "1"),
        ("add_one", "1"),
        ("accumulate", "1"),
    }
    for (model, version), rss in resident.items():
        declared = int(served_parameters(client, model, version)["pointsman.memory_bytes"])
        # The model tops itself up to the declared size less 3 MiB of working memory,
        # which serving then takes up (a request's tensors, the shared-memory channel).
        assert declared - 5 * MiB <= rss <= declared + 4 * MiB, (model, version, rss, declared)
